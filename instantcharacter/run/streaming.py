"""Block streaming: transformer (and T5) blocks that do not fit the VRAM budget live in host memory and come
to the device one block ahead of use, on a side CUDA stream, so the copy overlaps the previous block's compute.
Optionally weights are *stored* as float8_e4m3fn (half the bytes to keep or move) and turned into the compute
dtype on the device just before the block runs.

A "group" is one block together with the character-attention layer(s) that run inside it, so the 57 character
layers travel with their blocks. A group is made of *parts*, one per module that owns weights (the FLUX block;
its character layer, which belongs to the adapter, a separate cached model; and, for one run, the LoRA branches
inside the block). Each part's weights live in **one flat host buffer**, exactly sized (each tensor starts on a
512-byte boundary, the buffer on a page) and page-locked with ``cudaHostRegister`` while the part streams:

* without fp8 the model's own parameters become views of that buffer (no second copy; they stay there, kept
  with the model, until something moves them);
* with fp8 the buffer is an fp8 copy made once and kept with the model (:data:`_PACKS`) until its weights
  change.

A streamed part is **one copy** per step into a device buffer of its size; every size has **at most two** device
buffers, reused: the copy stream waits on an event recorded after the last block that read a buffer before it
overwrites it, and the compute stream waits on an event recorded after the copy before the block runs. The
buffers are allocated on the compute stream and only freed after the device has synchronised, so no
``record_stream`` is needed and the copy stream never allocates (one allocator pool).

On the CPU the same code runs: the "device" buffers are CPU tensors and the copies are memcpys; only the
streams, the events and the page-locking are absent (``trace`` records what would be recorded and waited on).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..files.checkpoint import FP8_TYPES

log = logging.getLogger(__name__)

ALIGN = 512  # bytes; where the CUDA caching allocator starts a tensor, so kernels see the same alignment
PAGE = mmap.PAGESIZE
MIB = 2**20
CUDA_HOST_REGISTER_PORTABLE = 1


def module_bytes(modules, dtype: torch.dtype | None = None) -> int:
    total = 0
    for m in modules:
        for p in m.parameters():
            size = torch.empty((), dtype=dtype).element_size() if dtype is not None else p.element_size()
            total += p.numel() * size
    return total


def device_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator reserves for one tensor of ``nbytes``: large ones are rounded up to
    2 MiB, small ones to 512 bytes (an upper bound; small ones share 2 MiB segments)."""
    if nbytes > MIB:
        return -(-nbytes // (2 * MIB)) * 2 * MIB
    return -(-nbytes // ALIGN) * ALIGN


def is_lora(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def plan_residency(group_bytes: list[int], budget_bytes: float, in_flight=None) -> list[bool]:
    """Which groups stay on the device: as many bytes as the budget holds, with the streamed ones spread evenly
    through the sequence, so that each streamed block's copy overlaps the compute of the resident blocks before it.
    FLUX's blocks differ in size (a double block is about twice a single one), so the count alone does not
    decide: the resident bytes must fit. ``in_flight(resident)``: the bytes the plan needs on the device besides
    the kept groups (the streaming buffers, two of each streamed size); when nothing fits, everything streams.

    Streaming blocks of one size only can need fewer buffers (and so stream fewer bytes) than streaming a mix;
    that plan is taken only when it streams clearly less (by more than one group's bytes)."""
    n = len(group_bytes)
    extra = in_flight or (lambda resident: 0)

    def fits(resident):
        return sum(b for b, keep in zip(group_bytes, resident) if keep) + extra(resident) <= budget_bytes

    if fits([True] * n):
        return [True] * n
    candidates = []  # (streamed bytes, spread through all groups, residency)
    for pool_index, pool in enumerate(streaming_choices(group_bytes)):
        for resident in pool:  # fewest streamed first
            if fits(resident):
                candidates.append((sum(b for b, keep in zip(group_bytes, resident) if not keep), pool_index == 0,
                                   resident))
                break
    if not candidates:
        return [False] * n
    least = min(c[0] for c in candidates)
    spread = [c for c in candidates if c[1] and c[0] <= least + max(group_bytes)]
    return spread[0][2] if spread else min(candidates, key=lambda c: c[0])[2]


def streaming_choices(group_bytes: list[int]) -> list[list[list[bool]]]:
    """The residencies a plan chooses from, by pool: streamed groups spread through all groups, then (when the
    sizes differ) through the groups of one size only; in each pool with 1, 2, … streamed."""
    n = len(group_bytes)
    sizes = sorted(set(group_bytes))
    pools = [list(range(n))] + ([[i for i in range(n) if group_bytes[i] == s] for s in sizes] if len(sizes) > 1
                                else [])
    out = []
    for positions in pools:
        choices = []
        for streamed in range(1, len(positions) + 1):
            resident = [True] * n
            for i, keep in zip(positions, _spread_out(len(positions), streamed)):
                resident[i] = keep
            choices.append(resident)
        out.append(choices)
    return out


def _spread_out(n: int, streamed: int) -> list[bool]:
    """Residency with ``streamed`` of ``n`` positions streamed, evenly spaced (Bresenham)."""
    marks = [False] * n
    for k in range(streamed):
        marks[min(n - 1, (k * n + n // 2) // streamed)] = True
    i = 0
    while sum(marks) < streamed:  # rounding collisions
        marks[i] = True
        i += 1
    return [not m for m in marks]


# ---- layouts: where each tensor of a part lies in its flat buffer ----------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The flat form of a part: tensor ``i`` is stored as ``dtypes[i]`` at byte ``offsets[i]``. The ``cast``
    tensors (stored fp8, used in ``compute_dtype``) come first, so one kernel turns all of them into the compute
    buffer, where tensor ``i`` is at element ``offsets[i]``."""

    offsets: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    cast: tuple[bool, ...]
    nbytes: int  # the stored bytes: the host buffer, and its device copy
    cast_nbytes: int  # the fp8 bytes at the front that are cast
    compute_dtype: torch.dtype | None

    @property
    def compute_nbytes(self) -> int:
        if not self.cast_nbytes:
            return 0
        return self.cast_nbytes * torch.empty((), dtype=self.compute_dtype).element_size()


def _align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def make_layout(tensors, storage_dtype: torch.dtype | None, compute_dtype: torch.dtype | None) -> Layout:
    """The layout of ``tensors`` (parameters, also on ``meta``). fp8 storage applies to floating weights of two or
    more dimensions (not biases and norms); weights already in e4m3fn are taken as they are, other fp8 kinds are
    kept as stored (their layers cast them)."""
    casting = (storage_dtype is not None and compute_dtype is not None and compute_dtype not in FP8_TYPES)
    dtypes, cast = [], []
    for t in tensors:
        fp8 = casting and t.is_floating_point() and t.dim() >= 2 and (t.dtype == storage_dtype or
                                                                          t.dtype not in FP8_TYPES)
        dtypes.append(storage_dtype if fp8 else t.dtype)
        cast.append(fp8)
    offsets = [0] * len(dtypes)
    position = 0
    for first in (True, False):  # the cast tensors first
        for i, t in enumerate(tensors):
            if cast[i] == first:
                offsets[i] = position
                position = _align(position + t.numel() * torch.empty((), dtype=dtypes[i]).element_size())
        if first:
            cast_nbytes = position
    return Layout(tuple(offsets), tuple(dtypes), tuple(tuple(t.shape) for t in tensors), tuple(cast), position,
                  cast_nbytes, compute_dtype if casting else None)


def _views(layout: Layout, stored: torch.Tensor, computed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Tensors of ``layout`` as views of the uint8 buffer ``stored`` (and the cast ones of ``computed``)."""
    out = []
    csize = torch.empty((), dtype=layout.compute_dtype).element_size() if computed is not None else 0
    for off, dtype, shape, cast in zip(layout.offsets, layout.dtypes, layout.shapes, layout.cast):
        numel = math.prod(shape)
        if cast and computed is not None:
            view = computed[off * csize:(off + numel) * csize].view(layout.compute_dtype)
        else:
            size = torch.empty((), dtype=dtype).element_size()
            view = stored[off:off + numel * size].view(dtype)
        out.append(view.view(shape))
    return out


# ---- host packs: one flat buffer per part, kept with the model ----------------------------------------------


def host_buffer(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
    """A zeroed uint8 CPU tensor of ``nbytes`` rounded up to whole pages, starting on a page (so that page-locking
    it never touches memory that is not ours). The numpy array owns the memory; it dies with the last view."""
    span = max(PAGE, _align(nbytes, PAGE))
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
            views = _views(layout, flat)
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
builds = {"view": 0, "copy": 0}  # packs built in this process (tests count re-quantizations with it)


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
    builds[kind] += 1
    return pack


# ---- streams: CUDA's, or their record on the CPU -----------------------------------------------------------


class _Streams:
    """The compute stream (the caller's current one) and the copy stream. Copies run on the copy stream when
    there is one (prefetch), else on the compute stream. ``trace``, when a list, receives every access, record,
    wait and free in issue order, as ``(op, stream, key)``: what a test checks the ordering with."""

    def __init__(self, device: torch.device, copy_stream, prefetch: bool, trace: list | None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.has_copy = prefetch
        self.copy_stream = copy_stream if (self.cuda and prefetch) else None
        if self.cuda and prefetch and copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device)
        self.trace = trace
        self._tokens = itertools.count()

    def name(self, on: str) -> str:
        return "copy" if on == "copy" and self.has_copy else "compute"

    def _stream(self, on: str):
        if self.name(on) == "copy":
            return self.copy_stream
        return torch.cuda.current_stream(self.device)

    @contextlib.contextmanager
    def use(self, on: str):
        if self.cuda:
            with torch.cuda.stream(self._stream(on)):
                yield
        else:
            yield

    def record(self, on: str):
        if self.cuda:
            token = torch.cuda.Event()
            token.record(self._stream(on))
        else:
            token = next(self._tokens)
        if self.trace is not None:
            self.trace.append(("record", self.name(on), id(token) if self.cuda else token))
        return token

    def wait(self, on: str, token) -> None:
        if token is None:
            return
        if self.cuda:
            self._stream(on).wait_event(token)
        if self.trace is not None:
            self.trace.append(("wait", self.name(on), id(token) if self.cuda else token))

    def access(self, op: str, on: str, buf: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace.append((op, self.name(on), buf.data_ptr()))

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self.trace is not None:
            self.trace.append(("sync", "host", None))


# ---- device buffers: at most two per size, reused -----------------------------------------------------------


@dataclass(eq=False)
class _Buffer:
    data: torch.Tensor  # uint8 on the device
    free_after: object = None  # the compute-stream event after the last block that read it


class _Pools:
    """Device buffers by (role, size), role "stored" (a streamed part's bytes) or "compute" (its fp8 weights in the
    compute dtype). Of each key at most ``limit(key)``: two (the running block's and the next one's; one without
    prefetch) times the most a group needs at once (parts of the same size; one in FLUX)."""

    def __init__(self, device, streams: _Streams, limits: dict):
        self.device, self.streams, self.limits = device, streams, limits
        self.free: dict[tuple, list[_Buffer]] = {}
        self.made: dict[tuple, int] = {}
        self.overflow = 0  # buffers made beyond the limit (only an unexpected block order does that)

    def take(self, key: tuple, must: bool) -> _Buffer | None:
        free = self.free.setdefault(key, [])
        if free:
            return free.pop(0)
        if self.made.get(key, 0) >= self.limits.get(key, 1):
            if not must:
                return None
            self.overflow += 1
        self.made[key] = self.made.get(key, 0) + 1
        with torch.inference_mode(key[2]):  # of the kind of the parameters that will view it
            buf = _Buffer(torch.empty(key[1], dtype=torch.uint8, device=self.device))
        self.streams.access("alloc", "compute", buf.data)
        return buf

    def give(self, key: tuple, buf: _Buffer) -> None:
        self.free.setdefault(key, []).append(buf)

    def most_per_key(self) -> int:
        return max(self.made.values(), default=0)

    def all(self):
        return [b for bufs in self.free.values() for b in bufs]


def buffer_keys(layouts: list, streamed: bool) -> list[tuple]:
    """The device buffers one group holds while it runs: (role, bytes, inference tensor) per streamed part and per
    cast part. ``layouts``: the parts' layouts, or (layout, inference tensors) pairs."""
    keys = []
    for item in layouts:
        lay, inference = item if isinstance(item, tuple) else (item, False)
        if streamed:
            keys.append(("stored", lay.nbytes, inference))
        if lay.cast_nbytes:
            keys.append(("compute", lay.compute_nbytes, inference))
    return keys


def buffer_limits(groups: list[tuple[list[Layout], bool]], prefetch: bool) -> dict[tuple, int]:
    """How many device buffers of each key a run makes at most (``groups``: layouts, streamed)."""
    from collections import Counter

    most: Counter = Counter()
    for layouts, streamed in groups:
        for key, count in Counter(buffer_keys(layouts, streamed)).items():
            most[key] = max(most[key], count)
    return {key: (2 if prefetch else 1) * count for key, count in most.items()}


# ---- the streamer ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Part:
    pack: HostPack
    params: list[nn.Parameter]
    streamed: bool
    home: list[torch.Tensor]  # each parameter's tensor outside the run
    stored: list[torch.Tensor] = field(default_factory=list)  # between uses: host views or resident device views
    resident: torch.Tensor | None = None  # the device copy of the stored bytes
    per_run: bool = False  # the LoRA part: its pack is made for this run only
    flat: torch.Tensor | None = None  # the host buffer, held for the run
    held: list = field(default_factory=list)  # (pool key, buffer) taken while materialised
    views: dict = field(default_factory=dict)  # (staging buffer, compute buffer) ids -> the tensors in them

    @property
    def casts(self) -> bool:
        return self.pack.layout.cast_nbytes > 0


@dataclass(eq=False)
class _Group:
    parts: list[_Part]
    resident: bool
    ready: object = None  # the event after this group's copies and casts
    materialized: bool = False

    @property
    def needy(self) -> bool:
        return any(p.streamed or p.casts for p in self.parts)

    @property
    def part_kinds(self) -> list[tuple[Layout, bool]]:
        return [(p.pack.layout, p.pack.inference) for p in self.parts]


def group_parts(modules: list[nn.Module]) -> list[tuple[nn.Module | None, list[nn.Parameter]]]:
    """The parts of a group: each module's own weights, then (for one run) every LoRA weight of the group."""
    parts, lora, seen = [], [], set()
    for module in modules:
        own = []
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (lora if is_lora(name) else own).append(p)
        if own:
            parts.append((module, own))
    if lora:
        parts.append((None, lora))
    return parts


def group_layouts(modules, storage_dtype, compute_dtype) -> list[Layout]:
    """The layouts of a group's parts (also for models on ``meta``: the residency plan's arithmetic)."""
    return [make_layout([p for p in params], storage_dtype if owner is not None else None, compute_dtype)
            for owner, params in group_parts(modules)]


class BlockStreamer:
    """Installs hooks on ``blocks`` (each with its extra modules) and undoes everything on ``close()``."""

    copy_delay_cycles = 0  # tests: GPU cycles slept on the copy stream before each copy (stress of the waits)

    def __init__(self, blocks: list[nn.Module], extras: list[list[nn.Module]], device: torch.device,
                 resident: list[bool], compute_dtype: torch.dtype | None, storage_dtype: torch.dtype | None = None,
                 prefetch: bool = True, passes: int | None = None, copy_stream=None, trace: list | None = None):
        """``compute_dtype`` None: every weight keeps the dtype it is stored in. ``passes``: how many times the
        blocks run in this use (denoising steps, CFG passes); after each pass but the last the first group is
        prefetched for the next one (None: always). ``copy_stream``: the placement's side stream (one per
        placement); made here when missing."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.compute_dtype = compute_dtype
        self.storage_dtype = storage_dtype
        self.prefetch = prefetch
        self.passes = passes
        self.passes_done = 0
        self.streams = _Streams(self.device, copy_stream, prefetch, trace)
        self.bytes_moved = 0
        self.unpinned_bytes = 0
        self.pinned_bytes = 0
        self.groups: list[_Group] = []
        self.pools = _Pools(self.device, self.streams, {})
        self._hooks = []
        self._running: set[int] = set()
        self._closed = False
        try:
            with torch.no_grad():
                for block, extra, keep in zip(blocks, extras, resident):
                    self.groups.append(_Group([], keep))  # listed first: close() restores what is built
                    self._build(self.groups[-1], [block, *extra])
                self._upload_resident()
            self.pools = _Pools(self.device, self.streams, buffer_limits(
                [(g.part_kinds, not g.resident) for g in self.groups], prefetch))
        except BaseException:
            self.close()
            raise
        for i, block in enumerate(blocks[:len(self.groups)]):
            self._hooks.append(block.register_forward_pre_hook(self._before(i)))
            self._hooks.append(block.register_forward_hook(self._after(i)))
        if self.unpinned_bytes:
            log.warning("%.2f GiB of streamed weights could not be page-locked (the driver refused): those blocks "
                        "copy from pageable memory, which is slower and does not overlap compute as well.",
                        self.unpinned_bytes / 2**30)
        # the resident copies were queued on the compute stream; casts on the copy stream read them
        self.streams.wait("copy", self.streams.record("compute"))
        self._needy = [i for i, g in enumerate(self.groups) if g.needy]
        if self.prefetch and self._needy:
            self._materialize(self.groups[self._needy[0]], must=False)

    # -- setup

    def _build(self, group: _Group, modules: list[nn.Module]) -> None:
        keep = group.resident
        for owner, params in group_parts(modules):
            if owner is None:  # LoRA branches: exact (no fp8), made for this run only
                layout = make_layout([p.data for p in params], None, self.compute_dtype)
                pack = HostPack(params, layout, "view")
                per_run = True
            else:
                pack = host_pack(owner, params, self.storage_dtype, self.compute_dtype)
                params = pack.params  # the pack's order
                per_run = False
            home = [p.data for p in params]
            part = _Part(pack, params, streamed=not keep, home=home, per_run=per_run, flat=pack.flat)
            part.stored = pack.views
            group.parts.append(part)
            if part.streamed and self.cuda:
                if part.pack.pin(self.device):
                    self.pinned_bytes += pack.span
                else:
                    self.unpinned_bytes += pack.layout.nbytes
            elif not per_run:
                pack.unpin()  # page-locked memory is exactly what streams
            for p, t in zip(params, part.stored):
                p.data = t

    def _upload_resident(self) -> None:
        for group in self.groups:
            for part in group.parts:
                if part.streamed:
                    continue
                layout = part.pack.layout
                with torch.inference_mode(part.pack.inference):
                    part.resident = torch.empty(max(layout.nbytes, 1), dtype=torch.uint8, device=self.device)
                    self.streams.access("alloc", "compute", part.resident)
                    part.resident[:layout.nbytes].copy_(part.flat[:layout.nbytes], non_blocking=True)
                    self.streams.access("write", "compute", part.resident)
                    part.stored = _views(layout, part.resident)
                for p, t in zip(part.params, part.stored):
                    p.data = t

    # -- one group to the device and back

    def _materialize(self, group: _Group, must: bool) -> bool:
        """Queue ``group``'s copies (and casts) and give its parameters their device views. Without ``must``
        (a prefetch) nothing happens when no buffer is free."""
        on = "copy" if self.prefetch else "compute"
        taken = []
        for key in buffer_keys(group.part_kinds, not group.resident):
            buf = self.pools.take(key, must=False)
            if buf is None and must:
                self._evict(key)
                buf = self.pools.take(key, must=True)
            if buf is None:
                for k, b in taken:
                    self.pools.give(k, b)
                return False
            taken.append((key, buf))
        queue = iter(taken)
        with self.streams.use(on):
            for part in group.parts:
                self._queue_part(part, queue, on)
        group.ready = self.streams.record(on)
        group.materialized = True
        return True

    def _queue_part(self, part: _Part, queue, on: str) -> None:
        """One part's copy (when it streams) and cast (when it is fp8), on stream ``on``, into buffers from ``queue``
        (in :func:`buffer_keys` order); then its parameters view them."""
        layout = part.pack.layout
        source, staging, computed = part.resident, None, None
        with torch.inference_mode(part.pack.inference):  # buffers and views of the parameters' kind
            if part.streamed:
                key, staging = next(queue)
                part.held.append((key, staging))
                self.streams.wait(on, staging.free_after)
                if self.copy_delay_cycles and self.cuda:
                    torch.cuda._sleep(self.copy_delay_cycles)
                staging.data.copy_(part.flat[:layout.nbytes], non_blocking=True)
                self.streams.access("write", on, staging.data)
                self.bytes_moved += layout.nbytes
                source = staging.data
            if part.casts:
                key, computed = next(queue)
                part.held.append((key, computed))
                self.streams.wait(on, computed.free_after)
                cast = computed.data[:layout.compute_nbytes].view(layout.compute_dtype)
                cast.copy_(source[:layout.cast_nbytes].view(self.storage_dtype))
                self.streams.access("read", on, source)
                self.streams.access("write", on, computed.data)
            views = self._views_in(part, staging, computed)
        for p, t in zip(part.params, views):
            p.data = t

    @staticmethod
    def _views_in(part: _Part, staging: _Buffer | None, computed: _Buffer | None) -> list[torch.Tensor]:
        key = (id(staging), id(computed))
        views = part.views.get(key)
        if views is None:
            stored = staging.data if staging is not None else part.resident
            views = part.views[key] = _views(part.pack.layout, stored, computed.data if computed is not None else None)
        return views

    def _release(self, group: _Group) -> None:
        """After ``group``'s block has run: its buffers may be reused once the compute stream is past it."""
        token = self.streams.record("compute")
        for part in group.parts:
            for size, buf in part.held:
                buf.free_after = token
                self.pools.give(size, buf)
            part.held.clear()
            for p, t in zip(part.params, part.stored):
                p.data = t
        group.ready = None
        group.materialized = False

    def _evict(self, key: tuple) -> None:
        """Free a buffer of ``key`` held by a prefetched group that is not running (an unexpected block order)."""
        for i, group in enumerate(self.groups):
            if group.materialized and i not in self._running and any(
                    k == key for part in group.parts for k, _ in part.held):
                self._release(group)
                return

    def _next_needy(self, i: int) -> int | None:
        later = [j for j in self._needy if j > i]
        if later:
            return later[0]
        more = self.passes is None or self.passes_done + 1 < self.passes
        return self._needy[0] if more and self._needy else None

    def _before(self, i: int):
        def hook(module, args):
            group = self.groups[i]
            if not group.needy:
                return
            self._running.add(i)
            if not group.materialized:
                self._materialize(group, must=True)
            self.streams.wait("compute", group.ready)
            for part in group.parts:
                for _, buf in part.held:
                    self.streams.access("read", "compute", buf.data)
            if self.prefetch:
                j = self._next_needy(i)
                if j is not None and j != i and not self.groups[j].materialized:
                    self._materialize(self.groups[j], must=False)
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            group = self.groups[i]
            if group.needy:
                self._release(group)
                self._running.discard(i)
            if i == len(self.groups) - 1:
                self.passes_done += 1
        return hook

    # -- what the run used

    def buffers_per_size(self) -> int:
        """The most device buffers made for any one (role, size) (two at most in FLUX, by construction)."""
        return self.pools.most_per_key()

    def close(self) -> None:
        """Remove the hooks, give every parameter back the tensor it had outside the run, wait for the device and
        release every device buffer (also after an exception inside a block)."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        try:
            for group in self.groups:
                for part in group.parts:
                    for p, t in zip(part.params, part.home):
                        p.data = t
        finally:
            try:
                self.streams.synchronize()  # nothing in flight reads or writes what is freed below
            finally:
                buffers = self.pools.all()
                for group in self.groups:
                    for part in group.parts:
                        buffers += [buf for _, buf in part.held]
                        if part.resident is not None:
                            self.streams.access("free", "compute", part.resident)
                        part.resident = None
                        part.stored, part.views, part.flat = [], {}, None
                        part.held.clear()
                        if part.per_run:
                            part.pack.unpin()
                    group.ready = None
                    group.materialized = False
                for buf in buffers:
                    self.streams.access("free", "compute", buf.data)
                self.pools.free.clear()
                self._running.clear()
