"""Where the models live during a run.

Modes (the sampler's ``offload`` setting):

* ``off`` — every model stays on the compute device (fastest; needs the most VRAM).
* ``budget`` — the placement follows the work: text encoders, projector and VAE come to the device only
  for their phase (T5's blocks stream when T5 does not fit the budget; the VAE decodes one image at a
  time, tiled when one decode would not fit); of the transformer, as many blocks (each with its
  character-attention layer) stay resident as the VRAM budget allows, and the rest stream from pinned
  host memory one block ahead of use on a side CUDA stream (see :mod:`streaming`). The budget counts
  what lives on the device: the rest of the transformer, the kept blocks, the streaming buffers (two per
  block size; with fp8 also the compute-dtype copies), the allocator's rounding and a reserve for
  activations.
* ``sequential`` — the slow floor: every block comes to the device only while it runs, no prefetch.
* ``auto`` — picks one of the above from the free VRAM.

``fp8`` storage keeps the transformer and character-attention weights as float8_e4m3fn (half the bytes
to hold or stream) and computes in the model dtype; the fp8 copies are made once and kept with the model.

Every memory figure here is in GiB (2**30 bytes, what nvidia-smi and ComfyUI call "GB"; a "24 GB" card
has 24 GiB), ``vram_budget_gb`` too. On a CPU-only machine the same code paths run, with CPU tensors as the
"device" buffers (that is how the tests check them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..files.checkpoint import FP8
from .streaming import (BlockStreamer, buffer_limits, device_bytes, group_layouts, module_bytes,
                        plan_residency, streaming_choices)

OFFLOAD_MODES = ("auto", "off", "budget", "sequential")
GIB = 2**30
# Working memory kept free for activations, attention and the allocator at 1024² (an estimate; the
# benchmark script measures the real peak of each phase).
ACTIVATION_RESERVE_GIB = 3.0
# T5's working memory for one 512-token prompt is tens of MB; this leaves room for the allocator too.
TEXT_MARGIN_GIB = 0.5
# What the published models need on the device (bytes), for ``doctor`` without loading them: FLUX.1-dev's blocks
# with the 57 character layers, the rest of the transformer, CLIP-L + T5-XXL, the VAE, the projector, and the
# streaming buffers when every block streams (two of a double block + its layer, two of a single + its layer).
PUBLISHED_SIZES = {"blocks": int(23.8e9 + 2.87e9), "transformer_rest": int(0.2e9), "text_encoders": int(9.8e9),
                   "vae": int(0.17e9), "projector": int(2.72e9), "in_flight": int(2.03e9)}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class OffloadChoice:
    mode: str
    budget_gb: float | None
    reason: str


@dataclass
class Plan:
    """What one phase puts on the device (bytes): the groups kept there, the streaming buffers, what else the
    phase holds (the rest of the model) and the reserve for its working memory."""

    resident: list[bool]
    kept: int
    in_flight: int
    rest: int
    reserve: int
    streamed_per_pass: int

    @property
    def total(self) -> int:
        return self.kept + self.in_flight + self.rest + self.reserve


def _group_costs(layouts, prefetch: bool):
    """Per group the bytes it holds on the device when kept; and the streaming buffers a residency needs: of each
    size, two (one with no prefetch) for the streamed parts, and as many compute-dtype buffers for the cast ones."""
    kept = [sum(device_bytes(lay.nbytes) for lay in group) for group in layouts]

    def in_flight(resident) -> int:
        limits = buffer_limits([(group, not keep) for group, keep in zip(layouts, resident)], prefetch)
        return sum(count * device_bytes(key[1]) for key, count in limits.items())

    return kept, in_flight


def _plan(layouts, mode: str, budget_bytes: float | None, fixed: int, reserve: int, prefetch: bool) -> Plan:
    kept, in_flight = _group_costs(layouts, prefetch)
    if mode == "off":
        resident = [True] * len(layouts)
    elif mode == "sequential" or budget_bytes is None:
        resident = [False] * len(layouts)
    else:
        resident = plan_residency(kept, budget_bytes - fixed - reserve, in_flight)
    streamed = sum(lay.nbytes for group, keep in zip(layouts, resident) if not keep for lay in group)
    return Plan(resident, sum(k for k, keep in zip(kept, resident) if keep), in_flight(resident), fixed, reserve,
                streamed)


def transformer_groups(transformer, adapter):
    """The transformer's blocks in running order, each with the character layer that runs inside it."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    layers = list(adapter.ip_adapter) if adapter is not None else []
    extras = [[layers[i]] if i < len(layers) else [] for i in range(len(blocks))]
    return blocks, extras


