"""Reading and writing the published adapter checkpoint.

The checkpoint (``instantcharacter_ip-adapter.bin``, or the same tensors as ``.safetensors`` with keys
prefixed ``image_proj.`` / ``ip_adapter.``) holds the projector and one character-attention module per
FLUX attention layer. Every size is read from the tensors, so tiny test checkpoints use the same code.
Loading is strict: a file that is another model, or misses or adds a key, is refused with a message that
says what it looks like.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AdapterFileError
from ..model.adapter import InstantCharacterAdapter
from ..model.attention import IP_HEAD_DIM
from ..model.projector import ProjectorConfig
from .checkpoint import CheckpointReadError, SizeLimit, read_checkpoint

EXPECTED = (
    "an InstantCharacter adapter (instantcharacter_ip-adapter.bin from Tencent/InstantCharacter, 5.59 GB, "
    "holding 'image_proj' with cross_layer_blocks/cross_scale_blocks/resampler and 'ip_adapter' with 57 "
    "layers of norm_ip_q/to_k_ip/norm_ip_k/to_v_ip)"
)


# The published checkpoint's parameter count (every key and shape: shared/reference, checked by test_adapter.py).
PUBLISHED_PARAMETERS = 2_794_932_864
# What an adapter file can hold: the published parameters at 4 bytes each (fp32, twice the published bf16 file),
# plus 256 MiB for the pickle itself and rounding. A pickle that declares more is refused before it is unpacked.
SIZE_LIMIT = SizeLimit("the InstantCharacter adapter", total=PUBLISHED_PARAMETERS * 4 + 2**28)


def _read(path: Path) -> dict:
    if path.is_dir():
        raise AdapterFileError(f"{path} is a folder; the adapter is one file: give the path of "
                               f"instantcharacter_ip-adapter.bin inside it. Expected {EXPECTED}.")
    if not path.is_file():
        raise AdapterFileError(f"Adapter file not found: {path}. Expected {EXPECTED}.")
    if path.stat().st_size == 0:
        raise AdapterFileError(f"{path.name} is an empty file (0 bytes): the download or copy failed. "
                               f"Delete it and download {EXPECTED} again.")
    try:
        raw, _ = read_checkpoint(path, SIZE_LIMIT)
    except CheckpointReadError as err:
        if err.unsafe:
            raise AdapterFileError(
                f"{path.name} contains pickled Python objects other than tensors ({err.reason}), so it is not loaded "
                f"(it could run code; only plain tensor checkpoints are safe to open). Delete it and download "
                f"{EXPECTED}."
            ) from err
        if err.oversized:
            raise AdapterFileError(f"{path.name} is not loaded: it {err.reason}. Delete it and download {EXPECTED}.") \
                from err
        size = path.stat().st_size
        raise AdapterFileError(
            f"{path.name} ({size:,} bytes) could not be read: it looks truncated or corrupt ({err.reason}). The "
            "published file is 5.59 GB; delete it and download it again.") from err
    return raw


def _split_groups(raw: dict) -> tuple[dict, dict]:
    """Return (image_proj, ip_adapter) state dicts from either the nested .bin or the flat safetensors layout."""
    if isinstance(raw.get("image_proj"), dict) and isinstance(raw.get("ip_adapter"), dict):
        return raw["image_proj"], raw["ip_adapter"]
    flat = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    proj = {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}
    return proj, ip


def describe_foreign_checkpoint(raw: dict) -> str | None:
    """Name what a checkpoint that is not ours looks like, or None if it looks like InstantCharacter."""
    keys = [k for k in raw.keys() if isinstance(k, str)]
    proj, ip = _split_groups(raw)
    all_keys = keys + [f"image_proj.{k}" for k in proj] + [f"ip_adapter.{k}" for k in ip]
    joined = " ".join(all_keys[:4000])

    if any(s in joined for s in ("lora_A", "lora_B", "lora_down", "lora_up", "lora_unet_", "lora_te")):
        return "a LoRA (it holds lora_up/lora_down or lora_A/lora_B weights); put it in models/loras instead"
    if "ip_adapter_double_stream" in joined or "ip_adapter_proj_model" in joined:
        return "the XLabs FLUX IP-Adapter (flux-ip-adapter), a different model"
    if not proj and not ip:
        sample = ", ".join(keys[:5]) or "nothing"
        return f"an unrelated checkpoint (its first keys: {sample})"
    if ip and not any("norm_ip_q" in k for k in ip):
        widths = {tuple(v.shape) for k, v in ip.items() if k.endswith("to_k_ip.weight")}
        in_dims = {w[1] for w in widths if len(w) == 2}
        out_dims = {w[0] for w in widths if len(w) == 2}
        if in_dims & {768} or out_dims & {320, 640, 1280}:
            family = "SDXL" if in_dims & {2048} else "SD1.5"
            return f"an {family} IP-Adapter (h94/IP-Adapter family), for Stable Diffusion, not FLUX"
        if in_dims & {2048}:
            return "an SDXL IP-Adapter (h94/IP-Adapter family), for Stable Diffusion, not FLUX"
        if out_dims & {3072}:
            return "the InstantX FLUX IP-Adapter (InstantX/FLUX.1-dev-IP-Adapter), a different FLUX adapter"
        return "an IP-Adapter of another model family"
    if proj and not any(k.startswith("resampler.") or k.startswith("cross_layer_blocks.") for k in proj):
        return "an IP-Adapter of another model family (its projector has no cross_layer_blocks/resampler)"
    return None


def _check_keys(model: InstantCharacterAdapter, sd: dict, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)})")
        raise AdapterFileError(
            f"{path.name} is not a complete InstantCharacter adapter: keys {'; '.join(parts)}. "
            f"Expected {EXPECTED}. The file may be from another version or damaged; download it again."
        )


def load_adapter(path: str | os.PathLike, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> InstantCharacterAdapter:
    """Load and validate an adapter checkpoint (strict: any missing or unexpected key is an error)."""
    path = Path(path)
    raw = _read(path)
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path.name} holds a {type(raw).__name__}, not a checkpoint dict. Expected {EXPECTED}.")
    foreign = describe_foreign_checkpoint(raw)
    if foreign:
        raise AdapterFileError(f"{path.name} looks like {foreign}. Expected {EXPECTED}.")
    proj_sd, ip_sd = _split_groups(raw)
    try:
        cfg = ProjectorConfig.from_state_dict(proj_sd)
        num_layers = len({k.split(".")[0] for k in ip_sd})
        hidden = ip_sd["0.to_k_ip.weight"].shape[0]
        head = ip_sd["0.norm_ip_q.scale"].shape[0]
    except (KeyError, IndexError) as err:
        raise AdapterFileError(f"{path.name} lacks {err} and cannot be an InstantCharacter adapter. "
                               f"Expected {EXPECTED}.") from err
    if head != IP_HEAD_DIM:
        raise AdapterFileError(f"{path.name} has character-attention heads of {head}, but FLUX heads are "
                               f"{IP_HEAD_DIM} wide. Expected {EXPECTED}.")
    with torch.device("meta"):
        model = InstantCharacterAdapter(cfg, num_layers, hidden)
    flat = {f"image_proj.{k}": v for k, v in proj_sd.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip_sd.items()})
    _check_keys(model, flat, path)
    target = dtype or next(iter(flat.values())).dtype
    flat = {k: v.to(device=device, dtype=target) for k, v in flat.items()}
    model.load_state_dict(flat, strict=True, assign=True)
    model.loaded_from = path  # so a host can load another copy (one per device) the same way
    return model.eval().requires_grad_(False)


def save_adapter(adapter: InstantCharacterAdapter, path: str | os.PathLike) -> None:
    """Write the adapter in the published layout: nested ``.bin`` or flat ``.safetensors``."""
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
        return
    nested = {
        "image_proj": {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")},
        "ip_adapter": {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")},
    }
    torch.save(nested, path)
