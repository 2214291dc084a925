"""Tests call :func:`generate` with flat keywords; this sorts them into its two settings objects."""

from dataclasses import fields

from instantcharacter.run.pipeline import GenerationSettings, MemorySettings, generate

_MEMORY = {f.name for f in fields(MemorySettings)}
_CALL = {"init_latents", "loras", "step_callback", "step_latents", "cancel_check"}


def run(flux, adapter, features, prompt, **kw):
    memory = MemorySettings(**{k: kw.pop(k) for k in list(kw) if k in _MEMORY})
    call = {k: kw.pop(k) for k in list(kw) if k in _CALL}
    return generate(flux, adapter, features, GenerationSettings(prompt, **kw), memory, **call)
