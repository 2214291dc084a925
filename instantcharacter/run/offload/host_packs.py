"""Host packs: the weights of one streamed part in one flat, page-aligned host buffer, kept with the model.

Each buffer is exactly sized (each tensor starts on a 512-byte boundary, the buffer on a page) and page-locked
with ``cudaHostRegister`` only while its part streams, so the page-locked memory is the streamed bytes:

* without fp8 the model's own parameters become views of that buffer (no second copy; they stay there, kept
  with the model, until something moves them);
* with fp8 the buffer is an fp8 copy made once and kept with the model (:data:`_PACKS`) until its weights
  change.
"""

from __future__ import annotations

import mmap
import weakref

import numpy as np
import torch
from torch import nn

from .layout import Layout, align, make_layout, tensor_views

PAGE = mmap.PAGESIZE
CUDA_HOST_REGISTER_PORTABLE = 1


def host_buffer(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
    """A zeroed uint8 CPU tensor of ``nbytes`` rounded up to whole pages, starting on a page (so that page-locking
    it never touches memory that is not ours). The numpy array owns the memory; it dies with the last view."""
    span = max(PAGE, align(nbytes, PAGE))
    array = np.zeros(span + PAGE, dtype=np.uint8)
    start = (-array.ctypes.data) % PAGE
    return torch.from_numpy(array)[start:start + span], array


def _clear_cuda_error(device) -> None:
    """A failed CUDA runtime call leaves its error to be reported by the next kernel launch check: take it there."""
    try:
        torch.empty(1, device=device).add_(0)
    except RuntimeError:
        pass


def _unregister(ptr: int, device) -> None:
    try:
        if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
            _clear_cuda_error(device)
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone; the driver unpins on exit
        pass


def inference_mode_of(params) -> bool:
    """Whether ``params`` are inference tensors (a model loaded under ``torch.inference_mode``, as ComfyUI loads
    them). A parameter's data must keep its kind (an inference parameter with a normal tensor as data fails when
    used), so every buffer and view the streamer gives it is made in the same mode."""
    kinds = {p.is_inference() for p in params}
    if len(kinds) > 1:
        raise RuntimeError("Some weights of one module are inference tensors and others are not; load the model "
                           "in one go (all inside or all outside torch.inference_mode).")
    return kinds.pop() if kinds else False


def _version(p: torch.Tensor) -> int | None:
    """The in-place change counter; None for inference tensors (made under ``torch.inference_mode``, as ComfyUI
    loads models), which cannot be changed in place outside it."""
    try:
        return p._version
    except RuntimeError:
        return None


_PINNED: "weakref.WeakSet[HostPack]" = weakref.WeakSet()


def pinned_host_bytes() -> int:
    """Host memory this process page-locked for streaming (all live packs)."""
    return sum(pack.pinned_bytes for pack in list(_PINNED))


class HostPack:
    """The weights of one part in one flat host buffer. ``kind`` "view": the parameters themselves become views
    of the buffer, and the buffer lives as long as they view it (a model moved elsewhere, e.g. to the GPU by
    ``off``, leaves no host copy behind); "copy": the buffer is a converted copy (fp8), kept by the pack, and the
    parameters are left as they are."""

    def __init__(self, params: list[nn.Parameter], layout: Layout, kind: str):
        self.kind = kind
        self.layout = layout
        self.inference = inference_mode_of(params)
        with torch.inference_mode(self.inference), torch.no_grad():
            flat, array = host_buffer(layout.nbytes)
            views = tensor_views(layout, flat)
            self._refs = [weakref.ref(p) for p in params]
            self._sources = []
            for p, view in zip(params, views):
                view.copy_(p.data)  # fp8 storage: the one conversion, kept until the weights change
                if kind == "view":
                    p.data = view  # the old storage is freed here, one tensor at a time
                else:
                    self._sources.append((p.data.data_ptr(), _version(p), p.data.device))
        self.ptr, self.span = flat.data_ptr(), flat.numel()
        self._start = self.ptr - array.ctypes.data
        self._ptrs = [v.data_ptr() for v in views]
        self._array = array if kind == "copy" else None
        self._array_ref = weakref.ref(array)
        self._copy_views = views if kind == "copy" else None
        self._unpin: weakref.finalize | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [r() for r in self._refs]

    @property
    def alive(self) -> bool:
        return self._array_ref() is not None

    @property
    def flat(self) -> torch.Tensor:
        """The whole buffer as uint8 (pages, the layout's bytes first)."""
        array = self._array_ref()
        if array is None:
            raise RuntimeError("The weights have left this host buffer.")
        with torch.inference_mode(self.inference):
            return torch.from_numpy(array)[self._start:self._start + self.span]

    @property
    def views(self) -> list[torch.Tensor]:
        """The tensors in the buffer, as stored (for a "view" pack: the parameters' own data)."""
        if self._copy_views is not None:
            return list(self._copy_views)
        return [p.data for p in self.params]

    @property
    def pinned(self) -> bool:
        return self._unpin is not None and self._unpin.alive

    @property
    def pinned_bytes(self) -> int:
        return self.span if self.pinned else 0

    def matches(self, params: list[nn.Parameter], layout: Layout) -> bool:
        """Still the weights of ``params`` (the same parameters, in the same storage, unchanged)."""
        if (layout != self.layout or len(params) != len(self._refs) or not self.alive
                or inference_mode_of(params) != self.inference):
            return False
        mine = self.params
        if any(p is None for p in mine) or {id(p) for p in mine} != {id(p) for p in params}:
            return False
        if self.kind == "view":
            return all(p.data.device.type == "cpu" and p.data.data_ptr() == ptr and p.dtype == dtype
                       and tuple(p.shape) == shape
                       for p, ptr, dtype, shape in zip(mine, self._ptrs, layout.dtypes, layout.shapes))
        return all((p.data.data_ptr(), _version(p), p.data.device) == source for p, source in zip(mine, self._sources))

    def pin(self, device) -> bool:
        """Page-lock the buffer (``cudaHostRegister``, exactly its pages); False when the driver refuses."""
        if self.pinned:
            return True
        array = self._array_ref()
        if array is None:
            return False
        try:
            ok = int(torch.cuda.cudart().cudaHostRegister(self.ptr, self.span, CUDA_HOST_REGISTER_PORTABLE)) == 0
        except Exception:  # noqa: BLE001 - no CUDA runtime bindings: treat as refused
            ok = False
        if not ok:
            _clear_cuda_error(device)
            return False
        # unregistered before the memory is freed: numpy clears weak references before it frees the data
        self._unpin = weakref.finalize(array, _unregister, self.ptr, device)
        self._unpin.atexit = False
        _PINNED.add(self)
        return True

    def unpin(self) -> None:
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        _PINNED.discard(self)


# Packs kept with their module (so with the cached model): {"view" or "fp8": HostPack}
_PACKS: "weakref.WeakKeyDictionary[nn.Module, dict[str, HostPack]]" = weakref.WeakKeyDictionary()


def host_pack(module: nn.Module, params: list[nn.Parameter], storage_dtype, compute_dtype) -> HostPack:
    """The kept pack of ``module``'s ``params`` for this storage, built when missing or out of date."""
    kind = "copy" if storage_dtype is not None else "view"
    key = f"{kind}:{storage_dtype}"
    layout = make_layout([p.data for p in params], storage_dtype, compute_dtype)
    packs = _PACKS.setdefault(module, {})
    pack = packs.get(key)
    if pack is not None and pack.matches(params, layout):
        return pack
    if pack is not None:
        pack.unpin()
        del packs[key]  # the old buffer goes before the new one is made
        pack = None
    pack = packs[key] = HostPack(params, layout, kind)
    return pack


