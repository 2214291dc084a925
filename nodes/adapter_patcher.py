"""The adapter as a model ComfyUI's memory management loads, casts and offloads like its own add-on models.

ComfyUI moves only what its ``comfy.ops`` layers let it: under a partial (low-VRAM) load it leaves a layer on
the offload device and sets ``comfy_cast_weights`` so the layer's own forward copies its weights to the
compute device for that call. Plain ``nn.Linear`` / ``nn.LayerNorm`` cannot do that, so the adapter's layers
are switched in place to ComfyUI's layer classes (same parameters, same state dict; with casting off their
forward is the one they had). The two small raw parameters (the heads' norm scales, the resampler's latents)
copy themselves to the compute device in their forward (see model/) where ComfyUI leaves them behind.

The patcher is made as core makes its own add-on models (ControlNet, CLIP vision, model patches): with
``comfy.model_patcher.CoreModelPatcher``, which ComfyUI swaps for its dynamic-VRAM patcher at start-up where
dynamic VRAM is on (so a FLUX load with the adapter stays dynamic), and with a ``cached_patcher_init`` that loads
the adapter again from its file, so ComfyUI's multi-GPU nodes can give every device its own copy.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..instantcharacter.errors import UnsupportedModelError
from ..instantcharacter.model.attention import InputCastLinear

ADAPTER_PATCHERS = "_instantcharacter_comfy_patchers"  # on the adapter: its patcher per load device
_MANAGED = "_instantcharacter_comfy_managed"
CORE_PATCHER = "CoreModelPatcher"  # the patcher class ComfyUI makes its own add-on models with


def adapter_key(adapter) -> str:
    """The key of an adapter's patcher among a MODEL's additional models (copied per device by ComfyUI)."""
    return f"instantcharacter_adapter_{id(adapter)}"


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
            return InputCastLinear.forward(self, x)

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


def _core_patcher(adapter, disable_dynamic: bool = False):
    import comfy.model_management as mm
    import comfy.model_patcher

    cls = comfy.model_patcher.ModelPatcher
    if not disable_dynamic:
        # looked up now, not at import: main.py reassigns it when it turns dynamic VRAM on; by name, as ComfyUI
        # before dynamic VRAM (v0.16) has none
        cls = getattr(comfy.model_patcher, CORE_PATCHER, cls)
    patcher = cls(adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    source = getattr(adapter, "loaded_from", None)
    if source is not None:
        patcher.cached_patcher_init = (load_adapter_patcher, (str(source), str(adapter.dtype).removeprefix("torch.")))
    return patcher


def load_adapter_patcher(path: str, dtype: str, disable_dynamic: bool = False):
    """ComfyUI's ``cached_patcher_init`` factory: a fresh copy of the adapter from its file, with its own
    patcher (ComfyUI calls it to give another device its own adapter, or for a non-dynamic stand-in)."""
    from ..instantcharacter.files.adapter_file import load_adapter

    adapter = load_adapter(path, dtype=getattr(torch, dtype))
    make_comfy_managed(adapter)
    return _core_patcher(adapter, disable_dynamic)


def adapter_patcher(adapter, load_device=None):
    """The ModelPatcher of a loaded adapter for ``load_device`` (None: ComfyUI's main device), made on first use
    and kept with the adapter, so every Apply that uses it (and every run) is the same model to ComfyUI's memory
    management: counted once, loaded once. For another device (a MODEL moved by Select Model Device) ComfyUI
    makes the copy, from the adapter's file."""
    patchers = adapter.__dict__.setdefault(ADAPTER_PATCHERS, {})
    main = patchers.get(None)
    if main is None:
        make_comfy_managed(adapter)
        main = patchers[None] = _core_patcher(adapter)
    if load_device is None or load_device == main.load_device:
        return main
    patcher = patchers.get(load_device)
    if patcher is None:
        if main.cached_patcher_init is None or not hasattr(main, "deepclone_multigpu"):
            raise UnsupportedModelError(
                f"This MODEL runs on {load_device} and the adapter on {main.load_device}: the adapter needs its own "
                "copy there, which ComfyUI makes from the adapter's file. Load the adapter with InstantCharacter "
                "Load Adapter (and use a ComfyUI with Select Model Device, v0.22 or newer).")
        patcher = patchers[load_device] = main.deepclone_multigpu(new_load_device=load_device)
    return patcher


def follow_model_device(model_patcher, adapters) -> None:
    """Give a MODEL whose device changed after Apply the adapter copy of its device. Select Model Device's
    GPU choice copies the additional models with the MODEL; its CPU choice retargets the MODEL's patcher alone
    and would leave the adapter on the old device."""
    for adapter in adapters:
        key = adapter_key(adapter)
        found = model_patcher.get_additional_models_with_key(key)
        if found and found[0].load_device != model_patcher.load_device:
            model_patcher.set_additional_models(key, [adapter_patcher(adapter, model_patcher.load_device)])
