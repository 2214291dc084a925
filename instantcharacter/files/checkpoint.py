"""Reading checkpoints: the one safetensors / PyTorch-pickle reader every loader uses, lazy per-tensor access
for large single files, and the fp8 dtypes.

Pickles load with ``weights_only=True``: a file that holds Python objects other than tensors is refused, not run.
"""

from __future__ import annotations

import math
import os
import pickle
import re
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
    """A checkpoint could not be read; ``unsafe`` tells a pickle with non-tensor objects from a damaged file.
    Callers turn it into their own error type with a message for their kind of file."""

    def __init__(self, path: Path, cause: Exception, unsafe: bool):
        super().__init__(f"{path.name}: {type(cause).__name__}: {short_error(cause)}")
        self.path, self.cause, self.unsafe = path, cause, unsafe


def short_error(error: Exception, limit: int = 200) -> str:
    """An exception's text on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "…"


def is_safetensors(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def owned(converted: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """``converted`` (``read`` after a dtype/device change), copied when the change copied nothing, so a kept
    weight never stays a view of a memory-mapped file."""
    return converted.clone() if converted.data_ptr() == read.data_ptr() else converted


def _torch_load(path: Path, mmap: bool):
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # not a zip checkpoint: no memory map
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike) -> tuple[object, dict]:
    """Everything in a ``.safetensors`` file (tensors, header metadata) or a PyTorch pickle (its object, ``{}``),
    in memory the process owns: safetensors' tensors are views of the memory-mapped file, so overwriting the
    file would change loaded weights and truncating it would crash the process at the next access (SIGBUS).
    Raises :class:`CheckpointReadError` when the file cannot be read."""
    path = Path(path)
    try:
        if is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
            return tensors, metadata
        return _torch_load(path, mmap=False), {}
    except pickle.UnpicklingError as err:
        # only a refused global means "objects other than tensors"; random bytes or an HTML page fail too
        raise CheckpointReadError(path, err, "Unsupported global" in str(err)) from err
    except Exception as err:  # zip, EOF, OS and safetensors' own errors all mean a damaged file
        raise CheckpointReadError(path, err, False) from err


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
        except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
            raise ModelFolderError(
                f"{self.name} cannot be read as a safetensors or PyTorch checkpoint ({err}); it may be incomplete: "
                "download or copy it again.") from err
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
