"""Decoding: raw VAE latents → pictures, all at once, one image at a time or in overlapping tiles, as the
placement plans it; an out-of-memory error retries in tiles, and non-finite pixels stop the run by name."""

from __future__ import annotations

import torch

from ..cancel import cancel_points
from ..errors import NonFiniteResultError
from .offload.placement import Placement


def decode(flux, placement: Placement, raw: torch.Tensor, lat_h: int, lat_w: int,
           cancel_check) -> tuple[torch.Tensor, str]:
    """Decode as the placement plans it; an out-of-memory error retries in tiles."""
    how = placement.decode_plan(lat_h, lat_w, flux.vae.dtype)
    with placement.decoding(), cancel_points([flux.vae.decoder], cancel_check):  # per image, and per tile when tiled
        try:
            return decode_latents(flux, raw, how, cancel_check=cancel_check), how
        except torch.cuda.OutOfMemoryError:
            if how == "tiled":
                raise
            torch.cuda.empty_cache()
            return decode_latents(flux, raw, "tiled", cancel_check=cancel_check), "tiled"


DECODE_TILE_LATENT = 64  # 512-pixel tiles, overlapping by a quarter (diffusers' tiled decode)


def decode_latents(flux, raw_latents: torch.Tensor, how: str = "batch",
                   tile_latent: int = DECODE_TILE_LATENT, cancel_check=None) -> torch.Tensor:
    """Raw VAE latents [B, 16, h, w] → images [B, H, W, 3] in 0–1, on the CPU.

    ``how``: ``batch`` decodes all at once; ``per_image`` one image at a time (same result, less memory);
    ``tiled`` one image at a time in overlapping tiles blended at the seams (least memory; the seams can
    differ slightly from a whole decode)."""
    if how not in ("batch", "per_image", "tiled"):
        raise ValueError(f"Unknown decode mode {how!r}.")
    vae = flux.vae
    p = next(vae.parameters())
    chunks = [raw_latents] if how == "batch" else list(raw_latents.split(1))
    out = []
    with torch.inference_mode():
        for z in chunks:
            if cancel_check is not None:
                cancel_check()
            z = z.to(p.device, p.dtype)
            decoded = _tiled_decode(vae, z, tile_latent) if how == "tiled" else vae.decode(z, return_dict=False)[0]
            if not torch.isfinite(decoded).all():
                raise NonFiniteResultError(
                    f"The VAE decoded NaN or infinite pixels (from latents up to {float(z.abs().max()):.3g}); nothing "
                    "was written. A damaged VAE file, fp16 VAE weights that overflow (load them as bf16), or an "
                    "implausible input LATENT.")
            out.append((decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


def _tiled_decode(vae, z: torch.Tensor, tile_latent: int) -> torch.Tensor:
    # diffusers' tiled decode reads its tile sizes from the model: set ours for this call only
    saved = vae.tile_latent_min_size, vae.tile_sample_min_size
    vae.tile_latent_min_size = tile_latent
    vae.tile_sample_min_size = tile_latent * 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        return vae.tiled_decode(z, return_dict=False)[0]
    finally:
        vae.tile_latent_min_size, vae.tile_sample_min_size = saved

