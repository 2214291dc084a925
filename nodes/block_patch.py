"""The native path's block patch: the character added to ComfyUI's own FLUX blocks, which run unchanged.

Each block gets a "dit" replace patch that calls the block ComfyUI hands it (``original_block``) and, only
while that call runs, two module hooks: one reads the raw image query from the output of the block's fused
qkv projection (double blocks: ``img_attn.qkv``; single blocks: the q part of ``linear1`` on the image rows),
the other adds the character attention to the input of the block's output projection (``img_attn.proj``;
the attention part of ``linear2``'s input on the image rows). That is where the official processor adds it:
to the image part of the attention output, before the output projection. With no active character the
original block runs without hooks, so the output is exactly the unpatched one. A MODEL whose blocks lack those
modules is refused by name at Apply time (:func:`check_flux_model`).

The call's state comes from the context variable the model wrappers set (:mod:`.model_wrappers`), so a block
works the same whatever a caller passes in ``transformer_options``, and a hook another thread registered on the
same shared block ignores this thread's forward. The patches hold no tensors, so they need no ``.to()``.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

import torch

from ..instantcharacter.errors import UnsupportedModelError
from ..instantcharacter.model.attention import IP_HEAD_DIM
from ..instantcharacter.run.native_characters import CharacterCall, CharacterSet
from .model_wrappers import CURRENT_CALL

log = logging.getLogger(__name__)

# the block call whose hooks may act on a forward in this thread
_BLOCK: ContextVar[object | None] = ContextVar("instantcharacter_block", default=None)

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


def _add_rows(x: torch.Tensor, rows, delta: torch.Tensor, first: int, hidden: int) -> None:
    """Add ``delta`` to batch ``rows`` (a slice or indices), tokens ``first:first + len`` and channels ``:hidden``
    of ``x``, in place.

    In place on purpose: ``x`` is the block's own attention output (or its concatenation with the MLP branch),
    used for nothing but this projection, and keeping its memory layout keeps the projection's arithmetic
    exactly as without the character for rows it does not act on (the negative pass, a masked-out region)."""
    x[rows, first:first + delta.shape[1], :hidden] += delta.to(x.dtype)


class CharacterBlockPatch:
    """The "dit" replace patch of one double or single block. It holds the characters of the patched MODEL
    (shared by all its blocks and its wrappers) and the replace patch that was there before, which it wraps.

    ``add(callback, **kwargs)`` is the protocol PuLID-Flux-ll uses to stack its own callbacks on whatever patch
    holds a block (:attr:`stacked`): they run on the block's output as PuLID's own patch would run them."""

    def __init__(self, kind: str, index: int, layer_index: int, characters: CharacterSet, previous=None):
        self.kind, self.index, self.layer_index = kind, index, layer_index
        self.characters = characters
        self.previous = previous
        self.stacked: list[tuple] = []  # (callback, kwargs) other packs added

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.x deep-copies model_options on clone(): keep sharing the characters, copy the stack
        patch = CharacterBlockPatch(self.kind, self.index, self.layer_index, self.characters, self.previous)
        patch.stacked = list(self.stacked)
        return patch

    def add(self, callback, **kwargs) -> None:
        self.stacked.append((callback, kwargs))

    # outside torch.compile's tracing: under ComfyUI's TorchCompileModel the per-call state, the hooks registered for
    # one block call and the per-block layer choice would make dynamo recompile block after block until it gives up
    # (its recompile limit); so the rest of the model still compiles, nothing recompiles per step, and the patched
    # blocks run eagerly
    @torch.compiler.disable
    def __call__(self, args, extra):
        call = CURRENT_CALL.get()
        if call is not None and call.characters is not self.characters:
            call = None  # a call of another MODEL's patches: this set has nothing to add
        inner = extra["original_block"]
        if call is not None and call.acting:
            inner = self._with_character(inner, call)
        out = self.previous(args, {**extra, "original_block": inner}) if self.previous is not None else inner(args)
        if self.stacked:
            out = self._run_stacked(args, extra, out, call)
        return out

    def _modules(self, model):
        blocks = model.double_blocks if self.kind == "double" else model.single_blocks
        block = blocks[self.index]
        if self.kind == "double":
            return block.img_attn.qkv, block.img_attn.proj
        return block.linear1, block.linear2

    def _with_character(self, inner, call: CharacterCall):
        layer_index, hidden = self.layer_index, call.hidden_size

        def run(block_args):
            query_module, output_module = self._modules(call.model)
            # double blocks see the image stream alone; single blocks see [text ; image]
            first = 0 if self.kind == "double" else block_args["img"].shape[1] - call.state.image_tokens
            rows = call.state.generated
            pending = _PendingTerm()

            # the block's modules are shared by every copy of the MODEL on this device: hooks registered by
            # another thread fire on this forward too, and act only on their own
            def after_qkv(module, inputs, output):
                if _BLOCK.get() is pending:
                    pending.delta = call.delta(layer_index, output[:, first:first + rows, :hidden])

            def before_output(module, inputs):
                if _BLOCK.get() is not pending:
                    return
                if pending.delta is None:
                    raise UnsupportedModelError(
                        f"ComfyUI's FLUX {self.kind} block {self.index} did not run its qkv projection before its "
                        f"output projection, so the character cannot be added." + _version_hint())
                _add_rows(inputs[0], call.rows, pending.delta, first, hidden)
                pending.delta = None

            handles = [query_module.register_forward_hook(after_qkv),
                       output_module.register_forward_pre_hook(before_output)]
            token = _BLOCK.set(pending)
            try:
                out = inner(block_args)
            finally:
                _BLOCK.reset(token)
                for handle in handles:
                    handle.remove()
            if pending.delta is not None:
                raise UnsupportedModelError(f"ComfyUI's FLUX {self.kind} block {self.index} never called its output "
                                            "projection, so the character was not added." + _version_hint())
            return out

        return run

    def _run_stacked(self, args, extra, out, call: CharacterCall | None):
        options = extra.get("transformer_options") or args.get("transformer_options") or {}
        if call is not None:
            sigma = call.state.sigma
        elif options.get("sigmas") is not None:
            sigma = float(torch.as_tensor(options["sigmas"]).flatten()[0])
        else:
            log.warning("InstantCharacter: a stacked %s patch was skipped: no sigma for this call", self.kind)
            return out
        img = out["img"]
        text = 0 if self.kind == "double" else (img.shape[1] - call.state.image_tokens if call is not None else 0)
        base = img[:, text:]
        result = base
        for callback, kwargs in self.stacked:
            if kwargs.get("sigma_start", float("inf")) >= sigma >= kwargs.get("sigma_end", float("-inf")):
                rest = {k: v for k, v in kwargs.items() if k not in ("sigma_start", "sigma_end")}
                result = result + callback(base, **rest, transformer_options=options)
        out = dict(out)
        out["img"] = result if text == 0 else torch.cat((img[:, :text], result), dim=1)
        return out


class _PendingTerm:
    """One block call's character term, between its two hooks."""

    __slots__ = ("delta",)

    def __init__(self):
        self.delta = None
