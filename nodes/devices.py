"""Models of ours that visit ComfyUI's device for one job."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def encoders_on_device(encoders):
    """The reference encoders on ComfyUI's torch device for the block, back on the CPU afterwards (also after
    an error or a Cancel), so they never hold VRAM between runs."""
    import comfy.model_management

    encoders.to(comfy.model_management.get_torch_device())
    try:
        yield encoders
    finally:
        encoders.to("cpu")
