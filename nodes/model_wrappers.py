"""The native path's model wrappers: where each model call and each sampling run get their character state.

State lives where its scope is, as ComfyUI's own patches keep it (EasyCache): the run's (the window in sigmas,
which conditioning is negative, the token cache) in ``transformer_options`` of the run, put there by an
``OUTER_SAMPLE`` wrapper, so it reaches every model call whatever thread runs it; the call's in context
variables of the thread running it, set by an ``APPLY_MODEL`` wrapper (the adapter copy of the patcher being
called: under MultiGPU CFG Split or Select Model Device each device has its own) and a ``DIFFUSION_MODEL``
wrapper (sigma, negative rows, token grid, the diffusion model whose blocks get the hooks). The blocks
(:mod:`.block_patch`) read the call's state from there, so they work the same whatever a caller passes in
``transformer_options`` (TeaCache-style callers pass none, PuLID-Flux-ll passes them in the second dict).
Nothing per call is written on an object another call reads.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch

from ..instantcharacter.run.native_characters import CallState, CharacterCall, CharacterSet, RunState
from .adapter_patcher import adapter_key, follow_model_device

WRAPPER_KEY = "instantcharacter"
RUN_KEY = "instantcharacter_run"  # the run's RunState in the run's transformer_options

# what the model call running in this thread asks of the characters (each thread has its own value)
CURRENT_CALL: ContextVar[CharacterCall | None] = ContextVar("instantcharacter_call", default=None)
# the adapter copies of the patcher being called, per entry: (CharacterSet, adapters)
_ADAPTERS: ContextVar[tuple | None] = ContextVar("instantcharacter_adapters", default=None)


def call_state(run: RunState, model, x, timestep, context, ref_latents, options) -> CallState:
    """What one model call tells the characters (one host sync: the sigma)."""
    patch = getattr(model, "patch_size", 2)

    def tokens(latent):
        return ((latent.shape[-2] + patch // 2) // patch), ((latent.shape[-1] + patch // 2) // patch)

    grid = tokens(x)
    references = sum(h * w for h, w in map(tokens, ref_latents or []))
    sigma = float(torch.as_tensor(timestep).flatten()[0])
    negative = run.negative_rows(x.shape[0], options.get("cond_or_uncond"), options.get("uuids"))
    return CallState(sigma=sigma, negative_rows=negative, text_len=context.shape[1], grid=grid,
                     image_tokens=grid[0] * grid[1] + references, device=x.device)


def device_adapters(characters: CharacterSet, patcher) -> tuple:
    """The adapter of each entry as the patcher being called holds it: its own copy under MultiGPU CFG Split or
    Select Model Device (ComfyUI copies additional models per device), else the one Apply was given."""
    adapters = []
    for entry in characters.entries:
        found = patcher.get_additional_models_with_key(adapter_key(entry.adapter)) if patcher is not None else []
        adapters.append(found[0].model if found else entry.adapter)
    return tuple(adapters)


def apply_model_wrapper(characters: CharacterSet):
    """An ``APPLY_MODEL`` wrapper: the model being called (``BaseModel``) knows its patcher, and so the adapter
    copies of its device, for this call."""

    def wrapper(executor, *args, **kwargs):
        patcher = getattr(executor.class_obj, "current_patcher", None)
        token = _ADAPTERS.set((characters, device_adapters(characters, patcher)))
        try:
            return executor(*args, **kwargs)
        finally:
            _ADAPTERS.reset(token)

    return wrapper


def diffusion_model_wrapper(characters: CharacterSet):
    """A ``DIFFUSION_MODEL`` wrapper that gives every block of this model call the call's state."""

    @torch.compiler.disable  # outside torch.compile's tracing, as the block patch (see there)
    def begin(executor, x, timestep, context, ref_latents, options):
        run = options.get(RUN_KEY)
        if getattr(run, "characters", None) is not characters:
            run = characters.outside_runs
        bound = _ADAPTERS.get()
        adapters = bound[1] if bound is not None and bound[0] is characters else [e.adapter for e in characters.entries]
        state = call_state(run, executor.class_obj, x, timestep, context, ref_latents, options)
        return CURRENT_CALL.set(run.call(state, adapters, executor.class_obj))

    @torch.compiler.disable
    def end(token):
        CURRENT_CALL.reset(token)

    def wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kwargs):
        token = begin(executor, x, timestep, context, ref_latents, transformer_options or {})
        try:
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        finally:
            end(token)

    return wrapper


def outer_sample_wrapper(characters: CharacterSet):
    """An ``OUTER_SAMPLE`` wrapper: the run's state (the window in sigmas of the model being sampled, after any
    sampling-shift node; which conditioning is the negative one; fresh token caches) in the run's own copy of the
    model options, as ComfyUI's EasyCache keeps its per-run holder; dropped with the run."""

    def wrapper(executor, *args, **kwargs):
        import comfy.model_patcher

        guider = executor.class_obj
        follow_model_device(guider.model_patcher, {id(e.adapter): e.adapter for e in characters.entries}.values())
        sampling = guider.model_patcher.get_model_object("model_sampling")
        conds = getattr(guider, "conds", None) or {}
        negative = {c.get("uuid") for c in conds.get("negative", []) if isinstance(c, dict)} - {None}
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = characters.run(
            sampling.percent_to_sigma, negative)
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    return wrapper
