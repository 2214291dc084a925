"""Import the official InstantCharacter code (a checkout named by INSTANTCHARACTER_REFERENCE_DIR) on the
libraries we test with, for parity tests only.

The official code at 5f5c49a does not import as-is on current libraries, so this harness supplies what
it is missing without changing its math:

* ``timm`` (it only uses ``timm.models.vision_transformer.Mlp``; timm needs torchvision, which has no
  CPU build here) — a stand-in with timm's parameter names and forward (fc1 → act → fc2);
* the names its ``from diffusers.pipelines.flux.pipeline_flux import *`` no longer provides
  (``Union``, ``np``, ``calculate_shift`` …) — pre-seeded into the module namespace;
* ``head_to_batch_dim`` / ``batch_to_head_dim`` on diffusers' ``FluxAttention``, which the old
  ``Attention`` class had.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import typing
from pathlib import Path

REFERENCE_ENV = "INSTANTCHARACTER_REFERENCE_DIR"


def reference_dir() -> Path | None:
    value = os.environ.get(REFERENCE_ENV)
    if value and (Path(value) / "pipeline.py").is_file():
        return Path(value)
    return None


def _install_timm_standin() -> None:
    if "timm.models.vision_transformer" in sys.modules:
        return
    import torch.nn as nn

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0, **_):
            super().__init__()
            hidden_features = hidden_features or in_features
            self.fc1 = nn.Linear(in_features, hidden_features)
            self.act = act_layer()
            self.fc2 = nn.Linear(hidden_features, out_features or in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    vit = types.ModuleType("timm.models.vision_transformer")
    vit.Mlp = Mlp
    models = types.ModuleType("timm.models")
    models.vision_transformer = vit
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.vision_transformer": vit})


def _add_attention_reshapes() -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttention

    if hasattr(FluxAttention, "head_to_batch_dim"):
        return

    def head_to_batch_dim(self, tensor, out_dim=3):
        b, n, d = tensor.shape
        tensor = tensor.reshape(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3)
        return tensor.reshape(b * self.heads, n, d // self.heads) if out_dim == 3 else tensor

    def batch_to_head_dim(self, tensor):
        bh, n, d = tensor.shape
        b = bh // self.heads
        return tensor.reshape(b, self.heads, n, d).permute(0, 2, 1, 3).reshape(b, n, d * self.heads)

    FluxAttention.head_to_batch_dim = head_to_batch_dim
    FluxAttention.batch_to_head_dim = batch_to_head_dim


def load_reference(root: Path):
    """Return the official ``pipeline`` module (with ``InstantCharacterFluxPipeline``)."""
    import numpy as np
    from diffusers.pipelines.flux import pipeline_flux
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
    from diffusers.utils import replace_example_docstring

    _install_timm_standin()
    _add_attention_reshapes()
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("models.attn_processor")
        importlib.import_module("models.resampler")
        spec = importlib.util.spec_from_file_location("instantcharacter_reference_pipeline", root / "pipeline.py")
        module = importlib.util.module_from_spec(spec)
        # seeded before the module runs, so its star-import's missing names are there when it needs them
        namespace = module.__dict__
        namespace.update({name: getattr(typing, name) for name in
                          ("Any", "Callable", "Dict", "List", "Optional", "Union")})
        namespace.update(np=np, calculate_shift=pipeline_flux.calculate_shift,
                         retrieve_timesteps=pipeline_flux.retrieve_timesteps, FluxPipelineOutput=FluxPipelineOutput,
                         replace_example_docstring=replace_example_docstring, XLA_AVAILABLE=False,
                         PipelineImageInput=typing.Any)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(root))
