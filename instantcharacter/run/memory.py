"""Where the models live during a run.

Modes (the sampler's ``offload`` setting):

* ``off`` — every model stays on the compute device (fastest; needs the most VRAM).
* ``budget`` — the placement follows the work: text encoders, projector and VAE come to the device only
  for their phase (T5's blocks stream when T5 does not fit the budget; the VAE decodes one image at a
  time, tiled when one decode would not fit); of the transformer, as many blocks (each with its
  character-attention layer) stay resident as the VRAM budget allows, and the rest stream from pinned
  host memory one block ahead of use on a side CUDA stream (see :mod:`streaming`).
* ``sequential`` — the slow floor: every block comes to the device only while it runs, no prefetch.
* ``auto`` — picks one of the above from the free VRAM.

``fp8`` storage keeps the transformer and character-attention weights as float8_e4m3fn (half the bytes
to hold or stream) and computes in the model dtype. On a CPU-only machine nothing is moved; the same code
paths run (that is how the tests check them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..files.checkpoint import FP8
from .streaming import BlockStreamer, module_bytes, plan_residency

OFFLOAD_MODES = ("auto", "off", "budget", "sequential")
GIB = 2**30
# Working memory kept free for activations, attention and the allocator at 1024² (an estimate; the
# benchmark script measures the real peak).
ACTIVATION_RESERVE_GB = 3.0
# T5's working memory for one 512-token prompt is tens of MB; this leaves room for the allocator too.
TEXT_MARGIN_GB = 0.5


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class OffloadChoice:
    mode: str
    budget_gb: float | None
    reason: str


def model_sizes(flux, adapter, fp8: bool = False) -> dict[str, int]:
    """Bytes of each component as it would sit on the device."""
    t = flux.transformer
    store = FP8 if fp8 else None
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    ip = list(adapter.ip_adapter) if adapter is not None else []
    non_block = [m for n, m in t.named_children() if n not in ("transformer_blocks", "single_transformer_blocks")]
    return {
        "blocks": module_bytes(blocks, store) + module_bytes(ip, store),
        "transformer_rest": module_bytes(non_block),
        "text_encoders": module_bytes([m for m in (flux.text_encoder, flux.text_encoder_2) if m is not None]),
        "vae": module_bytes([flux.vae] if flux.vae is not None else []),
        "projector": module_bytes([adapter.image_proj]) if adapter is not None else 0,
    }


def choose_offload(free_bytes: int, sizes: dict[str, int]) -> OffloadChoice:
    """``auto``: everything resident if it all fits, else a budget for the transformer, else sequential."""
    reserve = ACTIVATION_RESERVE_GB * GIB
    everything = sum(sizes.values()) + reserve
    if free_bytes >= everything:
        return OffloadChoice("off", None, f"{free_bytes / GIB:.1f} GiB free ≥ {everything / GIB:.1f} GiB for all models")
    # T5 streams its blocks and the VAE decodes in tiles when they do not fit; the projector visits whole
    phase_peak = max(sizes["vae"], sizes["projector"])
    if free_bytes >= max(phase_peak, sizes["transformer_rest"]) + reserve + GIB:
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
    published = {"blocks": int(23.8e9 + 2.87e9), "transformer_rest": int(0.2e9), "text_encoders": int(9.8e9),
                 "vae": int(0.17e9), "projector": int(2.72e9)}
    choice = choose_offload(free_bytes, published)
    if choice.mode == "budget":
        return f"budget {choice.budget_gb:.0f} GB", choice.reason
    return choice.mode, choice.reason


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
        self.reason = ""
        if mode == "auto":
            mode, budget_gb, self.reason = self._auto()
        if mode == "budget" and budget_gb is None:
            raise ValueError("The budget mode needs a VRAM budget in GB.")
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

    @contextlib.contextmanager
    def text_encoders(self):
        """CLIP and T5 for the prompt encoding. T5-XXL alone is 9.5 GB in bf16, more than small budgets hold:
        then its blocks stream like the transformer's (in ``sequential`` always, one at a time)."""
        t5 = self.flux.text_encoder_2
        encoders = [m for m in (self.flux.text_encoder, t5) if m is not None]
        blocks = list(getattr(getattr(t5, "encoder", None), "block", None) or [])
        fits = self.mode == "budget" and module_bytes(encoders) + TEXT_MARGIN_GB * GIB <= self.budget_gb * GIB
        if self.mode == "off" or not blocks or fits:
            with self._visiting(*encoders):
                yield
            return
        rest = [m for m in encoders if m is not t5] + list(_leaves_outside(t5, set(map(id, blocks))))
        for m in rest:
            m.to(self.device)
        if self.mode == "budget":
            available = self.budget_gb * GIB - module_bytes(rest) - TEXT_MARGIN_GB * GIB
            resident = self._plan([module_bytes([b]) for b in blocks], available)
        else:
            resident = [False] * len(blocks)
        # compute_dtype None: T5 keeps its own dtypes (fp32 feed-forward outputs in fp16, fp8 file weights)
        streamer = BlockStreamer(blocks, [[] for _ in blocks], self.device, resident, compute_dtype=None,
                                 prefetch=self.mode != "sequential", repeats=False)
        try:
            yield
        finally:
            streamer.close()
            for m in encoders:
                m.to(self.offload_device)

    def projector(self):
        return self._visiting(self.adapter.image_proj)

    def vae(self):
        return self._visiting(*[m for m in (self.flux.vae,) if m is not None])

    def decode_plan(self, latent_h: int, latent_w: int, dtype: torch.dtype) -> str:
        """How the VAE decodes: ``batch`` (all images at once), ``per_image``, or ``tiled`` (per image, in
        overlapping tiles). ``off`` is about speed; the offloading modes decode one image at a time, tiled
        when the VAE and one image's decode would not fit the budget (always in ``sequential``)."""
        if self.mode == "off":
            return "batch"
        if self.mode == "sequential":
            return "tiled"
        vae = self.flux.vae
        need = (module_bytes([vae]) if vae is not None else 0) + vae_decode_bytes(latent_h, latent_w, dtype)
        return "per_image" if need + GIB // 2 <= self.budget_gb * GIB else "tiled"

    def describe(self) -> str:
        """The mode in use, and why when ``auto`` chose it (for the log)."""
        text = self.mode
        if self.mode == "budget":
            resident = self.residency()
            text += f" {self.budget_gb:.1f} GB, {sum(resident)}/{len(resident)} blocks resident"
        text += " + fp8 storage" if self.fp8 else ""
        return f"{text} ({self.reason})" if self.reason else text

    def _groups(self):
        t = self.flux.transformer
        blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
        layers = list(self.adapter.ip_adapter) if self.adapter is not None else []
        extras = [[layers[i]] if i < len(layers) else [] for i in range(len(blocks))]
        return blocks, extras

    def residency(self) -> list[bool]:
        """Which transformer blocks stay on the device in this run."""
        blocks, extras = self._groups()
        if self.mode == "off":
            return [True] * len(blocks)
        if self.mode == "sequential":
            return [False] * len(blocks)
        store = FP8 if self.fp8 else None
        rest = module_bytes([m for n, m in self.flux.transformer.named_children()
                             if n not in ("transformer_blocks", "single_transformer_blocks")])
        available = self.budget_gb * GIB - rest - ACTIVATION_RESERVE_GB * GIB
        return self._plan([module_bytes([b, *e], store) for b, e in zip(blocks, extras)], available)

    @staticmethod
    def _plan(sizes: list[int], available: float) -> list[bool]:
        resident = plan_residency(sizes, available)
        if not all(resident):
            # two streamed blocks can be on the device at once (the running one and the prefetched one)
            resident = plan_residency(sizes, available - 2 * max(sizes))
        return resident

    @contextlib.contextmanager
    def transformer(self):
        t = self.flux.transformer
        blocks, extras = self._groups()
        if self.mode == "off" and not self.fp8:
            yield
            return
        for name, m in t.named_children():
            if name not in ("transformer_blocks", "single_transformer_blocks"):
                m.to(self.device)
        self.streamer = BlockStreamer(blocks, extras, self.device, self.residency(), compute_dtype=t.dtype,
                                      storage_dtype=FP8 if self.fp8 else None,
                                      prefetch=self.mode != "sequential")
        try:
            yield
        finally:
            self.streamer.close()
            if self.mode != "off":
                t.to(self.offload_device)
                for layer_group in extras:
                    for layer in layer_group:
                        layer.to(self.offload_device)

    def restore(self) -> None:
        """Undo what a failed or cancelled run may have left: hooks, moved weights, models on the device
        in the offloading modes."""
        if self.streamer is not None:
            self.streamer.close()
        if self.mode != "off":
            for module in self._all_modules():
                module.to(self.offload_device)


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
