"""Reading checkpoints: the one safetensors / PyTorch-pickle reader every loader uses, lazy per-tensor access
for large single files, and the fp8 dtypes.

Pickles load with ``weights_only=True``: a file that holds Python objects other than tensors is refused, not run.
A PyTorch zip checkpoint is first bounded by its central directory (:func:`check_declared_sizes`): torch.load
unpacks every record into a buffer of the size the record declares, so a small file with compressed records
could otherwise fill the memory before anything else is checked.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelFolderError

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_E5M2 = getattr(torch, "float8_e5m2", None)
FP8_TYPES = tuple(t for t in (FP8, FP8_E5M2) if t is not None)
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_DTYPE_NAMES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": FP8, "F8_E5M2": FP8_E5M2}
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8 e4m3fn",
                   FP8_E5M2: "fp8 e5m2"}


class CheckpointReadError(Exception):
    """A checkpoint could not be read, or was not read: ``unsafe`` (a pickle with objects other than tensors),
    ``oversized`` (its records declare more bytes than it can hold), otherwise damaged. ``reason`` says what was
    found, in our words (never torch's advice to load the file unsafely). Callers turn it into their own error
    type with a message for their kind of file."""

    def __init__(self, path: Path, cause: Exception | None, unsafe: bool = False, oversized: bool = False,
                 reason: str | None = None):
        self.path, self.cause, self.unsafe, self.oversized = path, cause, unsafe, oversized
        self.reason = reason or load_failure(cause)
        super().__init__(f"{path.name}: {self.reason}")


def short_error(error: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "…"


# What torch's weights-only unpickler says when a pickle asks for anything but tensors: "Unsupported global: GLOBAL
# x.y was not an allowed global" (older torch) and "Trying to load unsupported GLOBAL x.y whose module x is
# blocked" (torch 2.13), or a call/object it refuses. Random bytes or an HTML page fail with "Unsupported operand".
_UNSAFE_PICKLE = re.compile(r"unsupported global|whose module \S+ is blocked|unrecognized function|"
                            r"can only (create new object|build)", re.IGNORECASE)
_UNPICKLER_FINDINGS = re.compile(r"(?:Trying to load )?(unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|"
                                 r"Unsupported operand \d+|Trying to call reduce for unrecognized function \S+|"
                                 r"Can only (?:create new object|build)[^.\n]*)", re.IGNORECASE)


def unsafe_pickle_error(error: BaseException) -> bool:
    """Whether torch refused a pickle because it asks for Python objects other than tensors (code it could run)."""
    return bool(_UNSAFE_PICKLE.search(str(error)))


def load_failure(error: BaseException | None) -> str:
    """What went wrong reading a checkpoint, on one line: the exception's type and text, where torch's weights-only
    errors are cut to what its unpickler objected to (their advice to load with ``weights_only=False`` is never
    shown: we never do that)."""
    if error is None:
        return "unreadable"
    text = str(error)
    if "weights_only" in text or "Weights only load failed" in text:
        found = _UNPICKLER_FINDINGS.search(text)
        text = found.group(1) if found else "the pickle holds something torch's safe loader does not read"
    return f"{type(error).__name__}: {short_error(Exception(text))}"


@dataclass(frozen=True)
class SizeLimit:
    """The most a pickled checkpoint of one kind can hold: ``total`` bytes in all its tensors, ``per_tensor`` in
    one (None: no bound beyond the file's own size); ``what`` names the kind, e.g. 'the InstantCharacter adapter'."""

    what: str
    total: int | None = None
    per_tensor: int | None = None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def check_declared_sizes(path: str | os.PathLike, limit: SizeLimit | None = None) -> None:
    """Refuse a PyTorch zip checkpoint whose records declare more bytes than it can legitimately hold, from the
    archive's central directory alone: nothing is decompressed or memory-mapped. torch.save stores every record
    uncompressed, so a real checkpoint never declares more than its own size on disk; ``limit`` bounds what a file
    of one kind holds. A legacy (non-zip) pickle is left to torch.load, which reads its tensors from the file as
    they are. Raises :class:`CheckpointReadError` (``oversized``, or damaged when the directory is unreadable)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # how torch.load tells a zip checkpoint from a legacy pickle
            return
    try:
        with zipfile.ZipFile(path) as archive:
            records = [(info.filename, info.file_size) for info in archive.infolist()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointReadError(path, err) from err
    declared = sum(size for _, size in records)
    on_disk = path.stat().st_size
    if declared > on_disk:
        raise CheckpointReadError(path, None, oversized=True, reason=(
            f"declares {_size(declared)} of data in a file of {_size(on_disk)}: its records are compressed, which "
            "torch.save never does, so unpacking it would take far more memory than the file's size (a zip bomb or a "
            "damaged file)"))
    if limit is None:
        return
    if limit.total is not None and declared > limit.total:
        raise CheckpointReadError(path, None, oversized=True, reason=(
            f"holds {_size(declared)} of data, more than {limit.what} can ({_size(limit.total)} at most)"))
    tensors = [(name, size) for name, size in records if "/data/" in name]  # archive/data/<storage key>
    largest = max(tensors, key=lambda item: item[1], default=None)
    if limit.per_tensor is not None and largest is not None and largest[1] > limit.per_tensor:
        raise CheckpointReadError(path, None, oversized=True, reason=(
            f"holds a tensor of {_size(largest[1])}, larger than any in {limit.what} ({_size(limit.per_tensor)} at "
            "most)"))


def is_safetensors(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def owned(converted: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """``converted`` (``read`` after a dtype/device change), copied when the change copied nothing, so a kept
    weight never stays a view of a memory-mapped file."""
    return converted.clone() if converted.data_ptr() == read.data_ptr() else converted


def _torch_load(path: Path, mmap: bool, limit: SizeLimit | None = None):
    check_declared_sizes(path, limit)
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # not a zip checkpoint: no memory map
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike, limit: SizeLimit | None = None) -> tuple[object, dict]:
    """Everything in a ``.safetensors`` file (tensors, header metadata) or a PyTorch pickle (its object, ``{}``),
    in memory the process owns: safetensors' tensors are views of the memory-mapped file, so overwriting the
    file would change loaded weights and truncating it would crash the process at the next access (SIGBUS).
    ``limit`` bounds what a pickle may hold (:func:`check_declared_sizes`). Raises :class:`CheckpointReadError`
    when the file cannot be read or is refused."""
    path = Path(path)
    try:
        if is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
            return tensors, metadata
        return _torch_load(path, mmap=False, limit=limit), {}
    except CheckpointReadError:
        raise
    except pickle.UnpicklingError as err:
        # only a refused global or call means "objects other than tensors"; random bytes or an HTML page fail too
        raise CheckpointReadError(path, err, unsafe_pickle_error(err)) from err
    except Exception as err:  # zip, EOF, OS and safetensors' own errors all mean a damaged file
        raise CheckpointReadError(path, err) from err


class TensorFile:
    """A checkpoint opened without reading its tensors: names, shapes and dtypes come from the header
    (safetensors) or a memory map (PyTorch zip files); :meth:`read` loads one tensor or a block of its rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.is_file():
            raise ModelFolderError(f"{self.path} does not exist.")
        suffix = self.path.suffix.lower()
        if suffix == ".gguf":
            raise ModelFolderError(
                f"{self.name} is a GGUF file: load it with ComfyUI-GGUF's loader and use InstantCharacter's "
                "Apply to MODEL node (native path); this loader reads .safetensors files.")
        self._st = None
        self._sd: dict[str, torch.Tensor] | None = None
        try:
            if suffix in (".safetensors", ".sft"):
                from safetensors import safe_open

                self._st = safe_open(str(self.path), framework="pt", device="cpu")
                self.keys = list(self._st.keys())
            else:
                sd = _torch_load(self.path, mmap=True)
                if isinstance(sd.get("state_dict"), dict):
                    sd = sd["state_dict"]
                self._sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
                self.keys = list(self._sd)
        except CheckpointReadError as err:
            if err.oversized:
                raise ModelFolderError(f"{self.name} is not loaded: it {err.reason}. Use a .safetensors copy of "
                                       "the model, or download it again.") from err
            raise ModelFolderError(f"{self.name} cannot be read as a PyTorch checkpoint ({err.reason}); it may be "
                                   "incomplete: download or copy it again.") from err
        except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
            if isinstance(err, pickle.UnpicklingError) and unsafe_pickle_error(err):
                raise ModelFolderError(
                    f"{self.name} holds pickled Python objects other than tensors ({load_failure(err)}), so it is "
                    "not loaded (it could run code). Use a .safetensors copy of the model.") from err
            raise ModelFolderError(
                f"{self.name} cannot be read as a safetensors or PyTorch checkpoint ({load_failure(err)}); it may be "
                "incomplete: download or copy it again.") from err
        self._keyset = set(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keyset

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._st = None
        self._sd = None

    def metadata(self) -> dict[str, str]:
        """The header's string metadata of a safetensors file ({} for a PyTorch file)."""
        return dict(self._st.metadata() or {}) if self._st is not None else {}

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        if self._st is not None:
            return _DTYPE_NAMES.get(self._st.get_slice(key).get_dtype())
        return self._sd[key].dtype

    def read(self, key: str, rows: tuple[int, int] | None = None, descale: bool = True) -> torch.Tensor:
        """The tensor (or rows ``start:stop`` of it); de-scaled when the file is ComfyUI "scaled fp8" unless
        ``descale`` is False (then see :meth:`scale`). It may be a view of the memory-mapped file: whoever
        keeps it must copy it (:func:`owned`)."""
        if self._st is not None:
            tensor = self._st.get_slice(key)[rows[0]:rows[1]] if rows else self._st.get_tensor(key)
        else:
            tensor = self._sd[key][rows[0]:rows[1]] if rows else self._sd[key]
        scale = self.scale(key) if descale else None
        return tensor if scale is None else tensor.float() * scale

    def scale(self, key: str) -> torch.Tensor | None:
        """The ``scale_weight`` of a "scaled fp8" weight (the real weight is stored × scale), if it has one."""
        scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
        return self.read(scale_key).float() if scale_key in self._keyset else None

    def find_prefix(self, marker: str) -> str | None:
        """The prefix under which ``marker`` appears (``""`` for bare keys), the shortest if several."""
        found = [k[: -len(marker)] for k in self.keys if k.endswith(marker) and (len(k) == len(marker) or
                                                                                 k[-len(marker) - 1] == ".")]
        return min(found, key=len) if found else None

    def count(self, prefix: str) -> int:
        """How many numbered children ``prefix<N>.`` there are (highest N + 1)."""
        found = {int(m.group(1)) for k in self.keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(found) + 1 if found else 0

    def precision(self) -> str:
        """The storage precision of most of the bytes, as users name it."""
        if any(k.endswith("scaled_fp8") for k in self.keys):
            return "scaled fp8"
        totals: dict[torch.dtype, int] = {}
        for k in self.keys:
            dtype = self.dtype(k)
            if dtype is not None and dtype.is_floating_point:
                totals[dtype] = totals.get(dtype, 0) + math.prod(self.shape(k)) * dtype.itemsize
        if not totals:
            return "unknown precision"
        main = max(totals, key=totals.get)
        return PRECISION_NAMES.get(main, str(main).removeprefix("torch."))



class TensorDict(TensorFile):
    """Converted tensors held in memory, read like a file."""

    def __init__(self, name: str, state: dict[str, torch.Tensor]):
        self.path, self.name, self._st, self._sd = Path(name), name, None, state
        self.keys = list(state)
        self._keyset = set(self.keys)


def open_tensors(path) -> TensorFile:
    return path if isinstance(path, TensorFile) else TensorFile(path)
