"""Regions of the generated picture a character is confined to: a mask resampled to FLUX's token grid.

FLUX packs the latent in 2×2 patches and orders the tokens row by row, so a region is the mask resized to
(latent height / 2, latent width / 2) and flattened. Soft masks stay soft. Where several regions overlap by
more than 1 in total, each is divided by the total there, so overlapping characters share the strength
instead of adding up past it. (The characters themselves: :mod:`..reference.character`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..reference.character import RegionalCharacter


def check_region_mask(mask: torch.Tensor) -> torch.Tensor:
    """A region mask as Character Region accepts it: one finite 2-D mask (or a batch of one) that is not black
    everywhere. Returns it as a float [H, W] on the CPU."""
    m = torch.as_tensor(mask).detach().float().cpu()
    token_region(m, (1, 1))  # the shape and finiteness checks
    m = m[0] if m.ndim == 3 else m
    if not (m > 0).any():
        raise InputError("The region mask is black everywhere, so this character would not appear anywhere: white "
                         "marks where the character goes.")
    return m


def token_region(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``mask`` (a ComfyUI MASK: [H, W] or [1, H, W], 1 = the character's place) → weights [grid h · grid w]
    in 0–1, one per generated image token."""
    m = torch.as_tensor(mask).detach().float()
    image = (m.ndim == 4 and m.shape[-1] in (1, 3, 4)) or (m.ndim == 3 and m.shape[0] != 1 and m.shape[-1] in (3, 4))
    if image:  # ComfyUI's IMAGE is [B, H, W, C]; a picture on its own [H, W, C]
        raise InputError(f"The character region got an IMAGE ({tuple(m.shape)}: {m.shape[-1]} colour channels), not a "
                         "MASK: convert it with ComfyUI's Convert Image to Mask (ImageToMask), or draw the region as "
                         "a mask (SolidMask, MaskComposite).")
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


def character_weights(members: tuple[RegionalCharacter, ...], grid: tuple[int, int]
                      ) -> list[tuple[RegionalCharacter, torch.Tensor | None]]:
    """Each acting character (strength ≠ 0) with its weight per generated token: its region, shared where it
    overlaps others (:func:`share_overlaps`), times its strength; None for a character everywhere at strength 1,
    which then acts exactly as a lone character always has."""
    acting = [m for m in members if m.strength != 0]
    regions = share_overlaps([None if m.mask is None else token_region(m.mask, grid) for m in acting])
    out = []
    for member, region in zip(acting, regions):
        if region is None:
            weight = None if member.strength == 1 else torch.full((grid[0] * grid[1],), float(member.strength))
        else:
            weight = region * member.strength if member.strength != 1 else region
        out.append((member, weight))
    return out
