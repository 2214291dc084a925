"""The native path: the character added to ComfyUI's own FLUX blocks, which run unchanged.

Each block gets a "dit" replace patch that calls the block ComfyUI hands it (``original_block``) and, only
while that call runs, two module hooks: one reads the raw image query from the output of the block's fused
qkv projection (double blocks: ``img_attn.qkv``; single blocks: the q part of ``linear1`` on the image rows),
the other adds the character attention to the input of the block's output projection (``img_attn.proj``;
the attention part of ``linear2``'s input on the image rows). That is where the official processor adds it:
to the image part of the attention output, before the output projection. With no active character the
original block runs without hooks, so the output is exactly the unpatched one.

Per-call state (sigma, negative rows, text length, the generated-token grid) comes from one
``DIFFUSION_MODEL`` wrapper; per-run state (the schedule window in sigmas, which conditioning is negative)
from one ``OUTER_SAMPLE`` wrapper. Blocks therefore work the same whatever a caller passes in
``transformer_options`` (TeaCache-style callers pass none, PuLID-Flux-ll passes them in the second dict).
"""

from __future__ import annotations

import logging

import torch

from ..instantcharacter.errors import UnsupportedModelError
from ..instantcharacter.model.attention import IP_HEAD_DIM
from ..instantcharacter.run.native import CallState, CharacterSet

log = logging.getLogger(__name__)


def _eager(fn):
    """Run ``fn`` (and what it calls) outside torch.compile's tracing. Under ComfyUI's TorchCompileModel the
    per-call state, the hooks registered for one block call and the per-block layer choice would otherwise make
    dynamo recompile block after block until it gives up (its recompile limit); outside tracing, the rest of
    the model still compiles and nothing recompiles per step. The patched blocks then run eagerly."""
    disable = getattr(getattr(torch, "_dynamo", None), "disable", None)
    return disable(fn) if disable is not None else fn

WRAPPER_KEY = "instantcharacter"
NOT_FLUX = ("InstantCharacter Apply works on a FLUX.1-dev MODEL (Load Diffusion Model, a GGUF or fp8 loader); "
            "this one {}.")


