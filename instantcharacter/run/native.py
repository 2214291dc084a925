"""The part of the native path (ComfyUI's own FLUX model) that needs no ComfyUI: one applied character.

ComfyUI gives a block its sigma (0–1, already shifted) in ``transformer_options["sigmas"]`` and tells which
chunks of the batch are the positive (0) and negative (1) passes in ``cond_or_uncond``. The projector takes
the timestep on the 0–1000 scale, sigma × 1000, as in the pipeline path.
"""

from __future__ import annotations

import torch

from ..model.adapter import InstantCharacterAdapter
from ..reference.encoders import ReferenceFeatures

MAX_CACHED_SIGMAS = 256


class CharacterEntry:
    """One Apply node: a character with its weight and where in the schedule it acts.

    ``sigma_start`` ≥ ``sigma_end``: the character acts while ``sigma_end <= sigma <= sigma_start``.
    Tokens are computed once per sigma (not per block) and cached until :meth:`reset`.
    """

    def __init__(self, adapter: InstantCharacterAdapter, features: ReferenceFeatures, weight: float,
                 sigma_start: float = 1.0, sigma_end: float = 0.0, on_negative: bool = True):
        self.adapter = adapter
        self.features = features
        self.weight = float(weight)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.on_negative = on_negative
        self._merged: torch.Tensor | None = None
        self._tokens: dict[float, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget per-run state (called around each sampling run)."""
        self._tokens.clear()
        self._merged = None

    def row_weights(self, options: dict, batch: int) -> torch.Tensor | None:
        """Per-row weight of the character for this model call, or None when it does not act at all."""
        if self.weight == 0:
            return None
        sigmas = options.get("sigmas")
        if sigmas is not None:
            sigma = float(torch.as_tensor(sigmas).flatten()[0])
            if not self.sigma_end - 1e-6 <= sigma <= self.sigma_start + 1e-6:
                return None
        weights = torch.full((batch,), self.weight)
        chunks = options.get("cond_or_uncond") or []
        if chunks and not self.on_negative and batch % len(chunks) == 0:
            per = batch // len(chunks)
            for i, kind in enumerate(chunks):
                if kind == 1:
                    weights[i * per:(i + 1) * per] = 0
        return weights if bool((weights != 0).any()) else None

    def _tokens_for(self, sigma: float, device: torch.device) -> torch.Tensor:
        key = round(sigma, 6)
        tokens = self._tokens.get(key)
        if tokens is None:
            proj = self.adapter.image_proj
            p = next(proj.parameters())
            if p.device != device:
                proj.to(device)
                p = next(proj.parameters())
            with torch.inference_mode():
                if self._merged is None or self._merged.device != device:
                    self._merged = proj.merge_features(*(t.to(device, p.dtype) for t in self.features.tensors()))
                t = torch.tensor([sigma * 1000.0], device=device).to(p.dtype)
                tokens = proj.tokens(self._merged, t)
            if len(self._tokens) >= MAX_CACHED_SIGMAS:
                self._tokens.clear()
            self._tokens[key] = tokens
        return tokens

    def attention(self, layer_index: int, raw_query: torch.Tensor, options: dict) -> torch.Tensor:
        """This character's attention output for one FLUX layer (not yet scaled by the row weights)."""
        sigmas = options.get("sigmas")
        sigma = float(torch.as_tensor(sigmas).flatten()[0]) if sigmas is not None else 1.0
        layer = self.adapter.ip_adapter[layer_index]
        if layer.to_k_ip.weight.device != raw_query.device:
            layer.to(raw_query.device)
        return layer(raw_query, self._tokens_for(sigma, raw_query.device))
