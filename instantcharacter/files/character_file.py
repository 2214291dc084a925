"""Character files: a character's encoder features as ``.safetensors``, loaded again without the encoders.

A file holds the three feature tensors exactly as they were computed (their dtype, bit for bit), a small uint8
preview of the prepared pictures, and string metadata: the format and its version, the encoders' names and
widths, and how the pictures were prepared and fused. Loading reads the header first and refuses, before any
tensor is read, whatever is not such a file: a pickle (never opened), another model's safetensors (named by
what it looks like), a truncated or damaged file, a file whose shapes disagree with what it says, features no
encoder makes (:data:`~..reference.character.FEATURE_LIMIT`).

Saving never replaces a file: the character is written to a temporary name in the target folder and then linked
to its name, which fails if that name exists (the command line replaces a character file only when asked).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CharacterFileError, InputError, ModelFolderError
from ..reference.character import (FEATURE_LIMIT, PREVIEW_LIMIT, PREVIEW_SIDE, EncoderIdentity, FeatureSource,
                                   ReferenceFeatures)
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


NAME_MAX = 255  # bytes in one file or folder name on the usual file systems
DEFAULT_NAME = "character"
NUMBERED_TAIL = len(f"_{0:05}_{SUFFIX}")  # what Save Character adds to a name: _00001_.safetensors


def save_character(features: ReferenceFeatures, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``features`` to ``path`` (a ``.safetensors`` file; its folder is created). The file appears whole or
    not at all, and never over an existing file: with ``overwrite`` it replaces one, and only a character file.
    Raises :class:`InputError` for a path that cannot be used (checked first: :func:`check_save_path`),
    :class:`CharacterFileError` when the disk refuses the write; nothing is left behind either way."""
    path = Path(path)
    check_save_path(path, overwrite)
    tensors, metadata = _contents(features)
    return _write(tensors, metadata, path.parent, [path.name], overwrite)


def save_numbered_character(features: ReferenceFeatures, folder: str | os.PathLike, name: str, counter: int) -> Path:
    """Write ``features`` as ``{name}_{counter:05}_.safetensors`` in ``folder`` (ComfyUI's numbering, counted by
    its save-path helper), or with the next free number when that name is taken meanwhile: never over a file."""
    folder = Path(folder)
    tensors, metadata = _contents(features)
    names = (f"{name}_{n:05}_{SUFFIX}" for n in range(counter, counter + 100_000))
    return _write(tensors, metadata, folder, names, overwrite=False)


def check_savable(features: ReferenceFeatures) -> None:
    """Refuse, by name, a character a file cannot hold (see :func:`save_character`), before anything is written."""
    _contents(features)