def transformer_plan(transformer, adapter, mode: str, budget_gb: float | None, fp8: bool) -> Plan:
    """The residency plan of the denoising phase (works on ``meta`` models: the README's figures)."""
    blocks, extras = transformer_groups(transformer, adapter)
    layouts = [group_layouts([b, *e], FP8 if fp8 else None, transformer.dtype) for b, e in zip(blocks, extras)]
    rest = module_bytes([m for n, m in transformer.named_children()
                         if n not in ("transformer_blocks", "single_transformer_blocks")])
    budget = None if budget_gb is None else budget_gb * GIB
    return _plan(layouts, mode, budget, rest, int(ACTIVATION_RESERVE_GIB * GIB), prefetch=mode != "sequential")


def partial_budgets(transformer, adapter, fp8: bool = False) -> list[tuple[float, list[bool]]]:
    """Budgets (GiB) at which the denoising plan keeps some blocks and streams the others, each with its
    residency, fewest resident first (a small model's budgets for tests and the benchmark's ``--small``)."""
    blocks, extras = transformer_groups(transformer, adapter)
    layouts = [group_layouts([b, *e], FP8 if fp8 else None, transformer.dtype) for b, e in zip(blocks, extras)]
    kept, in_flight = _group_costs(layouts, prefetch=True)
    base = transformer_plan(transformer, adapter, "budget", 0.0, fp8)
    out = {}
    for resident in (r for pool in streaming_choices(kept) for r in pool):
        cost = base.rest + base.reserve + sum(k for k, keep in zip(kept, resident) if keep) + in_flight(resident)
        plan = transformer_plan(transformer, adapter, "budget", cost / GIB, fp8)
        if 0 < sum(plan.resident) < len(plan.resident):
            out[tuple(plan.resident)] = min(out.get(tuple(plan.resident), cost / GIB), cost / GIB)
    return sorted(((budget, list(r)) for r, budget in out.items()), key=lambda item: sum(item[1]))


def model_sizes(flux, adapter, fp8: bool = False) -> dict[str, int]:
    """Bytes of each component as it would sit on the device; ``in_flight``: the streaming buffers when every
    transformer block streams."""
    t = flux.transformer
    store = FP8 if fp8 else None
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    ip = list(adapter.ip_adapter) if adapter is not None else []
    non_block = [m for n, m in t.named_children() if n not in ("transformer_blocks", "single_transformer_blocks")]
    streaming = transformer_plan(t, adapter, "budget", 0.0, fp8)
    return {
        "blocks": module_bytes(blocks, store) + module_bytes(ip, store),
        "transformer_rest": module_bytes(non_block),
        "text_encoders": module_bytes([m for m in (flux.text_encoder, flux.text_encoder_2) if m is not None]),
        "vae": module_bytes([flux.vae] if flux.vae is not None else []),
        "projector": module_bytes([adapter.image_proj]) if adapter is not None else 0,
        "in_flight": streaming.in_flight,
    }


def choose_offload(free_bytes: int, sizes: dict[str, int]) -> OffloadChoice:
    """``auto``: everything resident if it all fits, else a budget for the transformer, else sequential."""
    reserve = ACTIVATION_RESERVE_GIB * GIB
    everything = sum(v for k, v in sizes.items() if k != "in_flight") + reserve
    if free_bytes >= everything:
        return OffloadChoice("off", None, f"{free_bytes / GIB:.1f} GiB free ≥ {everything / GIB:.1f} GiB for all models")
    # T5 streams its blocks and the VAE decodes in tiles when they do not fit; the projector visits whole
    phase_peak = max(sizes["vae"], sizes["projector"], sizes["transformer_rest"] + sizes["in_flight"])
    if free_bytes >= phase_peak + reserve + GIB:
        budget = (free_bytes - 0.5 * GIB) / GIB
        return OffloadChoice("budget", budget, f"{free_bytes / GIB:.1f} GiB free: budget {budget:.1f} GiB, the "
                                               "transformer blocks that do not fit are streamed")
    return OffloadChoice("sequential", None, f"only {free_bytes / GIB:.1f} GiB free: blocks one at a time")


def vae_decode_bytes(latent_h: int, latent_w: int, dtype: torch.dtype) -> int:
    """Working memory of decoding one image with the FLUX VAE. This is ComfyUI's estimate for this VAE
    (``memory_used_decode`` in comfy/sd.py): deliberately on the safe side."""
    return 2178 * 64 * latent_h * latent_w * torch.empty((), dtype=dtype).element_size()


def recommend_offload(free_bytes: int | None = None) -> tuple[str, str]:
    """The offload mode for this machine and why (for ``doctor``; uses the published model sizes)."""
    if free_bytes is None:
        if not torch.cuda.is_available():
            return "off", "no CUDA GPU: everything runs on the CPU, nothing to offload"
        free_bytes = torch.cuda.mem_get_info()[0]
    choice = choose_offload(free_bytes, PUBLISHED_SIZES)
    if choice.mode == "budget":
        return f"budget {choice.budget_gb:.0f} GiB", choice.reason
    return choice.mode, choice.reason


_WATCHERS: list[Callable[[str, str], None]] = []


