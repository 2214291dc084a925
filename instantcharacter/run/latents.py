"""Where a run's denoising starts: seeded noise (or noised init latents, for img2img) packed into FLUX's tokens
with their positions, the FLUX.1-dev schedule, and at the end the finished tokens unpacked into raw VAE latents.
Latent packing and the schedule are diffusers' own functions, which keeps the result identical to the official
pipeline for the same inputs and seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .settings import GenerationSettings


@dataclass
class PreparedLatents:
    """The prepared denoising state: packed latents, their token positions and the schedule."""

    latents: torch.Tensor
    image_ids: torch.Tensor
    timesteps: torch.Tensor
    lat_h: int
    lat_w: int

    @property
    def image_seq_len(self) -> int:
        return (self.lat_h // 2) * (self.lat_w // 2)


def flux_schedule(scheduler, steps: int, image_seq_len: int, device) -> torch.Tensor:
    """FLUX.1-dev timesteps (sigma × 1000): sigmas linspace(1, 1/steps), resolution-dependent shift."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    return timesteps


def seeded_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Initial noise from a CPU generator, so one seed gives one picture on any device."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), device="cpu", dtype=dtype)


def prepare_latents(flux, settings: GenerationSettings, init_latents, dtype, device) -> PreparedLatents:
    """Seeded noise (or noised init latents for img2img), packed into FLUX tokens, and the schedule."""
    scale_factor = flux.vae_scale_factor
    batch = settings.batch_size
    lat_h = 2 * (settings.height // (scale_factor * 2))
    lat_w = 2 * (settings.width // (scale_factor * 2))
    channels = flux.transformer.config.in_channels // 4

    steps, denoise = settings.steps, settings.denoise
    total = steps if denoise >= 1 else max(steps, int(round(steps / denoise)))
    timesteps = flux_schedule(flux.scheduler, total, (lat_h // 2) * (lat_w // 2), device)
    start = total - steps
    timesteps = timesteps[start:]
    flux.scheduler.set_begin_index(start)

    noise = seeded_noise(settings.seed, (batch, channels, lat_h, lat_w), dtype)
    latents = flux._pack_latents(noise, batch, channels, lat_h, lat_w).to(device)
    if init_latents is not None:
        latents = _noised_init(flux, init_latents, latents, timesteps[:1], batch, lat_h, lat_w, denoise, device)
    image_ids = flux._prepare_latent_image_ids(batch, lat_h // 2, lat_w // 2, device, dtype)
    return PreparedLatents(latents, image_ids, timesteps, lat_h, lat_w)


def _noised_init(flux, init_latents, noise_packed, first_t, batch, lat_h, lat_w, denoise, device):
    init = torch.as_tensor(init_latents).float()
    if init.ndim != 4 or init.shape[1] != 16 or tuple(init.shape[2:]) != (lat_h, lat_w):
        raise InputError(
            f"The input LATENT has shape {tuple(init.shape)} but this size needs [B, 16, {lat_h}, {lat_w}]: "
            "set width/height to the input image's size (or encode an image of the chosen size)."
        )
    if init.shape[0] not in (1, batch):
        raise InputError(f"The input LATENT holds {init.shape[0]} latents; use 1 or batch_size ({batch}).")
    init = init.expand(batch, -1, -1, -1)
    cfg = flux.vae.config
    init = (init - cfg.shift_factor) * cfg.scaling_factor
    packed = flux._pack_latents(init, batch, 16, lat_h, lat_w).to(device, noise_packed.dtype)
    if denoise >= 1:
        return noise_packed
    return flux.scheduler.scale_noise(packed, first_t, noise_packed)


def raw_latents(flux, packed: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """The finished FLUX tokens unpacked into raw VAE latents [B, 16, H/8, W/8] (ComfyUI's LATENT space)."""
    raw = flux._unpack_latents(packed, settings.height, settings.width, flux.vae_scale_factor)
    return raw / flux.vae.config.scaling_factor + flux.vae.config.shift_factor
