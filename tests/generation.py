"""Tests call :func:`generate` with flat keywords; this sorts them into its settings objects (and ``loras``,
``(path, strength)`` pairs, into the :class:`StyledFlux` it takes)."""

from dataclasses import fields

from instantcharacter.run.pipeline import GenerationSettings, MemorySettings, generate
from instantcharacter.run.style_loras import LoraSpec, StyledFlux

_MEMORY = {f.name for f in fields(MemorySettings)}
_CALL = {"init_latents", "step_callback", "step_latents", "cancel_check"}


def run(flux, adapter, features, prompt, **kw):
    memory = MemorySettings(**{k: kw.pop(k) for k in list(kw) if k in _MEMORY})
    call = {k: kw.pop(k) for k in list(kw) if k in _CALL}
    loras = tuple(map(LoraSpec.of, kw.pop("loras", ())))
    if loras:
        styled = StyledFlux.of(flux)
        flux = StyledFlux(styled.pipeline, styled.loras + loras)
    return generate(flux, adapter, features, GenerationSettings(prompt, **kw), memory, **call)
