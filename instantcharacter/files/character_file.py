"""Character files: a character's encoder features as ``.safetensors``, loaded again without the encoders.

A file holds the three feature tensors exactly as they were computed (their dtype, bit for bit), a small uint8
preview of the prepared pictures, and string metadata: the format and its version, the encoders' names and
widths, and how the pictures were prepared and fused. Loading reads the header first and refuses, before any
tensor is read, whatever is not such a file: a pickle (never opened), another model's safetensors (named by
what it looks like), a truncated or damaged file, a file whose shapes disagree with what it says.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..errors import CharacterFileError, InputError, ModelFolderError
from ..reference.encoders import PREVIEW_LIMIT, PREVIEW_SIDE, EncoderIdentity, FeatureSource, ReferenceFeatures
from .checkpoint import SAFETENSORS_SUFFIXES, CheckpointReadError, TensorFile, read_checkpoint, short_error
from .identify import describe

FORMAT = "InstantCharacter character"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
FEATURES = ("low_res_shallow", "low_res_deep", "high_res_deep")
VIEW_TOKENS = 729  # 27 × 27 patches of 14 pixels in a 384² view, for both encoders
TOKENS = {"low_res_shallow": 3 * VIEW_TOKENS, "low_res_deep": VIEW_TOKENS, "high_res_deep": 4 * VIEW_TOKENS}
PREVIEW = "preview"
FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
WHERE_IT_BELONGS = {"IP-Adapter": "An adapter goes in models/ipadapter, for Load Adapter.",
                    "LoRA": "A LoRA goes in models/loras, for Style LoRA or ComfyUI's LoRA loaders."}
MADE_BY = "Character files are written by InstantCharacter Save Character (or the command line's --save-character)."


def save_character(features: ReferenceFeatures, path: str | os.PathLike) -> Path:
    """Write ``features`` to ``path`` (a new ``.safetensors`` file; its folder is created). The file appears
    whole or not at all: it is written beside its final name and renamed."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise InputError(f"{path.name}: a character file is a {SUFFIX} file; give a name ending in {SUFFIX}.")
    tensors, metadata = _contents(features)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _contents(features) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not isinstance(features, ReferenceFeatures):
        raise InputError(f"Only a character (from Encode Reference, Blend Characters or Load Character) can be "
                         f"saved, not {type(features).__name__}.")
    extra = [f.name for f in dataclasses.fields(features)
             if f.name not in (*FEATURES, "source") and getattr(features, f.name) is not None]
    if extra:
        raise InputError(f"This character carries {', '.join(extra)}, which a character file does not hold: save "
                         "the character before that is added to it.")
    if features.source is None:
        raise InputError("This character does not say which encoders made it, so a file of it could not be "
                         "checked when loaded: save the character that Encode Reference gives.")
    if not all(torch.isfinite(t).all() for t in features.tensors()):
        raise InputError("The character's features hold NaN or infinite values: encode the reference again.")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in zip(FEATURES, features.tensors())}
    source = features.source
    if source.preview is not None:
        tensors[PREVIEW] = source.preview.to("cpu", torch.uint8).contiguous()
    identity = source.encoders
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "siglip": identity.siglip, "siglip_width": str(identity.siglip_width),
                "dinov2": identity.dinov2, "dinov2_width": str(identity.dinov2_width),
                "settings": json.dumps(source.settings)}
    return tensors, metadata


