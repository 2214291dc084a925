"""Reading FLUX.1 LoRA files into diffusers / PEFT naming (kept in a small cache), and naming what a file that is
not a FLUX LoRA looks like.

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
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraFileError
from .cache import file_key
from .checkpoint import CheckpointReadError, SizeLimit, read_checkpoint, short_error

log = logging.getLogger(__name__)

# Parsed LoRAs kept in host memory, most recently used first (always at least the last one).
CACHE_BYTES = 4 * 2**30
# Top-level layer names of FLUX's original (BFL) layout, used by ComfyUI, kohya and BFL files.
BFL_TOP_LEVEL = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                 "final_layer")
# Top-level children of diffusers' FluxTransformer2DModel.
DIFFUSERS_TOP_LEVEL = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                       "time_text_embed", "norm_out", "proj_out")
UNET_NAMES = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
# The largest tensor a FLUX.1 LoRA can hold: a full-rank fp32 matrix of FLUX's widest layer (a single block's
# linear1, 3072 → 21504; every FLUX layer is at most 3072 wide on its narrow side, so a LoRA's rank is too). Each
# tensor of a pickled LoRA is bounded by it before anything is unpacked; the file's own size bounds the total.
SIZE_LIMIT = SizeLimit("a FLUX.1 LoRA", per_tensor=21504 * 3072 * 4)


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
    if path.is_dir():
        raise LoraFileError(f"{path} is a folder; a LoRA is one file (.safetensors): give the file's path.")
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
    try:
        tensors, header = read_checkpoint(path, SIZE_LIMIT)
    except CheckpointReadError as e:
        if e.unsafe:
            raise LoraFileError(
                f"{path.name} contains pickled Python objects other than tensors ({e.reason}), so it is not loaded "
                "(it could run code). Use a .safetensors LoRA.") from e
        if e.oversized:
            raise LoraFileError(f"{path.name} is not loaded: it {e.reason}. Use another copy of the LoRA, as "
                                ".safetensors.") from e
        raise LoraFileError(
            f"{path.name} could not be read as a LoRA ({e.reason}). The "
            "file is damaged, incomplete or not a model file: download it again."
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
        except (ValueError, RecursionError):  # nested past Python's recursion limit: as unreadable
            log.warning("%s: ignoring unreadable LoRA metadata in the file header", path.name)
        if not isinstance(metadata, dict):
            metadata = None
    return tensors, metadata


def _parse(path: Path) -> ParsedLora:
    raw, metadata = _read_tensors(path)  # refused files are refused before diffusers is imported
    from diffusers import FluxPipeline

    try:
        converted, alphas = FluxPipeline.lora_state_dict(_bfl_names_in_comfy_spelling(raw), return_alphas=True)
    except Exception as e:  # the converters raise ValueError, KeyError or AssertionError on foreign layouts
        raise LoraFileError(
            f"{path.name} is not a FLUX.1 LoRA that can be read: it looks like {looks_like(raw)}. "
            f"(diffusers: {type(e).__name__}: {short_error(e, 160)})"
        ) from e
    converted = {_with_transformer_prefix(k): v for k, v in converted.items()}
    broken = next((k for k, v in converted.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise LoraFileError(f"{path.name} holds NaN or infinite values (e.g. in {broken}): the file is damaged or "
                            "the training diverged; use another copy or another LoRA.")
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
