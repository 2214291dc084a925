"""Tests call :func:`generate` with flat keywords; this sorts them into its settings objects and its hooks (and
``loras``, ``(path, strength)`` pairs, into the :class:`StyledFlux` it takes)."""

from dataclasses import fields

from instantcharacter.run.pipeline import generate
from instantcharacter.run.settings import GenerationSettings, MemorySettings, RunHooks
from instantcharacter.run.style_loras import LoraSpec, StyledFlux

# The smallest run that still shows a character's effect
SMALL_RUN = dict(width=64, height=64, steps=2, seed=3, max_sequence_length=32, decode=False)
_MEMORY = {f.name for f in fields(MemorySettings)}
_HOOKS = {f.name for f in fields(RunHooks)}


def run(flux, adapter, features, prompt, init_latents=None, loras=(), **kw):
    memory = MemorySettings(**{k: kw.pop(k) for k in list(kw) if k in _MEMORY})
    hooks = RunHooks(**{k: kw.pop(k) for k in list(kw) if k in _HOOKS})
    if loras:
        styled = StyledFlux.of(flux)
        flux = StyledFlux(styled.pipeline, styled.loras + tuple(map(LoraSpec.of, loras)))
    return generate(flux, adapter, features, GenerationSettings(prompt, **kw), memory, init_latents=init_latents,
                    hooks=hooks)