def load_character(path: str | os.PathLike) -> ReferenceFeatures:
    """The character in a file written by :func:`save_character`; raises :class:`CharacterFileError` (and
    loads nothing) for anything else."""
    path = Path(path)
    _check_file(path)
    try:
        header = TensorFile(path)
    except ModelFolderError as err:
        raise _damaged(path, err.__cause__ or err) from err
    with header:
        metadata = header.metadata()
        if metadata.get("format") != FORMAT:
            kind = describe(header)
            where = next((f" {hint}" for word, hint in WHERE_IT_BELONGS.items() if word in kind), "")
            raise CharacterFileError(f"{path.name} is not an InstantCharacter character file: it looks like "
                                     f"{kind}.{where} {MADE_BY}")
        identity, settings = _read_metadata(path, metadata)
        _check_layout(path, header, identity)
    try:
        tensors, _ = read_checkpoint(path)
    except CheckpointReadError as err:
        raise _damaged(path, err.cause) from err
    if not all(torch.isfinite(tensors[name]).all() for name in FEATURES):
        raise CharacterFileError(f"{path.name} holds NaN or infinite features: it is damaged. Save the character "
                                 "again.")
    source = FeatureSource(identity, settings, tensors.get(PREVIEW))
    return ReferenceFeatures(*(tensors[name] for name in FEATURES), source=source)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CharacterFileError(f"Character file not found: {path}.")
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        start = f.read(9)
    looks_pickled = start[:2] == b"PK" or start[:1] == b"\x80"
    if suffix in PICKLE_SUFFIXES or (looks_pickled and start[8:9] != b"{"):
        raise CharacterFileError(f"{path.name} is a PyTorch pickle, not a character file: pickles are never opened "
                                 f"(they can run code). {MADE_BY}")
    if suffix not in SAFETENSORS_SUFFIXES:
        raise CharacterFileError(f"{path.name} is not a character file (a {SUFFIX} file). {MADE_BY}")
    if not start:
        raise CharacterFileError(f"{path.name} is empty (0 bytes): the save or copy failed. Save the character "
                                 "again.")


def _damaged(path: Path, cause: BaseException) -> CharacterFileError:
    size = path.stat().st_size
    return CharacterFileError(f"{path.name} ({size:,} bytes) could not be read: it is truncated or damaged "
                              f"({type(cause).__name__}: {short_error(cause)}). Save the character again.")


def _read_metadata(path: Path, metadata: dict[str, str]) -> tuple[EncoderIdentity, dict]:
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        version = None
    if version is None or version < 1:
        raise CharacterFileError(f"{path.name} has no valid format version ({metadata.get('format_version')!r}): "
                                 "it is damaged. Save the character again.")
    if version > FORMAT_VERSION:
        raise CharacterFileError(f"{path.name} was written by a newer ComfyUI-InstantCharacter (character format "
                                 f"{version}; this one reads {FORMAT_VERSION}): update the pack.")
    try:
        identity = EncoderIdentity(metadata["siglip"], int(metadata["siglip_width"]), metadata["dinov2"],
                                   int(metadata["dinov2_width"]))
        settings = json.loads(metadata.get("settings", "{}"))
    except (KeyError, ValueError) as err:
        raise CharacterFileError(f"{path.name} lacks a readable encoder identity or settings ({short_error(err)}): "
                                 "it is damaged. Save the character again.") from err
    if not isinstance(settings, dict) or identity.siglip_width <= 0 or identity.dinov2_width <= 0:
        raise CharacterFileError(f"{path.name} has damaged metadata. Save the character again.")
    return identity, settings


def _check_layout(path: Path, f: TensorFile, identity: EncoderIdentity) -> None:
    """Exactly the three features at the shapes the identity implies, in one float dtype, and the preview."""
    keys = set(f.keys)
    if not set(FEATURES) <= keys or keys - {*FEATURES, PREVIEW}:
        raise CharacterFileError(f"{path.name} holds the tensors {sorted(keys)}, not {list(FEATURES)} (and "
                                 f"'{PREVIEW}'): it is damaged or was changed. Save the character again.")
    dtypes = {f.dtype(name) for name in FEATURES}
    if len(dtypes) != 1 or not dtypes <= set(FEATURE_DTYPES):
        raise CharacterFileError(f"{path.name} stores its features as {sorted(map(str, dtypes))}, not one float "
                                 "type: it is damaged. Save the character again.")
    for name in FEATURES:
        want = (1, TOKENS[name], identity.feature_dim)
        if f.shape(name) != want:
            raise CharacterFileError(
                f"{path.name}: {name} is {list(f.shape(name))}, but a character made by {identity.describe()} has "
                f"{list(want)}: the file is damaged or was changed. Save the character again.")
    if PREVIEW in keys:
        shape = f.shape(PREVIEW)
        if f.dtype(PREVIEW) != torch.uint8 or len(shape) != 4 or not 1 <= shape[0] <= PREVIEW_LIMIT or \
                tuple(shape[1:]) != (PREVIEW_SIDE, PREVIEW_SIDE, 3):
            raise CharacterFileError(f"{path.name} has a preview of {list(shape)} ({f.dtype(PREVIEW)}), not uint8 "
                                     f"[1–{PREVIEW_LIMIT}, {PREVIEW_SIDE}, {PREVIEW_SIDE}, 3]: it is damaged. Save "
                                     "the character again.")
