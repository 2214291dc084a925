"""Regions of the generated picture a character is confined to: a mask resampled to FLUX's token grid.

FLUX packs the latent in 2×2 patches and orders the tokens row by row, so a region is the mask resized to
(latent height / 2, latent width / 2) and flattened. Soft masks stay soft. Where several regions overlap by
more than 1 in total, each is divided by the total there, so overlapping characters share the strength
instead of adding up past it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError


def token_region(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``mask`` (a ComfyUI MASK: [H, W] or [1, H, W], 1 = the character's place) → weights [grid h · grid w]
    in 0–1, one per generated image token."""
    m = torch.as_tensor(mask).detach().float()
    if m.ndim == 3:
        if m.shape[0] != 1:
            raise InputError(f"A character region is one mask; this MASK holds {m.shape[0]}. Use one mask (e.g. "
                             "pick one with an ImageFromBatch-style node).")
        m = m[0]
    if m.ndim != 2 or m.numel() == 0:
        raise InputError(f"A character region must be a 2-D mask, got shape {tuple(m.shape)}.")
    if not torch.isfinite(m).all():
        raise InputError("The character region mask holds NaN or infinite values.")
    h, w = grid
    shrinking = m.shape[0] >= h and m.shape[1] >= w
    resized = F.interpolate(m[None, None], size=(h, w), mode="area" if shrinking else "bilinear",
                            **({} if shrinking else {"align_corners": False}))
    return resized.clamp(0, 1).flatten()


def share_overlaps(regions: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Divide overlapping regions by their total where it exceeds 1; ``None`` (no region: everywhere) stays."""
    present = [r for r in regions if r is not None]
    if len(present) < 2:
        return regions
    total = torch.stack(present).sum(0).clamp(min=1.0)
    return [None if r is None else r / total for r in regions]
