"""Where the models live during a run.

Modes:

* ``off`` — everything stays on the compute device (fastest; needs the most VRAM).
* ``model`` — each model comes to the device only for its phase (text encoders, projector, transformer
  with the character attention, VAE) and goes back to the CPU after it.
* ``sequential`` — like ``model``, but the transformer's blocks come to the device one at a time, each
  with its character-attention layer (slowest; least VRAM).

On a CPU-only machine every mode computes on the CPU and moves nothing.
"""

from __future__ import annotations

import contextlib

import torch

OFFLOAD_MODES = ("off", "model", "sequential")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Placement:
    def __init__(self, flux, adapter, mode: str = "off", device=None):
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"Unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}.")
        self.flux = flux
        self.adapter = adapter
        self.mode = mode
        self.device = torch.device(device) if device is not None else default_device()
        self.offload_device = torch.device("cpu")
        self._hooks: list = []
        if mode == "off":
            for module in self._all_modules():
                module.to(self.device)
        else:
            for module in self._all_modules():
                module.to(self.offload_device)

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

    def text_encoders(self):
        return self._visiting(self.flux.text_encoder, self.flux.text_encoder_2)

    def projector(self):
        return self._visiting(self.adapter.image_proj)

    def vae(self):
        return self._visiting(self.flux.vae)

    @contextlib.contextmanager
    def transformer(self):
        t = self.flux.transformer
        layers = list(self.adapter.ip_adapter) if self.adapter is not None else []
        if self.mode != "sequential":
            with self._visiting(t, *layers):
                yield
            return
        blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
        resident = [m for name, m in t.named_children()
                    if name not in ("transformer_blocks", "single_transformer_blocks")]
        for m in resident:
            m.to(self.device)
        for i, block in enumerate(blocks):
            group = [block] + ([layers[i]] if i < len(layers) else [])
            self._hooks.append(block.register_forward_pre_hook(self._bring(group)))
            self._hooks.append(block.register_forward_hook(self._send_back(group)))
        try:
            yield
        finally:
            self._remove_hooks()
            t.to(self.offload_device)
            for layer in layers:
                layer.to(self.offload_device)

    def _bring(self, group):
        def hook(module, args):
            for m in group:
                m.to(self.device)
        return hook

    def _send_back(self, group):
        def hook(module, args, output):
            for m in group:
                m.to(self.offload_device)
        return hook

    def _remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def restore(self) -> None:
        """Undo everything a failed or cancelled run may have left: hooks, and models on the device in the
        offloading modes."""
        self._remove_hooks()
        if self.mode != "off":
            for module in self._all_modules():
                module.to(self.offload_device)


# Rough VRAM needs at 1024², bf16: everything resident ≈ 45 GB (text encoders included); with
# model-level offload the transformer + character attention + activations ≈ 30 GB.
RESIDENT_GB = 45
MODEL_OFFLOAD_GB = 30


def recommend_offload(free_bytes: int | None = None) -> tuple[str, str]:
    """The offload mode for this machine and why."""
    if free_bytes is None:
        if not torch.cuda.is_available():
            return "off", "no CUDA GPU: everything runs on the CPU, nothing to offload"
        free_bytes = torch.cuda.mem_get_info()[0]
    free_gb = free_bytes / 2**30
    if free_gb >= RESIDENT_GB:
        return "off", f"{free_gb:.0f} GiB free ≥ {RESIDENT_GB} GiB"
    if free_gb >= MODEL_OFFLOAD_GB:
        return "model", f"{free_gb:.0f} GiB free: enough for the transformer, not for all models at once"
    return "sequential", f"{free_gb:.0f} GiB free < {MODEL_OFFLOAD_GB} GiB: transformer blocks streamed one at a time"