@contextlib.contextmanager
def watching_phases(callback: Callable[[str, str], None]):
    """Call ``callback(phase, "start" | "end")`` around each phase of the runs made meanwhile: "text encoders",
    "projector", "denoising", "decode" (the benchmark measures the memory of each)."""
    _WATCHERS.append(callback)
    try:
        yield
    finally:
        _WATCHERS.remove(callback)


@contextlib.contextmanager
def _phase(name: str):
    for watcher in list(_WATCHERS):
        watcher(name, "start")
    try:
        yield
    finally:
        for watcher in list(_WATCHERS):
            watcher(name, "end")


class Placement:
    def __init__(self, flux, adapter, mode: str = "auto", device=None, budget_gb: float | None = None,
                 fp8: bool = False):
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"Unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}.")
        if fp8 and FP8 is None:
            raise ValueError("fp8 storage needs a torch with float8_e4m3fn (2.1 or newer).")
        self.flux = flux
        self.adapter = adapter
        self.device = torch.device(device) if device is not None else default_device()
        self.offload_device = torch.device("cpu")
        self.fp8 = fp8
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
            streamed = set(map(id, blocks + [m for e in extras for m in e]))
            for module in self._all_modules():
                for sub in _leaves_outside(module, streamed):
                    sub.to(self.device)
            for module in blocks + [m for e in extras for m in e]:
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
        t5 = self.flux.text_encoder_2
        encoders = [m for m in (self.flux.text_encoder, t5) if m is not None]
        blocks = list(getattr(getattr(t5, "encoder", None), "block", None) or [])
        margin = int(TEXT_MARGIN_GIB * GIB)
        fits = self.mode == "budget" and module_bytes(encoders) + margin <= self.budget_gb * GIB
        if self.mode == "off" or not blocks or fits:
            return None
        rest = module_bytes(encoders) - module_bytes(blocks)
        layouts = [group_layouts([b], None, None) for b in blocks]
        budget = self.budget_gb * GIB if self.mode == "budget" else None
        return _plan(layouts, self.mode, budget, rest, margin, prefetch=self.mode != "sequential")

    @contextlib.contextmanager
    def text_encoders(self, passes: int | None = 1):
        """CLIP and T5 for the prompt encoding (``passes``: prompts encoded). T5-XXL alone is 9.5 GB in bf16,
        more than small budgets hold: then its blocks stream like the transformer's (in ``sequential`` always,
        one at a time)."""
        t5 = self.flux.text_encoder_2
        encoders = [m for m in (self.flux.text_encoder, t5) if m is not None]
        with _phase("text encoders"):
            plan = self.text_plan()
            if plan is None:
                with self._visiting(*encoders):
                    yield
                return
            blocks = list(t5.encoder.block)
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
    def projector(self):
        with _phase("projector"), self._visiting(self.adapter.image_proj):
            yield

    @contextlib.contextmanager
    def vae(self):
        with _phase("decode"), self._visiting(*[m for m in (self.flux.vae,) if m is not None]):
            yield

    def decode_plan(self, latent_h: int, latent_w: int, dtype: torch.dtype) -> str:
        """How the VAE decodes: ``batch`` (all images at once), ``per_image``, or ``tiled`` (per image, in
        overlapping tiles). ``off`` is about speed; the offloading modes decode one image at a time, tiled
        when the VAE and one image's decode would not fit the budget (always in ``sequential``). The transformer's
        device copies are gone by then (the streamer releases them when the denoising phase ends)."""
        if self.mode == "off":
            return "batch"
        if self.mode == "sequential":
            return "tiled"
        vae = self.flux.vae
        need = (module_bytes([vae]) if vae is not None else 0) + vae_decode_bytes(latent_h, latent_w, dtype)
        return "per_image" if need + GIB // 2 <= self.budget_gb * GIB else "tiled"

    @property
    def unpinned_bytes(self) -> int:
        """Streamed weights the driver refused to page-lock (they were copied from pageable memory)."""
        return sum(s.unpinned_bytes for s in (self.text_streamer, self.streamer) if s is not None)

    def describe(self) -> str:
        """The mode in use, and why when ``auto`` chose it (for the log)."""
        text = self.mode
        if self.mode == "budget":
            plan = self.plan or self.transformer_plan()
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

    def transformer_plan(self) -> Plan:
        return transformer_plan(self.flux.transformer, self.adapter, self.mode, self.budget_gb, self.fp8)

    def residency(self) -> list[bool]:
        """Which transformer blocks stay on the device in this run."""
        return self.transformer_plan().resident

    @contextlib.contextmanager
    def transformer(self, passes: int | None = None):
        """The denoising phase; ``passes``: how many times the transformer runs (steps × CFG passes)."""
        t = self.flux.transformer
        blocks, extras = self._groups()
        if self.mode == "off" and not self.fp8:
            with _phase("denoising"):
                yield
            return
        with _phase("denoising"):
            try:
                for name, m in t.named_children():
                    if name not in ("transformer_blocks", "single_transformer_blocks"):
                        m.to(self.device)
                self.plan = self.transformer_plan()  # with this run's LoRA branches
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