def _out_features(module) -> int | None:
    weight = getattr(module, "weight", None)
    if getattr(module, "out_features", None) is not None:
        return module.out_features
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def check_flux_model(diffusion, adapter) -> None:
    """Raise :class:`UnsupportedModelError` unless ``diffusion`` is a FLUX.1 model whose blocks have the modules
    the hooks use, at the adapter's sizes. Run at Apply time, so a wrong MODEL fails before sampling."""
    name = type(diffusion).__name__
    doubles, singles = getattr(diffusion, "double_blocks", None), getattr(diffusion, "single_blocks", None)
    if doubles is None or singles is None:
        raise UnsupportedModelError(NOT_FLUX.format(f"is a {name} (no FLUX double/single blocks: SDXL, SD3 or "
                                                    "another family?)"))
    if len(doubles) + len(singles) != adapter.num_layers or getattr(diffusion, "hidden_size", None) != adapter.hidden_size:
        raise UnsupportedModelError(NOT_FLUX.format(
            f"has {len(doubles)}+{len(singles)} blocks of width {getattr(diffusion, 'hidden_size', '?')}, but the "
            f"adapter was made for {adapter.num_layers} layers of {adapter.hidden_size} (FLUX.1-dev: 19+38 of 3072)"))
    hidden = adapter.hidden_size
    for i, block in enumerate(doubles):
        attn = getattr(block, "img_attn", None)
        problem = None
        if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "proj"):
            problem = "has no img_attn.qkv / img_attn.proj"
        elif getattr(block, "img_mod", None) is None:
            problem = "has no per-block modulation (a Chroma or FLUX.2-style model)"
        elif _out_features(attn.qkv) not in (None, 3 * hidden):
            problem = f"has a qkv projection of {_out_features(attn.qkv)} features, not {3 * hidden}"
        elif getattr(block, "num_heads", hidden // IP_HEAD_DIM) * IP_HEAD_DIM != hidden:
            problem = f"has heads of {hidden // block.num_heads}, not {IP_HEAD_DIM}"
        if problem:
            raise UnsupportedModelError(NOT_FLUX.format(f"is a {name} whose double block {i} {problem}") +
                                        _version_hint())
    for i, block in enumerate(singles):
        problem = None
        if not hasattr(block, "linear1") or not hasattr(block, "linear2"):
            problem = "has no linear1 / linear2"
        elif getattr(block, "modulation", None) is None:
            problem = "has no per-block modulation (a Chroma or FLUX.2-style model)"
        else:
            mlp = getattr(block, "mlp_hidden_dim_first", getattr(block, "mlp_hidden_dim", None))
            out = _out_features(block.linear1)
            if mlp is not None and out not in (None, 3 * hidden + mlp):
                problem = f"has a linear1 of {out} features, not {3 * hidden + mlp}"
        if problem:
            raise UnsupportedModelError(NOT_FLUX.format(f"is a {name} whose single block {i} {problem}") +
                                        _version_hint())


def _version_hint() -> str:
    return (" If this is FLUX.1-dev, this ComfyUI builds its FLUX blocks differently from the versions "
            "InstantCharacter is tested on (see the README); please report it with your ComfyUI version.")


def _add_rows(x: torch.Tensor, delta: torch.Tensor, first: int, hidden: int) -> None:
    """Add ``delta`` to rows ``first:first + len`` and channels ``:hidden`` of ``x``, in place.

    In place on purpose: ``x`` is the block's own attention output (or its concatenation with the MLP branch),
    used for nothing but this projection, and keeping its memory layout keeps the projection's arithmetic
    exactly as without the character for rows whose weight is 0 (the negative pass, a masked-out region)."""
    x[:, first:first + delta.shape[1], :hidden] += delta.to(x.dtype)


class CharacterBlockPatch:
    """The "dit" replace patch of one double or single block. It holds the characters of the patched MODEL
    (shared by all its blocks and its wrappers) and the replace patch that was there before, which it wraps.

    ``add(callback, **kwargs)`` is the protocol PuLID-Flux-ll uses to stack its own callbacks on whatever patch
    holds a block: they run on the block's output as PuLID's own patch would run them."""

    def __init__(self, kind: str, index: int, layer_index: int, characters: CharacterSet, previous=None):
        self.kind, self.index, self.layer_index = kind, index, layer_index
        self.characters = characters
        self.previous = previous
        self.foreign: list[tuple] = []

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.x deep-copies model_options on clone(): keep sharing the characters, copy the stack
        patch = CharacterBlockPatch(self.kind, self.index, self.layer_index, self.characters, self.previous)
        patch.foreign = list(self.foreign)
        return patch

    def add(self, callback, **kwargs) -> None:
        self.foreign.append((callback, kwargs))

    @_eager
    def __call__(self, args, extra):
        call = self.characters.call
        inner = extra["original_block"]
        active = self.characters.active(call) if call is not None else []
        if active:
            inner = self._with_character(inner, call, active)
        out = self.previous(args, {**extra, "original_block": inner}) if self.previous is not None else inner(args)
        if self.foreign:
            out = self._run_foreign(args, extra, out, call)
        return out

    def _modules(self, model):
        blocks = model.double_blocks if self.kind == "double" else model.single_blocks
        block = blocks[self.index]
        if self.kind == "double":
            return block.img_attn.qkv, block.img_attn.proj
        return block.linear1, block.linear2

    def _with_character(self, inner, call: CallState, active):
        characters, layer_index = self.characters, self.layer_index
        hidden = active[0][0].adapter.hidden_size

        def run(block_args):
            query_module, output_module = self._modules(characters.model)
            # double blocks see the image stream alone; single blocks see [text ; image]
            first = 0 if self.kind == "double" else block_args["img"].shape[1] - call.image_tokens
            rows = call.generated
            box = {}

            def after_qkv(module, inputs, output):
                box["delta"] = characters.delta(layer_index, output[:, first:first + rows, :hidden], call, active)

            def before_output(module, inputs):
                if "delta" not in box:
                    raise UnsupportedModelError(
                        f"ComfyUI's FLUX {self.kind} block {self.index} did not run its qkv projection before its "
                        f"output projection, so the character cannot be added." + _version_hint())
                _add_rows(inputs[0], box.pop("delta"), first, hidden)

            handles = [query_module.register_forward_hook(after_qkv),
                       output_module.register_forward_pre_hook(before_output)]
            try:
                out = inner(block_args)
            finally:
                for handle in handles:
                    handle.remove()
            if "delta" in box:
                raise UnsupportedModelError(f"ComfyUI's FLUX {self.kind} block {self.index} never called its output "
                                            "projection, so the character was not added." + _version_hint())
            return out

        return run

    def _run_foreign(self, args, extra, out, call: CallState | None):
        options = extra.get("transformer_options") or args.get("transformer_options") or {}
        if call is not None:
            sigma = call.sigma
        elif options.get("sigmas") is not None:
            sigma = float(torch.as_tensor(options["sigmas"]).flatten()[0])
        else:
            log.warning("InstantCharacter: a stacked %s patch was skipped: no sigma for this call", self.kind)
            return out
        img = out["img"]
        text = 0 if self.kind == "double" else (img.shape[1] - call.image_tokens if call is not None else 0)
        base = img[:, text:]
        result = base
        for callback, kwargs in self.foreign:
            if kwargs.get("sigma_start", float("inf")) >= sigma >= kwargs.get("sigma_end", float("-inf")):
                rest = {k: v for k, v in kwargs.items() if k not in ("sigma_start", "sigma_end")}
                result = result + callback(base, **rest, transformer_options=options)
        out = dict(out)
        out["img"] = result if text == 0 else torch.cat((img[:, :text], result), dim=1)
        return out


def call_state(characters: CharacterSet, model, x, timestep, context, ref_latents, options) -> CallState:
    """What one model call tells the characters (one host sync: the sigma)."""
    patch = getattr(model, "patch_size", 2)

    def tokens(latent):
        return ((latent.shape[-2] + patch // 2) // patch), ((latent.shape[-1] + patch // 2) // patch)

    grid = tokens(x)
    references = sum(h * w for h, w in map(tokens, ref_latents or []))
    sigma = float(torch.as_tensor(timestep).flatten()[0])
    negative = characters.negative_rows(x.shape[0], options.get("cond_or_uncond"), options.get("uuids"))
    return CallState(sigma=sigma, negative_rows=negative, text_len=context.shape[1], grid=grid,
                     image_tokens=grid[0] * grid[1] + references, device=x.device)


def diffusion_model_wrapper(characters: CharacterSet):
    """A ``DIFFUSION_MODEL`` wrapper that gives every block of this model call the call's state."""

    @_eager
    def begin(executor, x, timestep, context, ref_latents, options):
        previous = characters.call, getattr(characters, "model", None)
        characters.model = executor.class_obj
        characters.call = call_state(characters, executor.class_obj, x, timestep, context, ref_latents, options)
        return previous

    @_eager
    def end(previous):
        characters.call, characters.model = previous

    def wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kwargs):
        options = transformer_options or {}
        previous = begin(executor, x, timestep, context, ref_latents, options)
        try:
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        finally:
            end(previous)

    return wrapper


def outer_sample_wrapper(characters: CharacterSet):
    """An ``OUTER_SAMPLE`` wrapper: the window in sigmas of the model being sampled (after any sampling-shift
    node), which conditioning is the negative one, and fresh token caches for the run."""

    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        sampling = guider.model_patcher.get_model_object("model_sampling")
        conds = getattr(guider, "conds", None) or {}
        negative = {c.get("uuid") for c in conds.get("negative", []) if isinstance(c, dict)} - {None}
        characters.begin_run(sampling.percent_to_sigma, negative)
        try:
            return executor(*args, **kwargs)
        finally:
            characters.end_run()

    return wrapper
