"""Generation: prompt + character → latents and images, over a diffusers FLUX.1-dev pipeline.

We own the denoising loop (rather than calling ``FluxPipeline.__call__``) so that the character tokens are
computed once for all steps, so that cancel/progress happen every step, and so that memory placement is
ours. Text encoding, latent packing and the schedule are diffusers' own functions, which keeps the result
identical to the official pipeline for the same weights, inputs and seed.

:func:`generate` runs in phases: check the settings, encode the prompts, prepare the latents and the
schedule, prepare the character, denoise, decode.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..model.adapter import InstantCharacterAdapter, attach
from ..reference.character import FEATURE_LIMIT, ReferenceFeatures, characters_in
from ..cancel import cancel_points
from ..errors import InputError, NonFiniteResultError
from .style_loras import StyledFlux, StyleLoras
from .offload.placement import Placement
from .offload.planner import t5_blocks
from .regions import character_weights, check_region_mask

MAX_SIZE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_SEED = 2**64 - 1


@dataclass
class GenerationResult:
    images: torch.Tensor  # [B, H, W, 3] float 0–1 on the CPU (ComfyUI IMAGE)
    latents: torch.Tensor  # [B, 16, H/8, W/8] float32 raw VAE space on the CPU (ComfyUI LATENT "samples")
    offload: str = ""  # the placement used, and why when ``auto`` chose it
    bytes_streamed: int = 0  # transformer weights copied host → device during the denoising steps
    decode: str = ""  # how the VAE decoded: batch, per_image or tiled
    # of the denoising phase's streaming: device buffers made for any one size (at most 2), host memory
    # page-locked for it, streamed bytes the driver refused to page-lock, and the bytes its plan put on the device
    streaming: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate. The defaults are the official InstantCharacter settings.

    ``denoise`` < 1 with init latents is img2img in ComfyUI's sense: a schedule of round(steps / denoise) steps
    of which the last ``steps`` run. True CFG runs when ``negative_prompt`` is given and ``true_cfg`` > 1. The
    character acts on the steps whose index i satisfies ``start_percent <= i / steps < end_percent``, with
    ``subject_scale`` times ``double_blocks_weight`` in the double-stream blocks and times
    ``single_blocks_weight`` in the single-stream ones; ``character_on_negative`` also applies it on the
    negative pass, as the official pipeline does."""

    prompt: str
    negative_prompt: str | None = None
    true_cfg: float = 1.0
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    seed: int = 0
    subject_scale: float = 0.9
    batch_size: int = 1
    denoise: float = 1.0
    max_sequence_length: int = 512
    character_on_negative: bool = True
    start_percent: float = 0.0
    end_percent: float = 1.0
    double_blocks_weight: float = 1.0
    single_blocks_weight: float = 1.0
    decode: bool = True

    @property
    def true_cfg_runs(self) -> bool:
        return self.negative_prompt is not None and self.true_cfg > 1

    def check(self) -> None:
        """Refuse settings that cannot work, before any model moves: sizes, counts and non-finite numbers."""
        check_size(self.width, self.height)
        numbers = {name: getattr(self, name) for name in ("true_cfg", "guidance", "subject_scale", "denoise",
                                                            "start_percent", "end_percent", "double_blocks_weight",
                                                            "single_blocks_weight")}
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value}.")
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps} (the character tokens of "
                             "every step are computed up front).")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InputError(f"batch_size must be between 1 and {MAX_BATCH}, got {self.batch_size}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED} (2^64 - 1), got {self.seed}.")
        if not 0 < self.denoise <= 1:
            raise InputError(f"denoise must be in (0, 1], got {self.denoise}.")
        if not 0 <= self.start_percent <= self.end_percent <= 1:
            raise InputError(f"Need 0 ≤ start_percent ≤ end_percent ≤ 1, got {self.start_percent} and "
                             f"{self.end_percent}.")


@dataclass(frozen=True)
class MemorySettings:
    """Where the models live during a run (see :mod:`.memory`): ``offload`` one of ``auto``, ``off``,
    ``budget``, ``sequential``; ``vram_budget_gb`` for ``budget``; ``fp8_storage`` keeps the transformer and
    character-attention weights in fp8; ``device`` None picks CUDA when there is one."""

    offload: str = "auto"
    vram_budget_gb: float | None = None
    fp8_storage: bool = False
    device: str | torch.device | None = None

    def check(self) -> None:
        if self.vram_budget_gb is not None and not (math.isfinite(self.vram_budget_gb) and self.vram_budget_gb > 0):
            raise InputError(f"vram_budget_gb must be a positive number of GB, got {self.vram_budget_gb}.")
        if self.device is None:
            return
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise InputError(f"device {self.device!r} is not a torch device (e.g. 'cuda', 'cuda:1' or 'cpu').") from err
        if device.type == "meta":  # moving the models there would drop their weights until they are loaded again
            raise InputError("device 'meta' holds no data: the models would lose their weights. Use 'cuda' or 'cpu'.")
        missing = not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
        if device.type == "cuda" and missing:
            raise InputError(f"device {self.device!r} is not here ({torch.cuda.device_count()} CUDA device(s) found).")


