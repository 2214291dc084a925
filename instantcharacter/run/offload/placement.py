"""The placement: where the models live during a run, phase by phase, as the planner decided (see
:mod:`the package <.>` for the modes).

Text encoders, projector and VAE come to the device only for their phase in the offloading modes; the
transformer's blocks stay or stream as the denoising plan says, through a :class:`~.streamer.BlockStreamer`. On a
CPU-only machine the same code paths run, with CPU tensors as the "device" buffers (that is how the tests check
them).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ...files.checkpoint import FP8
from .planner import (GIB, OFFLOAD_MODES, Plan, choose_offload, decode_plan, model_sizes, outside_blocks, t5_blocks,
                      text_encoder_plan, text_encoders, transformer_groups, transformer_plan)
from .streamer import BlockStreamer


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Placement:
    """Where the models of one run live, phase by phase. Made per run (it moves the models to where its mode
    starts them); its phases are context managers, entered in order: :meth:`encoding_prompts`, :meth:`projecting`,
    :meth:`denoising`, :meth:`decoding`; :meth:`restore` undoes what a failed or cancelled run left."""

    def __init__(self, flux, adapter, mode: str = "auto", device=None, budget_gb: float | None = None,
                 fp8: bool = False, on_phase: Callable[[str, str], None] | None = None):
        """``on_phase(phase, "start" | "end")`` is called around each phase (see :meth:`_phase`)."""
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"Unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}.")
        if fp8 and FP8 is None:
            raise ValueError("fp8 storage needs a torch with float8_e4m3fn (2.1 or newer).")
        self.flux = flux
        self.adapter = adapter
        self.device = torch.device(device) if device is not None else default_device()
        self.offload_device = torch.device("cpu")
        self.fp8 = fp8
        self.on_phase = on_phase
        self.streamer: BlockStreamer | None = None
        self.text_streamer: BlockStreamer | None = None
        self.plan: Plan | None = None  # the denoising phase's, once it ran
        self._copy_stream = None  # one side stream for every streamer of this placement
        self.reason = ""
        if mode == "auto":
            mode, budget_gb, self.reason = self._auto()
        if mode == "budget" and budget_gb is None:
            raise ValueError("The budget mode needs a VRAM budget in GiB.")
        self.mode = mode
        self.budget_gb = budget_gb
        if mode != "off":
            for module in self._all_modules():
                module.to(self.offload_device)
        elif not fp8:
            for module in self._all_modules():
                module.to(self.device)
        else:
            # fp8 keeps the bf16 blocks on the host; the streamer puts fp8 copies on the device
            blocks, extras = self._groups()
            grouped = blocks + [m for e in extras for m in e]
            for module in self._all_modules():
                for sub in _leaves_outside(module, set(map(id, grouped))):
                    sub.to(self.device)
            for module in grouped:
                module.to(self.offload_device)

    def _auto(self):
        if self.device.type != "cuda":
            return "off", None, "not a CUDA device: nothing to offload"
        free = torch.cuda.mem_get_info(self.device)[0]
        choice = choose_offload(free, model_sizes(self.flux, self.adapter, self.fp8))
        return choice.mode, choice.budget_gb, choice.reason

    def _all_modules(self):
        f = self.flux
        mods = [f.text_encoder, f.text_encoder_2, f.transformer, f.vae]
        if self.adapter is not None:
            mods.append(self.adapter)
        return [m for m in mods if m is not None]

    @contextlib.contextmanager
    def _phase(self, name: str):
        """One phase: "text encoders", "projector", "denoising" or "decode", announced to ``on_phase``."""
        if self.on_phase is not None:
            self.on_phase(name, "start")
        try:
            yield
        finally:
            if self.on_phase is not None:
                self.on_phase(name, "end")

    def _side_stream(self):
        if self.device.type == "cuda" and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream

    def _release_cache(self) -> None:
        """Give the memory a phase freed back to the driver, so the next phase (and the card) has the budget."""
        if self.device.type == "cuda" and self.mode != "off":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _visiting(self, *modules):
        if self.mode == "off":
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to(self.offload_device)
            self._release_cache()

    def text_plan(self) -> Plan | None:
        """T5's plan in this placement; None when T5 moves whole (or not at all)."""
        return text_encoder_plan(self.flux, self.mode, self.budget_gb)

    @contextlib.contextmanager
    def encoding_prompts(self, passes: int | None = 1):
        """The prompt-encoding phase: CLIP and T5 on the device (``passes``: prompts encoded), T5's blocks
        streamed when its plan says so (:meth:`text_plan`)."""
        t5 = self.flux.text_encoder_2
        encoders = text_encoders(self.flux)
        with self._phase("text encoders"):
            plan = self.text_plan()
            if plan is None:
                with self._visiting(*encoders):
                    yield
                return
            blocks = t5_blocks(self.flux)
            rest = [m for m in encoders if m is not t5] + list(_leaves_outside(t5, set(map(id, blocks))))
            try:
                for m in rest:
                    m.to(self.device)
                # compute_dtype None: T5 keeps its own dtypes (fp32 feed-forward outputs in fp16, fp8 file weights)
                self.text_streamer = BlockStreamer(blocks, [[] for _ in blocks], self.device, plan.resident,
                                                   compute_dtype=None, prefetch=self.mode != "sequential",
                                                   passes=passes, copy_stream=self._side_stream())
                yield
            finally:
                if self.text_streamer is not None:
                    self.text_streamer.close()
                for m in encoders:
                    m.to(self.offload_device)
                self._release_cache()

    @contextlib.contextmanager
    def projecting(self):
        """The projector phase: the projector on the device while the character tokens are computed."""
        with self._phase("projector"), self._visiting(self.adapter.image_proj):
            yield

    @contextlib.contextmanager
    def decoding(self):
        """The decode phase: the VAE on the device."""
        with self._phase("decode"), self._visiting(*[m for m in (self.flux.vae,) if m is not None]):
            yield

    def decode_plan(self, latent_h: int, latent_w: int, dtype: torch.dtype) -> str:
        """How the VAE decodes in this placement (see :func:`.planner.decode_plan`)."""
        return decode_plan(self.flux.vae, self.mode, self.budget_gb, latent_h, latent_w, dtype)

    @property
    def unpinned_bytes(self) -> int:
        """Streamed weights the driver refused to page-lock (they were copied from pageable memory)."""
        return sum(s.unpinned_bytes for s in (self.text_streamer, self.streamer) if s is not None)

    def describe(self) -> str:
        """The mode in use, and why when ``auto`` chose it (for the log)."""
        text = self.mode
        if self.mode == "budget":
            plan = self.plan or self.denoising_plan()
            resident = plan.resident
            text += (f" {self.budget_gb:.4g} GiB, {sum(resident)}/{len(resident)} blocks resident "
                     f"({plan.total / GIB:.2f} GiB planned")
            text += ", more than the budget: the least this mode needs)" if plan.total > self.budget_gb * GIB else ")"
        text += " + fp8 storage" if self.fp8 else ""
        if self.unpinned_bytes:
            text += f", {self.unpinned_bytes / GIB:.2f} GiB could not be page-locked (slower copies)"
        return f"{text} ({self.reason})" if self.reason else text

    def _groups(self):
        return transformer_groups(self.flux.transformer, self.adapter)

    def denoising_plan(self) -> Plan:
        """The denoising phase's plan in this placement (with the LoRA branches the transformer has now)."""
        return transformer_plan(self.flux.transformer, self.adapter, self.mode, self.budget_gb, self.fp8)

    @contextlib.contextmanager
    def denoising(self, passes: int | None = None):
        """The denoising phase: the transformer's blocks kept or streamed as :meth:`denoising_plan` says;
        ``passes``: how many times the transformer runs (steps × CFG passes)."""
        t = self.flux.transformer
        blocks, extras = self._groups()
        if self.mode == "off" and not self.fp8:
            with self._phase("denoising"):
                yield
            return
        with self._phase("denoising"):
            try:
                for m in outside_blocks(t):
                    m.to(self.device)
                self.plan = self.denoising_plan()  # with this run's LoRA branches
                self.streamer = BlockStreamer(blocks, extras, self.device, self.plan.resident,
                                              compute_dtype=t.dtype, storage_dtype=FP8 if self.fp8 else None,
                                              prefetch=self.mode != "sequential", passes=passes,
                                              copy_stream=self._side_stream())
                yield
            finally:
                if self.streamer is not None:
                    self.streamer.close()  # the device copies of the kept blocks go here, before the decode
                if self.mode != "off":
                    t.to(self.offload_device)
                    for layer_group in extras:
                        for layer in layer_group:
                            layer.to(self.offload_device)
                self._release_cache()

    def restore(self) -> None:
        """Undo what a failed or cancelled run may have left: hooks, moved weights, models on the device
        in the offloading modes."""
        for streamer in (self.text_streamer, self.streamer):
            if streamer is not None:
                streamer.close()
        if self.mode != "off":
            for module in self._all_modules():
                module.to(self.offload_device)
            self._release_cache()


def _leaves_outside(module, excluded_ids: set[int]):
    """The largest sub-modules of ``module`` that contain none of the excluded modules."""
    if id(module) in excluded_ids:
        return
    inner = [m for m in module.modules() if id(m) in excluded_ids]
    if not inner:
        yield module
        return
    for child in module.children():
        yield from _leaves_outside(child, excluded_ids)
