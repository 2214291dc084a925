"""Character tokens from a character's features: the projector's timestep-free part once per character (and
device), then the tokens per timestep. Both paths make them here: the pipeline for every step up front
(:func:`character_tokens`), the native path per model call (:class:`~.native_characters.TokenCache`). The
projector takes the timestep on the 0–1000 scale, sigma × 1000."""

from __future__ import annotations

import torch

from ..model.adapter import InstantCharacterAdapter
from ..reference.character import ReferenceFeatures


def merge_reference(adapter: InstantCharacterAdapter, features: ReferenceFeatures,
                    device: torch.device) -> torch.Tensor:
    """The projector's timestep-free part for one character, on ``device`` in the projector's dtype."""
    proj = adapter.image_proj
    # on the native path ComfyUI loads (or partly loads) the adapter and its layers cast themselves to ``device``:
    # nothing here moves a module, so its memory bookkeeping stays true
    dtype = next(proj.parameters()).dtype
    with torch.inference_mode():
        return proj.merge_features(*(t.to(device, dtype) for t in features.tensors()))


def project_tokens(adapter: InstantCharacterAdapter, merged: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The character tokens at ``timesteps`` (0–1000, on ``merged``'s device): [T, tokens, token width]."""
    with torch.inference_mode():
        return adapter.image_proj.tokens(merged, timesteps)


def character_tokens(adapter: InstantCharacterAdapter, features: ReferenceFeatures, timesteps: torch.Tensor,
                     dtype: torch.dtype, chunk: int = 8) -> torch.Tensor:
    """Tokens for every timestep, computed up front: [T, 1, N, token_dim]. The timestep-independent part of
    the projector runs once; the resampler runs in chunks of ``chunk`` steps."""
    device = next(adapter.image_proj.parameters()).device
    merged = merge_reference(adapter, features, device)
    # The official code feeds the projector the timestep rounded to the model dtype.
    steps = timesteps.to(dtype).to(device)
    out = [project_tokens(adapter, merged, steps[i:i + chunk]) for i in range(0, len(steps), chunk)]
    return torch.cat(out).unsqueeze(1).to(dtype)