@dataclass
class _Latents:
    """The prepared denoising state: packed latents, their token positions and the schedule."""

    latents: torch.Tensor
    image_ids: torch.Tensor
    timesteps: torch.Tensor
    lat_h: int
    lat_w: int

    @property
    def image_seq_len(self) -> int:
        return (self.lat_h // 2) * (self.lat_w // 2)


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < 16 or value > MAX_SIZE:
            raise InputError(f"{name} {value} is outside 16–{MAX_SIZE} pixels (the sampler node's range).")
        if value % 16:
            lower, upper = value // 16 * 16, (value // 16 + 1) * 16
            raise InputError(
                f"{name} {value} is not a multiple of 16 (FLUX works on 16-pixel patches); use {lower} or {upper}."
            )


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


def character_tokens(adapter: InstantCharacterAdapter, features: ReferenceFeatures, timesteps: torch.Tensor,
                     dtype: torch.dtype, chunk: int = 8) -> torch.Tensor:
    """Tokens for every timestep, computed up front: [T, 1, N, token_dim]. The timestep-independent part of
    the projector runs once; the resampler runs in chunks of ``chunk`` steps."""
    proj = adapter.image_proj
    p = next(proj.parameters())
    with torch.inference_mode():
        merged = proj.merge_features(*(t.to(p.device, p.dtype) for t in features.tensors()))
        # The official code feeds the projector the timestep rounded to the model dtype.
        steps = timesteps.to(dtype).to(p.device)
        out = [proj.tokens(merged, steps[i:i + chunk]) for i in range(0, len(steps), chunk)]
    return torch.cat(out).unsqueeze(1).to(dtype)


def _encode_prompts(flux, settings: GenerationSettings, device):
    def encode(text):
        return flux.encode_prompt(prompt=text, prompt_2=None, device=device, num_images_per_prompt=settings.batch_size,
                                  max_sequence_length=settings.max_sequence_length)

    with torch.inference_mode():
        pos = encode(settings.prompt)
        neg = encode(settings.negative_prompt) if settings.true_cfg_runs else None
    return pos, neg


def _prepare_latents(flux, settings: GenerationSettings, init_latents, dtype, device) -> _Latents:
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
    return _Latents(latents, image_ids, timesteps, lat_h, lat_w)


def _attach_character(transformer, adapter, settings: GenerationSettings, image_seq_len: int):
    attachment = attach(transformer, adapter)
    attachment.context.image_seq_len = image_seq_len
    n_double = len(transformer.transformer_blocks)
    attachment.context.layer_scales = {
        i: settings.subject_scale * (settings.double_blocks_weight if i < n_double else settings.single_blocks_weight)
        for i in range(adapter.num_layers)}
    return attachment


def _denoise(flux, settings: GenerationSettings, state: _Latents, prompts, attachment, characters,
             step_callback, step_latents: bool, not_finite: Callable[[str], Exception]) -> torch.Tensor:
    """The flow-match Euler loop; the characters ((tokens per step, weight per image token) pairs) act on the
    steps inside their window. Latents that turn NaN or infinite stop the loop at that step (``not_finite`` makes
    the error): one reduction per step, cheap next to the step itself."""
    transformer = flux.transformer
    (prompt_embeds, pooled, text_ids), neg = prompts
    latents, timesteps = state.latents, state.timesteps
    guidance = torch.full([settings.batch_size], settings.guidance, device=latents.device, dtype=torch.float32)

    def predict(i, timestep, embeds, pooled_embeds, with_character: bool):
        if attachment is not None:
            acting = settings.start_percent <= i / len(timesteps) < settings.end_percent
            attachment.context.characters = (tuple((tokens[i], weight) for tokens, weight in characters)
                                             if with_character and acting else ())
        return transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=pooled_embeds, encoder_hidden_states=embeds,
                           txt_ids=text_ids, img_ids=state.image_ids, return_dict=False)[0]

    # both passes of a step see the same character tokens: the negative one reuses the positive one's keys/values
    share_keys_values = attachment is not None and neg is not None and settings.character_on_negative
    for i, t in enumerate(timesteps):
        timestep = t.expand(settings.batch_size).to(latents.dtype)
        if share_keys_values:
            attachment.context.kv_cache = {}
        noise_pred = predict(i, timestep, prompt_embeds, pooled, True)
        if neg is not None:
            neg_pred = predict(i, timestep, neg[0], neg[1], settings.character_on_negative)
            noise_pred = neg_pred + settings.true_cfg * (noise_pred - neg_pred)
        if share_keys_values:
            attachment.context.kv_cache = None
        before = latents
        latents = flux.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if not torch.isfinite(latents).all():
            raise not_finite(f"The picture became NaN or infinite at step {i + 1} of {len(timesteps)}")
        if step_callback is None:
            continue
        if step_latents:
            step_callback(i + 1, len(timesteps), _denoised(flux, settings, before, noise_pred))
        else:
            step_callback(i + 1, len(timesteps))
    return latents