def character_prefix(prefix: str, where: str = "the characters folder") -> str:
    """Save Character's ``filename_prefix`` as a normalised relative path 'folder/name' inside ``where``: 'heroes/anna'
    stays, 'heroes/anna/', 'bob/.' and 'heroes/..' (a folder only) get the name 'character' in that folder, so
    ComfyUI's numbering counts the files that are really there. Refused by name: a NUL, an absolute path or one
    that leaves the folder, a hidden name, a name too long for the file system."""
    text = (prefix or "").strip()
    if "\0" in text:
        raise InputError("filename_prefix contains a NUL character, which no file name can hold: type the name again.")
    if os.path.isabs(text) or os.path.splitdrive(text)[0] or text.startswith(("/", "\\")):
        raise InputError(f"filename_prefix {prefix!r} is an absolute path, but characters are saved only inside "
                         f"{where}: give a name like 'anna' or 'heroes/anna'.")
    last = os.path.split(text)[1]
    if last in ("", ".", ".."):  # only a folder was given
        text = os.path.join(text, DEFAULT_NAME) if text else DEFAULT_NAME
    normal = os.path.normpath(text)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise InputError(f"filename_prefix {prefix!r} leads out of {where} ('..'), where nothing is saved: give a "
                         "name like 'anna' or 'heroes/anna'.")
    name = os.path.basename(normal)
    if name.startswith("."):
        raise InputError(f"filename_prefix {prefix!r} would make a hidden file ({name}_00001_{SUFFIX}), which "
                         "file browsers hide: start the name with a letter or digit.")
    parts = normal.split(os.sep)
    for i, part in enumerate(parts):
        limit = NAME_MAX - (NUMBERED_TAIL if i == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            raise InputError(f"filename_prefix is too long: '{part[:40]}…' has {len(os.fsencode(part))} bytes, and a "
                             f"file name may have {NAME_MAX} (the number and {SUFFIX} take {NUMBERED_TAIL}): shorten "
                             "it.")
    return normal


def check_save_path(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, by name and before anything is computed, a path a character cannot be saved to: not ``.safetensors``,
    a folder, inside a file, a place that cannot be written, a name too long, an existing file (unless
    ``overwrite``, and then only a character file)."""
    path = Path(path)
    text = os.fspath(path)
    if "\0" in text:
        raise InputError("The character file's path contains a NUL character: type it again.")
    if path.suffix.lower() != SUFFIX:
        raise InputError(f"{path.name}: a character file is a {SUFFIX} file; give a name ending in {SUFFIX}.")
    too_long = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if too_long is not None:
        raise InputError(f"{path}: the name '{too_long[:40]}…' has {len(os.fsencode(too_long))} bytes; a file name "
                         f"may have {NAME_MAX}: shorten it.")
    if path.is_dir():
        raise InputError(f"{path} is a folder: give the path of a {SUFFIX} file to write, e.g. "
                         f"{path / 'girl.safetensors'}.")
    check_save_folder(path.parent)
    if os.path.lexists(path):
        if not overwrite:
            raise InputError(f"{path} already exists and is never replaced: choose another name (the command line's "
                             "--overwrite replaces a character file).")
        if not is_character_file(path):
            raise InputError(f"{path} exists and is not a character file, so it is not overwritten, even with "
                             "--overwrite: choose another name.")


def check_save_folder(folder: str | os.PathLike) -> None:
    """Refuse a folder that cannot be made or written: one of its parents is a file, or the nearest existing one
    cannot be written (tried with a temporary file, which is removed; the folder itself is not created here)."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise InputError(f"{existing} is a file, so {folder} cannot be a folder: choose another name or folder.")
    probe = existing / f".ic-{os.getpid()}-{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as err:
        raise InputError(f"{existing} cannot be written ({err.strerror or err}): choose a folder you can write to.") \
            from err
    probe.unlink(missing_ok=True)


def is_character_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file whose header says it is a character file (no tensor is read)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - whatever cannot be opened as safetensors is not one
        return False


def _write(tensors: dict, metadata: dict, folder: Path, names: Iterable[str], overwrite: bool) -> Path:
    """Write the file beside its final name, then give it the first of ``names`` that is free (or replace the
    only one, with ``overwrite``)."""
    from safetensors.torch import save_file

    partial = folder / f".ic-{os.getpid()}-{secrets.token_hex(4)}.partial"  # short: any allowed name fits beside
    taken = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(partial), metadata=metadata)
        for name in names:
            path = folder / name
            if len(os.fsencode(name)) > NAME_MAX:
                raise InputError(f"{name[:40]}…: a file name may have {NAME_MAX} bytes; shorten the name.")
            try:
                _publish(partial, path, overwrite)
                return path
            except FileExistsError:
                taken.append(path)
    except OSError as err:
        raise CharacterFileError(f"The character could not be written into {folder} ({err.strerror or err}): check "
                                 "that the folder can be written and the disk has room. Nothing was saved.") from err
    finally:
        partial.unlink(missing_ok=True)
    raise InputError(f"{taken[-1]} already exists and is never replaced: choose another name. Nothing was saved.")


def _publish(partial: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(partial, path)
        return
    try:
        os.link(partial, path)  # refuses an existing name, even one made a moment ago: nothing is replaced
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, some network shares)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.rename(partial, path)  # (Windows' rename refuses an existing name too)


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
    largest = features.largest_value()
    if largest > FEATURE_LIMIT:  # Load Character would refuse the file
        raise InputError(f"The character's features reach {largest:.3g}, far beyond what SigLIP and DINOv2 produce: "
                         "encode the reference again.")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in zip(FEATURES, features.tensors())}
    source = features.source
    if source.preview is not None:
        tensors[PREVIEW] = source.preview.to("cpu", torch.uint8).contiguous()
    identity = source.encoders
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "siglip": identity.siglip, "siglip_width": str(identity.siglip_width),
                "dinov2": identity.dinov2, "dinov2_width": str(identity.dinov2_width),
                "settings": _settings_text(source.settings)}
    return tensors, metadata


def _settings_text(settings: dict) -> str:
    try:
        return json.dumps(settings)
    except (TypeError, ValueError, RecursionError) as err:
        raise InputError(f"This character's settings cannot be written as JSON ({short_error(err)}): encode the "
                         "reference again.") from err


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
    features = ReferenceFeatures(*(tensors[name] for name in FEATURES), source=source)
    largest = features.largest_value()
    if largest > FEATURE_LIMIT:
        raise CharacterFileError(f"{path.name} holds features up to {largest:.3g}, far beyond what SigLIP and DINOv2 "
                                 f"produce (at most a few thousand; the limit is {FEATURE_LIMIT:.0e}): it was altered "
                                 "or damaged and would give black (NaN) pictures. Save the character again.")
    return features


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CharacterFileError(f"{path} is a folder, not a character file: give a {SUFFIX} file that Save "
                                 "Character wrote (or its name in the characters folder).")
    if not path.is_file():
        raise CharacterFileError(f"Character file not found: {path}.")
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        start = f.read(9)
    looks_safetensors = start[8:9] == b"{"  # an 8-byte header length, then the JSON header
    if suffix in PICKLE_SUFFIXES and looks_safetensors:
        raise CharacterFileError(f"{path.name} is a safetensors file under a {suffix} name (a character file "
                                 f"renamed?): rename it to {path.stem}{SUFFIX}. Files named {suffix} are never "
                                 "opened as character files.")
    looks_pickled = start[:2] == b"PK" or start[:1] == b"\x80"
    if suffix in PICKLE_SUFFIXES or (looks_pickled and not looks_safetensors):
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
    except (KeyError, ValueError, RecursionError) as err:  # RecursionError: JSON nested past Python's limit
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
