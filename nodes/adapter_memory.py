"""The adapter as a model ComfyUI's memory management loads, casts and offloads like its own.

ComfyUI moves only what its ``comfy.ops`` layers let it: under a partial (low-VRAM) load it leaves a layer on
the offload device and sets ``comfy_cast_weights`` so the layer's own forward copies its weights to the
compute device for that call. Plain ``nn.Linear`` / ``nn.LayerNorm`` cannot do that, so the adapter's layers
are switched in place to ComfyUI's layer classes (same parameters, same state dict; with casting off their
forward is the one they had). The two small raw parameters (the heads' norm scales, the resampler's latents)
copy themselves to the compute device in their forward (see model/).
"""

from __future__ import annotations

import functools

from torch import nn

from ..instantcharacter.errors import UnsupportedModelError
from ..instantcharacter.model.attention import _InputCastLinear

ADAPTER_PATCHER = "_instantcharacter_comfy_patcher"
_MANAGED = "_instantcharacter_comfy_managed"


@functools.cache
def _input_cast_linear_class():
    import comfy.ops

    base = comfy.ops.disable_weight_init.Linear

    class ComfyInputCastLinear(base):
        """ComfyUI's Linear that first casts its input to the weight's dtype, as the adapter's key/value layers
        do (FLUX may run in bf16 with the adapter in fp32)."""

        def forward(self, x):
            dtype = self.weight.dtype
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return base.forward(self, x.to(dtype))
            return _InputCastLinear.forward(self, x)

    return ComfyInputCastLinear


def make_comfy_managed(adapter: nn.Module) -> None:
    """Switch every parameter-holding layer of ``adapter`` to a ComfyUI casting layer (once per adapter). An
    unknown layer is refused by name rather than left for ComfyUI to skip."""
    if adapter.__dict__.get(_MANAGED):
        return
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    input_cast = _input_cast_linear_class()
    plan = []
    for name, module in adapter.named_modules():
        # told apart by what the classes declare, not by identity: tests import the package twice
        if hasattr(module, "comfy_cast_weights"):  # already one of ComfyUI's layers
            continue
        if isinstance(module, nn.Linear) and getattr(module, "casts_input_to_weight_dtype", False):
            plan.append((module, input_cast))
        elif type(module) is nn.Linear:
            plan.append((module, ops.Linear))
        elif type(module) is nn.LayerNorm:
            plan.append((module, ops.LayerNorm))
        elif next(module.parameters(recurse=False), None) is not None and not getattr(
                module, "casts_own_parameters", False):
            raise UnsupportedModelError(
                f"The adapter's layer {name or '(root)'} ({type(module).__name__}) is not one ComfyUI's memory "
                f"management can load or offload. This adapter is not the published InstantCharacter layout.")
    for module, cls in plan:
        module.__class__ = cls
    adapter.__dict__[_MANAGED] = True


def adapter_patcher(adapter):
    """The one ModelPatcher of a loaded adapter, made on first use and kept with the adapter, so every Apply that
    uses it (and every run) is the same model to ComfyUI's memory management: counted once, loaded once."""
    import comfy.model_management as mm
    import comfy.model_patcher

    patcher = adapter.__dict__.get(ADAPTER_PATCHER)
    if patcher is None:
        make_comfy_managed(adapter)
        patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        adapter.__dict__[ADAPTER_PATCHER] = patcher
    return patcher

