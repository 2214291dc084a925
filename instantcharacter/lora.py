"""Style LoRAs for the pipeline path: FLUX.1 LoRA files applied to the diffusers transformer for one run.

Formats are the ones diffusers' FLUX LoRA loader reads (``FluxPipeline.lora_state_dict``): kohya / sd-scripts
(``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` with ``.alpha``), ComfyUI-saved
(``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight`` / ``lora_down``), XLabs
(``double_blocks.0.processor.qkv_lora1.down.weight``) and diffusers / PEFT / ai-toolkit
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``). Files that use FLUX's original layer names with
PEFT's ``lora_A``/``lora_B`` spelling (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, as BFL and
some trainers write them) are renamed to the ComfyUI spelling first, the only one diffusers reads for those names.
Anything else (an SD 1.5/SDXL LoRA, LyCORIS LoKr/LoHa, a FLUX Control LoRA, a full checkpoint, a damaged file)
gets a :class:`LoraFileError` that names the file and says what it looks like.

Only the transformer part of a file is used. Text-encoder parts (CLIP ``lora_te1_*`` / ``text_encoder.*``;
diffusers already drops T5 parts) are skipped with a log line: the prompt is encoded by the base text encoders,
as with ComfyUI's "LoraLoaderModelOnly". Style LoRAs for FLUX are almost always transformer-only.

Nothing is merged into the base weights. Each LoRA becomes a PEFT adapter (a low-rank branch beside the layer it
changes) scaled by its strength; :meth:`StyleLoras.remove` takes the branches out again and leaves the module tree,
the state_dict and every parameter (same tensor, same values, same ``requires_grad``) as they were. The branches
are sub-modules of the blocks they change, so they travel with their blocks under every offload mode as long as
they are applied before the block streamer is built and removed after it is closed (``pipeline.generate`` does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .cache import file_key
from .errors import InputError, InstantCharacterError, LoraFileError

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "instantcharacter_style_"
# Parsed LoRAs kept in host memory, most recently used first (always at least the last one).
CACHE_BYTES = 4 * 2**30
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Top-level layer names of FLUX's original (BFL) layout, used by ComfyUI, kohya and BFL files.
BFL_TOP_LEVEL = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                 "final_layer")
# Top-level children of diffusers' FluxTransformer2DModel.
DIFFUSERS_TOP_LEVEL = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                       "time_text_embed", "norm_out", "proj_out")
UNET_NAMES = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
_UNSET = object()


@dataclass(frozen=True)
class LoraSpec:
    """One style LoRA of a run: a file and its strength (1 = as trained, 0 = off, negative = the opposite)."""

    path: str
    strength: float = 1.0

    @classmethod
    def of(cls, item) -> "LoraSpec":
        """A LoraSpec from a LoraSpec or a ``(path, strength)`` pair."""
        if isinstance(item, LoraSpec):
            return item
        path, strength = item
        return cls(os.fspath(path), float(strength))


@dataclass(frozen=True)
class ParsedLora:
    """The transformer part of a LoRA file in diffusers/PEFT naming (every key starts with ``transformer.``)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    network_alphas: dict[str, torch.Tensor] | None
    metadata: dict | None  # diffusers' adapter metadata from the safetensors header (rank, alpha), if any
    skipped: int  # text-encoder tensors left out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_cache: OrderedDict[tuple, ParsedLora] = OrderedDict()
_cache_lock = threading.Lock()


