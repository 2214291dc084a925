"""Generation on the pipeline path: prompt + character → latents and images, over a diffusers FLUX.1-dev pipeline.

We own the denoising loop (rather than calling ``FluxPipeline.__call__``) so that the character tokens are
computed once for all steps, so that cancel/progress happen every step, and so that memory placement is
ours. Text encoding, latent packing and the schedule are diffusers' own functions, which keeps the result
identical to the official pipeline for the same weights, inputs and seed.

:func:`generate` runs in phases: check the inputs (:mod:`.settings`), encode the prompts, prepare the latents and
the schedule (:mod:`.latents`), compute the character tokens (:mod:`.tokens`), denoise (the loop, here), decode
(:mod:`.decoding`); the placement (:mod:`.offload`) says where the models live in each.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cancel import cancel_points
from ..errors import InputError, NonFiniteResultError
from ..model.adapter import InstantCharacterAdapter
from ..model.processors import attach
from ..reference.character import FEATURE_LIMIT, characters_in
from .decoding import decode
from .latents import PreparedLatents, prepare_latents, raw_latents
from .offload.placement import Placement
from .offload.planner import t5_blocks
from .regions import character_weights, check_region_mask
from .settings import GenerationSettings, MemorySettings, RunHooks
from .style_loras import StyledFlux, StyleLoras
from .tokens import character_tokens


@dataclass
class GenerationResult:
    """What a run gives: the pictures, their latents, and how the models were placed and decoded."""

    images: torch.Tensor  # [B, H, W, 3] float 0–1 on the CPU (ComfyUI IMAGE)
    latents: torch.Tensor  # [B, 16, H/8, W/8] float32 raw VAE space on the CPU (ComfyUI LATENT "samples")
    offload: str = ""  # the placement used, and why when ``auto`` chose it
    bytes_streamed: int = 0  # transformer weights copied host → device during the denoising steps
    decode: str = ""  # how the VAE decoded: batch, per_image or tiled
    # of the denoising phase's streaming: device buffers made for any one size (at most 2), host memory
    # page-locked for it, streamed bytes the driver refused to page-lock, and the bytes its plan put on the device
    streaming: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Run:
    """One checked call of :func:`generate`: what its phases read."""

    flux: object  # the FLUX pipeline
    loras: tuple  # the style LoRAs (LoraSpec) acting in this run
    adapter: InstantCharacterAdapter | None
    characters: list  # each acting character with its weight per generated token (None: 1 everywhere)
    settings: GenerationSettings
    memory: MemorySettings
    init_latents: torch.Tensor | None
    hooks: RunHooks


def generate(flux, adapter: InstantCharacterAdapter | None, character, settings: GenerationSettings,
             memory: MemorySettings = MemorySettings(), *, init_latents: torch.Tensor | None = None,
             hooks: RunHooks = RunHooks()) -> GenerationResult:
    """Generate ``settings.batch_size`` pictures of the character (or of the prompt alone, with neither
    ``adapter`` nor ``character``).

    ``flux`` is a FLUX pipeline or a :class:`~.style_loras.StyledFlux`, whose style LoRAs act for this run only.
    ``character`` is what a CHARACTER socket carries (:mod:`..reference.character`): one character acting on the
    whole picture, or characters with regions, whose terms are multiplied in every attention layer by their
    region on the generated-image tokens, shared where regions overlap (:func:`~.regions.character_weights`, as
    on the native path). ``init_latents`` (raw VAE space, [1 or B, 16, H/8, W/8]) with ``settings.denoise`` < 1
    is img2img. ``hooks``: progress, live previews, Cancel (:class:`~.settings.RunHooks`). Whatever happens, the
    transformer's attention processors, its LoRA layers and the models' placement are restored before returning.
    """
    settings.check()
    memory.check()
    if (adapter is None) != (character is None):
        raise InputError("Give both the adapter and the character, or neither.")
    styled = StyledFlux.of(flux)
    weighted = [] if character is None else _weighted_characters(styled.pipeline, adapter, character, settings)
    if init_latents is not None and not torch.isfinite(torch.as_tensor(init_latents)).all():
        raise InputError("The input LATENT holds NaN or infinite values.")
    run = _Run(styled.pipeline, styled.loras, adapter, weighted, settings, memory, init_latents, hooks)
    with _run_lock(styled.pipeline):  # one run at a time per pipeline: the scheduler and processors are shared
        return _generate(run)


def _weighted_characters(flux, adapter: InstantCharacterAdapter, character, settings: GenerationSettings) -> list:
    """The acting characters, each with its weight per generated token, once the adapter is known to read their
    features, the features are finite and no region is black everywhere."""
    members = characters_in(character)
    for member in members:
        member.features.check_fits(adapter.image_proj.config.feature_dim)
    if not all(torch.isfinite(t).all() for m in members for t in m.features.tensors()):
        raise InputError("The character's features hold NaN or infinite values: encode the reference again "
                         "(a picture or weight that was not finite?).")
    for member in members:  # a region black everywhere: the Character Region node refuses it, so does the API
        if member.mask is not None:
            check_region_mask(member.mask)
    patch = 2 * flux.vae_scale_factor  # one generated token per 2×2 latent patch
    return character_weights(members, (settings.height // patch, settings.width // patch))


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


def _generate(run: _Run) -> GenerationResult:
    flux, settings, hooks = run.flux, run.settings, run.hooks
    transformer = flux.transformer
    dtype = transformer.dtype
    styles = StyleLoras(transformer, run.loras)  # reads and checks; changes nothing
    memory = run.memory
    placement = Placement(flux, run.adapter, memory.offload, memory.device, budget_gb=memory.vram_budget_gb,
                          fp8=memory.fp8_storage, on_phase=hooks.on_phase)
    device = placement.device

    def not_finite(what: str) -> NonFiniteResultError:
        return NonFiniteResultError(f"{what}; nothing was written. {_implausible(run, styles)}")

    attachment = None
    try:
        styles.apply()  # before placement.denoising() builds the streamer: the LoRA layers travel with their blocks
        hooks.cancel_point()
        cfg_passes = 2 if settings.true_cfg_runs else 1
        with placement.encoding_prompts(passes=cfg_passes), cancel_points(t5_blocks(flux), hooks.cancel_check):
            prompts = _encode_prompts(flux, settings, device)
        hooks.cancel_point()
        state = prepare_latents(flux, settings, run.init_latents, prompts[0][0].dtype, device)
        tokens = []
        if run.adapter is not None:
            with placement.projecting():
                tokens = [(character_tokens(run.adapter, member.features, state.timesteps, dtype).to(device),
                           None if weight is None else weight.to(device, dtype)) for member, weight in run.characters]
            if not all(torch.isfinite(t).all() for t, _ in tokens):
                raise not_finite("The character tokens (the projector's output) are NaN or infinite")
            attachment = _attach_character(transformer, run.adapter, settings, state.image_seq_len)
            hooks.cancel_point()
        with placement.denoising(passes=len(state.timesteps) * cfg_passes), torch.inference_mode():
            latents = _denoise(run, state, prompts, attachment, tokens, not_finite)
    finally:
        if attachment is not None:
            attachment.detach()
        placement.restore()
        styles.remove()

    raw = raw_latents(flux, latents, settings)
    images, how = (decode(flux, placement, raw, state.lat_h, state.lat_w, hooks.cancel_check) if settings.decode
                   else (None, ""))
    streamer = placement.streamer
    streamed = streamer.bytes_moved if streamer is not None else 0
    report = {} if streamer is None else {
        "buffers_per_size": streamer.buffers_per_size(), "pinned_bytes": streamer.pinned_bytes,
        "unpinned_bytes": placement.unpinned_bytes, "planned_bytes": placement.plan.total}
    return GenerationResult(images=images, latents=raw.float().cpu(), offload=placement.describe(),
                            bytes_streamed=streamed, decode=how, streaming=report)


def _encode_prompts(flux, settings: GenerationSettings, device):
    def encode(text):
        return flux.encode_prompt(prompt=text, prompt_2=None, device=device, num_images_per_prompt=settings.batch_size,
                                  max_sequence_length=settings.max_sequence_length)

    with torch.inference_mode():
        pos = encode(settings.prompt)
        neg = encode(settings.negative_prompt) if settings.true_cfg_runs else None
    return pos, neg


def _attach_character(transformer, adapter, settings: GenerationSettings, image_seq_len: int):
    attachment = attach(transformer, adapter)
    attachment.context.image_seq_len = image_seq_len
    n_double = len(transformer.transformer_blocks)
    attachment.context.layer_scales = {
        i: settings.subject_scale * (settings.double_blocks_weight if i < n_double else settings.single_blocks_weight)
        for i in range(adapter.num_layers)}
    return attachment


def _denoise(run: _Run, state: PreparedLatents, prompts, attachment, characters,
             not_finite: Callable[[str], Exception]) -> torch.Tensor:
    """The flow-match Euler loop; the characters ((tokens per step, weight per image token) pairs) act on the
    steps inside their window. Latents that turn NaN or infinite stop the loop at that step (``not_finite`` makes
    the error): one reduction per step, cheap next to the step itself."""
    flux, settings, hooks = run.flux, run.settings, run.hooks
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
        if hooks.on_step is not None:
            denoised = _denoised(flux, settings, before, noise_pred) if hooks.previews else None
            hooks.on_step(i + 1, len(timesteps), denoised)
    return latents


def _denoised(flux, settings: GenerationSettings, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The step's estimate of the finished picture, x - sigma * v, as [B, 16, H/8, W/8] in FLUX's model latent space
    (ComfyUI's Flux latent format ``process_in`` of the VAE latent: what its previewers take)."""
    sigma = flux.scheduler.sigmas[flux.scheduler.step_index - 1]  # the step just taken
    x0 = latents - sigma.to(latents.device, latents.dtype) * velocity
    return flux._unpack_latents(x0, settings.height, settings.width, flux.vae_scale_factor).float()


def _implausible(run: _Run, styles: StyleLoras) -> str:
    """Which inputs are far outside their plausible range, for the message of a run that turned NaN."""
    settings, init_latents = run.settings, run.init_latents
    found = []
    for member, _ in run.characters:
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