def _denoised(flux, settings: GenerationSettings, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The step's estimate of the finished picture, x - sigma * v, as [B, 16, H/8, W/8] in FLUX's model latent space
    (ComfyUI's Flux latent format ``process_in`` of the VAE latent: what its previewers take)."""
    sigma = flux.scheduler.sigmas[flux.scheduler.step_index - 1]  # the step just taken
    x0 = latents - sigma.to(latents.device, latents.dtype) * velocity
    return flux._unpack_latents(x0, settings.height, settings.width, flux.vae_scale_factor).float()


def _decode(flux, placement: Placement, raw: torch.Tensor, lat_h: int, lat_w: int,
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


def generate(flux, adapter: InstantCharacterAdapter | None, features: ReferenceFeatures | None,
             settings: GenerationSettings, memory: MemorySettings = MemorySettings(), *,
             init_latents: torch.Tensor | None = None,
             step_callback: Callable[..., None] | None = None, step_latents: bool = False,
             cancel_check: Callable[[], None] | None = None) -> GenerationResult:
    """Generate ``settings.batch_size`` pictures of the character (or of the prompt alone, with neither
    ``adapter`` nor ``features``).

    ``features`` is one character acting on the whole picture (:class:`ReferenceFeatures`) or characters with
    regions (a :class:`~..reference.character.RegionalCharacter` or :class:`~..reference.character.Characters`): in every attention layer
    each character's term is multiplied by its region on the generated-image tokens, shared where regions
    overlap (:func:`~.regions.character_weights`, as on the native path).

    ``init_latents`` (raw VAE space, [1 or B, 16, H/8, W/8]) with ``settings.denoise`` < 1 is img2img.
    ``step_callback(step, total)`` is called after every step; raising from it stops the run (that is how
    Cancel works). With ``step_latents`` it is ``step_callback(step, total, denoised)``, ``denoised`` the
    step's estimate of the finished latents (for live previews, see :func:`_denoised`); without, nothing is
    unpacked. ``cancel_check()`` is called between the other phases and inside the long ones (before every
    T5 block, every decoded image or tile) and may raise the same way. ``flux`` is a FLUX pipeline or a
    :class:`~.style_loras.StyledFlux`, whose style LoRAs act for this run only. Whatever happens, the transformer's attention
    processors, its LoRA layers and the models' placement are restored before returning.
    """
    settings.check()
    memory.check()
    if (adapter is None) != (features is None):
        raise InputError("Give both the adapter and the character, or neither.")
    styled = StyledFlux.of(flux)
    cast = []
    if features is not None:
        members = characters_in(features)
        for member in members:
            member.features.check_fits(adapter.image_proj.config.feature_dim)
        if not all(torch.isfinite(t).all() for m in members for t in m.features.tensors()):
            raise InputError("The character's features hold NaN or infinite values: encode the reference again "
                             "(a picture or weight that was not finite?).")
        for member in members:  # a region black everywhere: the Character Region node refuses it, so does the API
            if member.mask is not None:
                check_region_mask(member.mask)
        patch = 2 * styled.pipeline.vae_scale_factor  # one generated token per 2×2 latent patch
        cast = character_weights(members, (settings.height // patch, settings.width // patch))
    if init_latents is not None and not torch.isfinite(torch.as_tensor(init_latents)).all():
        raise InputError("The input LATENT holds NaN or infinite values.")
    with _run_lock(styled.pipeline):  # one run at a time per pipeline: the scheduler and processors are shared
        return _generate(styled.pipeline, adapter, cast, settings, memory, init_latents, styled.loras, step_callback,
                         step_latents, cancel_check or (lambda: None))


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _run_lock(pipeline) -> threading.Lock:
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(pipeline)
            if lock is None:
                lock = _LOCKS[pipeline] = threading.Lock()
        except TypeError:  # an object without weak references: one lock for all of them
            lock = _LOCKS_GUARD_FALLBACK
    return lock


_LOCKS_GUARD_FALLBACK = threading.Lock()


def _generate(flux, adapter, cast, settings: GenerationSettings, memory: MemorySettings, init_latents, loras,
              step_callback, step_latents, cancel_check) -> GenerationResult:
    transformer, vae = flux.transformer, flux.vae
    dtype = transformer.dtype
    styles = StyleLoras(transformer, loras)  # reads and checks; changes nothing
    placement = Placement(flux, adapter, memory.offload, memory.device, budget_gb=memory.vram_budget_gb,
                          fp8=memory.fp8_storage)
    device = placement.device

    def not_finite(what: str) -> NonFiniteResultError:
        suspects = _implausible(settings, cast, init_latents, styles)
        return NonFiniteResultError(f"{what}; nothing was written. {suspects}")

    attachment = None
    try:
        styles.apply()  # before placement.denoising() builds the streamer: the LoRA layers travel with their blocks
        cancel_check()
        cfg_passes = 2 if settings.true_cfg_runs else 1
        with placement.encoding_prompts(passes=cfg_passes), cancel_points(t5_blocks(flux), cancel_check):
            prompts = _encode_prompts(flux, settings, device)
        cancel_check()
        state = _prepare_latents(flux, settings, init_latents, prompts[0][0].dtype, device)
        characters = []
        if adapter is not None:
            with placement.projecting():
                characters = [(character_tokens(adapter, member.features, state.timesteps, dtype).to(device),
                               None if weight is None else weight.to(device, dtype)) for member, weight in cast]
            if not all(torch.isfinite(tokens).all() for tokens, _ in characters):
                raise not_finite("The character tokens (the projector's output) are NaN or infinite")
            attachment = _attach_character(transformer, adapter, settings, state.image_seq_len)
            cancel_check()
        with placement.denoising(passes=len(state.timesteps) * cfg_passes), torch.inference_mode():
            latents = _denoise(flux, settings, state, prompts, attachment, characters, step_callback, step_latents,
                               not_finite)
    finally:
        if attachment is not None:
            attachment.detach()
        placement.restore()
        styles.remove()

    raw = flux._unpack_latents(latents, settings.height, settings.width, flux.vae_scale_factor)
    raw = raw / vae.config.scaling_factor + vae.config.shift_factor
    images, how = (_decode(flux, placement, raw, state.lat_h, state.lat_w, cancel_check) if settings.decode
                   else (None, ""))
    streamer = placement.streamer
    streamed = streamer.bytes_moved if streamer is not None else 0
    report = {} if streamer is None else {
        "buffers_per_size": streamer.buffers_per_size(), "pinned_bytes": streamer.pinned_bytes,
        "unpinned_bytes": placement.unpinned_bytes, "planned_bytes": placement.plan.total}
    return GenerationResult(images=images, latents=raw.float().cpu(), offload=placement.describe(),
                            bytes_streamed=streamed, decode=how, streaming=report)


def _implausible(settings: GenerationSettings, cast, init_latents, styles: StyleLoras) -> str:
    """Which inputs are far outside their plausible range, for the message of a run that turned NaN."""
    found = []
    for member, _ in cast:
        largest = member.features.largest_value()
        if not largest <= FEATURE_LIMIT:
            found.append(f"the character's features (values up to {largest:.3g}; SigLIP and DINOv2 give at most a few "
                         "thousand): encode the reference again, or use another character file")
        if abs(member.strength) > 10:
            found.append(f"a character region's strength ({member.strength:g}; the node offers 0–2)")
    scales = {"subject_scale": settings.subject_scale, "double_blocks_weight": settings.double_blocks_weight,
              "single_blocks_weight": settings.single_blocks_weight, "guidance": settings.guidance / 10}
    if settings.true_cfg_runs:
        scales["true_cfg"] = settings.true_cfg
    found += [f"{name} ({getattr(settings, name):g})" for name, value in scales.items() if abs(value) > 10]
    if init_latents is not None:
        largest = float(torch.as_tensor(init_latents).abs().max())
        if largest > 1e3:
            found.append(f"the input LATENT (values up to {largest:.3g}; VAE latents stay within a few tens)")
    found += [f"the style LoRA {lora.path.name} at strength {strength:g}" for lora, strength in styles.active
              if abs(strength) > 10]
    if found:
        return "Implausible input: " + "; ".join(found) + "."
    return ("No input is out of its range, so a model file is the likely cause: a damaged FLUX, adapter or style LoRA "
            "file, or fp16 weights that overflow (load them as bf16).")


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