def read_lora(path: str | os.PathLike) -> ParsedLora:
    """Read a FLUX LoRA file and convert it to diffusers naming. Cached: reading the same unchanged file again
    costs nothing."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}. Put FLUX.1 LoRAs in ComfyUI's models/loras folder.")
    key = file_key(path)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    lora = _parse(path)
    with _cache_lock:
        _cache[key] = lora
        while len(_cache) > 1 and sum(item.nbytes for item in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return lora


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    header: dict = {}
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors import safe_open
            from safetensors.torch import load_file

            tensors = load_file(path, device="cpu")
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have no common base class
        raise LoraFileError(
            f"{path.name} could not be read as a LoRA ({type(e).__name__}: {_short(e)}). The file is damaged, "
            "incomplete or not a model file: download it again."
        ) from e
    if isinstance(tensors, dict):
        tensors = {k: v for k, v in tensors.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not isinstance(tensors, dict) or not tensors:
        raise LoraFileError(f"{path.name} holds no named tensors, so it is not a LoRA.")
    metadata = None
    raw = header.get("lora_adapter_metadata")
    if raw:
        try:
            metadata = json.loads(raw)
        except ValueError:
            log.warning("%s: ignoring unreadable LoRA metadata in the file header", path.name)
    return tensors, metadata


def _parse(path: Path) -> ParsedLora:
    from diffusers import FluxPipeline

    raw, metadata = _read_tensors(path)
    try:
        converted, alphas = FluxPipeline.lora_state_dict(_bfl_names_in_comfy_spelling(raw), return_alphas=True)
    except Exception as e:  # the converters raise ValueError, KeyError or AssertionError on foreign layouts
        raise LoraFileError(
            f"{path.name} is not a FLUX.1 LoRA that can be read: it looks like {looks_like(raw)}. "
            f"(diffusers: {type(e).__name__}: {_short(e)})"
        ) from e
    converted = {_with_transformer_prefix(k): v for k, v in converted.items()}
    tensors = {k: v for k, v in converted.items() if k.startswith("transformer.")}
    if not tensors:
        raise LoraFileError(
            f"{path.name} holds no LoRA weights for the FLUX.1 transformer: it looks like {looks_like(raw)}. "
            "Use a LoRA trained for FLUX.1 (dev)."
        )
    skipped = len(converted) - len(tensors)
    if skipped:
        log.info("%s: %d text-encoder LoRA tensors skipped (style LoRAs apply to the FLUX transformer only)",
                 path.name, skipped)
    alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("transformer.")} or None
    return ParsedLora(path, tensors, alphas, None if alphas else metadata, skipped)


def _bfl_names_in_comfy_spelling(state_dict: dict) -> dict:
    """``[diffusion_model.]double_blocks.0.img_attn.qkv.lora_A.weight`` →
    ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` (a new dict; XLabs keys are left alone)."""
    out = {}
    for key, value in state_dict.items():
        name = key.removeprefix("diffusion_model.")
        if name.split(".", 1)[0] in BFL_TOP_LEVEL and ".processor." not in name:
            key = "diffusion_model." + name.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")
        out[key] = value
    return out


def _with_transformer_prefix(key: str) -> str:
    # diffusers' kohya converter leaves the non-block layers (img_in → x_embedder …) without the prefix
    return f"transformer.{key}" if key.split(".", 1)[0] in DIFFUSERS_TOP_LEVEL else key


def looks_like(state_dict: dict) -> str:
    """What a state dict that is not a FLUX LoRA seems to be, for error messages."""
    keys = sorted(state_dict)
    sample = ", ".join(f"'{k}'" for k in keys[:2])
    has_lora = any("lora" in k.lower() for k in keys)
    if any(part in k for k in keys for part in ("lokr_", "hada_", "lora_mid")):
        kind = "a LyCORIS LoKr/LoHa/LoCon file (only plain LoRA is supported)"
    elif any(name in k for k in keys for name in UNET_NAMES):
        kind = "a Stable Diffusion 1.5/SDXL " + ("LoRA" if has_lora else "checkpoint")
    elif not has_lora:
        flux = any(name in k for k in keys for name in BFL_TOP_LEVEL + DIFFUSERS_TOP_LEVEL[:2])
        kind = "a full FLUX model, not a LoRA" if flux else "a model checkpoint, not a LoRA"
    else:
        kind = "a LoRA for another model"
    return f"{kind} ({len(keys)} tensor{'s' if len(keys) != 1 else ''}, e.g. {sample})"


def _short(error: Exception, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "…"


def check_fits(lora: ParsedLora, transformer: nn.Module) -> None:
    """Raise :class:`LoraFileError` unless every LoRA tensor matches a linear layer of ``transformer``."""
    problems = []
    for key, tensor in lora.tensors.items():
        module_name, sep, part = key.removeprefix("transformer.").rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight", "B.bias"):
            problems.append(f"unsupported tensor '{key}'")
            continue
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            problems.append(f"FLUX.1 has no layer '{module_name}'")
            continue
        module = getattr(module, "base_layer", module)
        if not isinstance(module, nn.Linear):
            problems.append(f"'{module_name}' is not a linear layer")
        elif part == "A.weight":
            up = lora.tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
            if tensor.ndim != 2 or tensor.shape[1] != module.in_features:
                problems.append(f"'{module_name}' takes {module.in_features} input features, the LoRA's "
                                f"down matrix has shape {tuple(tensor.shape)}")
            elif up is None or up.ndim != 2 or up.shape[1] != tensor.shape[0]:
                problems.append(f"'{module_name}' has no matching up matrix (lora_B) of rank {tensor.shape[0]}")
        elif tensor.shape[0] != module.out_features:
            problems.append(f"'{module_name}' has {module.out_features} outputs, the LoRA's up matrix "
                            f"has shape {tuple(tensor.shape)}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        if any("'x_embedder'" in p for p in problems):
            hint = ("It looks like a FLUX Control/Fill LoRA, which widens the input layer for a conditioning image; "
                    "only style LoRAs (same layer sizes as FLUX.1-dev) are supported.")
        else:
            hint = "It is probably a LoRA for another model; use one trained for FLUX.1 (dev)."
        raise LoraFileError(f"{lora.path.name} does not fit this FLUX.1 transformer: {problems[0]}{more}. {hint}")


def _require_peft() -> None:
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise InstantCharacterError(
            "Style LoRAs need the Python package 'peft' (0.17 or newer): run `python -m pip install -U peft` in "
            "ComfyUI's Python environment and restart ComfyUI."
        )


class StyleLoras:
    """The style LoRAs of one run on one transformer.

    Construction reads (cached) and checks every file and changes nothing, so a bad file fails before any model
    moves. :meth:`apply` installs the LoRAs with a strength of zero skipped; :meth:`remove` restores the
    transformer exactly, also after a partial :meth:`apply`. Usable as a context manager.
    """

    def __init__(self, transformer: nn.Module, loras: Iterable = ()):
        self.transformer = transformer
        parsed = [(read_lora(spec.path), spec.strength) for spec in map(LoraSpec.of, loras)]
        for lora, _ in parsed:
            check_fits(lora, transformer)
        self.active = [(lora, strength) for lora, strength in parsed if strength != 0]
        if self.active:
            _require_peft()
        self._saved = None

    @property
    def adapter_names(self) -> list[str]:
        return [f"{ADAPTER_PREFIX}{i}" for i in range(len(self.active))]

    def apply(self) -> None:
        if not self.active or self._saved is not None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        t = self.transformer
        loaded = list(getattr(t, "peft_config", {}))
        foreign = [name for name in loaded if not name.startswith(ADAPTER_PREFIX)]
        if foreign:
            raise InputError(f"The FLUX transformer already carries LoRA adapters loaded elsewhere "
                             f"({', '.join(foreign)}); reload FLUX to use style LoRAs.")
        if loaded:  # left over from a run that could not clean up
            t.unload_lora()
        self._saved = ([(p, p.requires_grad) for p in t.parameters()],
                       t.__dict__.get("_hf_peft_config_loaded", _UNSET))
        for name, (lora, _) in zip(self.adapter_names, self.active):
            try:
                with warnings.catch_warnings():  # PEFT warns about a second adapter, which is what stacking is
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    t.load_lora_adapter(dict(lora.tensors), prefix="transformer", adapter_name=name,
                                        network_alphas=lora.network_alphas, metadata=lora.metadata,
                                        low_cpu_mem_usage=True)
            except Exception as e:
                raise LoraFileError(f"{lora.path.name} could not be applied to the FLUX transformer "
                                    f"({type(e).__name__}: {_short(e)}).") from e
        t.set_adapters(self.adapter_names, [strength for _, strength in self.active])
        # The LoRA weights arrive in the file's dtype on the CPU; give them their layer's dtype and device so that
        # every offload mode computes them the same way.
        for module in t.modules():
            if isinstance(module, BaseTunerLayer):
                layer = module.get_base_layer()
                base = layer.weight
                dtype = getattr(layer, "compute_dtype", base.dtype)  # fp8-stored layers compute in compute_dtype
                for table in (module.lora_A, module.lora_B):
                    for name in self.adapter_names:
                        if name in table:
                            table[name].to(base.device, dtype)

    def remove(self) -> None:
        if self._saved is None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        t = self.transformer
        params, flag = self._saved
        if hasattr(t, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in t.modules()):
            t.unload_lora()  # puts every original layer back in place of its LoRA wrapper
        if flag is _UNSET:
            t.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            t._hf_peft_config_loaded = flag
        for p, requires_grad in params:  # PEFT freezes the base weights while adapters are in
            p.requires_grad_(requires_grad)
        self._saved = None

    def __enter__(self) -> "StyleLoras":
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class FluxWithLoras:
    """A FLUX pipeline together with the style LoRAs to apply while it generates.

    Attribute access reads through to the pipeline (``flux.transformer``, ``flux.encode_prompt`` …); the pipeline
    itself is never changed, so the same loaded FLUX serves graphs with and without LoRAs.
    """

    def __init__(self, pipeline, loras: tuple[LoraSpec, ...]):
        self.pipeline = pipeline
        self.loras = tuple(loras)

    def __getattr__(self, name):
        if name in ("pipeline", "loras") or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def __repr__(self) -> str:
        names = ", ".join(f"{Path(s.path).name} × {s.strength:g}" for s in self.loras)
        return f"FluxWithLoras({type(self.pipeline).__name__}, [{names}])"


def with_lora(flux, path: str | os.PathLike, strength: float = 1.0) -> FluxWithLoras:
    """``flux`` plus one more style LoRA; stackable, and ``flux`` is left as it was. The file is read and checked
    against the transformer here, so a bad file fails at once."""
    base = flux.pipeline if isinstance(flux, FluxWithLoras) else flux
    spec = LoraSpec(os.fspath(path), float(strength))
    check_fits(read_lora(spec.path), base.transformer)
    return FluxWithLoras(base, (*getattr(flux, "loras", ()), spec))
