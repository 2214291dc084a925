"""The block streamer: transformer (and T5) blocks that do not fit the VRAM budget live in host memory (their
:mod:`host packs <.host_packs>`) and come to the device one block ahead of use, on a side CUDA stream, so the copy
overlaps the previous block's compute. Optionally weights are *stored* as float8_e4m3fn (half the bytes to keep or
move) and turned into the compute dtype on the device just before the block runs.

A streamed part is **one copy** per step into a device buffer of its size; every size has **at most two** device
buffers, reused: the copy stream waits on an event recorded after the last block that read a buffer before it
overwrites it, and the compute stream waits on an event recorded after the copy before the block runs. The
buffers are allocated on the compute stream and only freed after the device has synchronised, so no
``record_stream`` is needed and the copy stream never allocates (one allocator pool).

On the CPU the same code runs: the "device" buffers are CPU tensors and the copies are memcpys; only the
streams, the events and the page-locking are absent (see :mod:`.streams`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .host_packs import HostPack, host_pack
from .layout import Layout, group_parts, make_layout, tensor_views
from .planner import buffer_keys, buffer_limits
from .streams import StreamProbes, Streams

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Buffer:
    data: torch.Tensor  # uint8 on the device
    free_after: object = None  # the compute-stream event after the last block that read it


class _Pools:
    """Device buffers by (role, size), role "stored" (a streamed part's bytes) or "compute" (its fp8 weights in the
    compute dtype). Of each key at most ``limit(key)``: two (the running block's and the next one's; one without
    prefetch) times the most a group needs at once (parts of the same size; one in FLUX)."""

    def __init__(self, device, streams: Streams, limits: dict):
        self.device, self.streams, self.limits = device, streams, limits
        self.free: dict[tuple, list[_Buffer]] = {}
        self.made: dict[tuple, int] = {}

    def take(self, key: tuple, must: bool) -> _Buffer | None:
        free = self.free.setdefault(key, [])
        if free:
            return free.pop(0)
        if self.made.get(key, 0) >= self.limits.get(key, 1) and not must:
            return None  # (with ``must`` one more is made: only an unexpected block order needs that)
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
    def materializes(self) -> bool:
        """Whether its weights go into device buffers before its block runs (it streams, or it casts fp8)."""
        return any(p.streamed or p.casts for p in self.parts)

    @property
    def part_kinds(self) -> list[tuple[Layout, bool]]:
        return [(p.pack.layout, p.pack.inference) for p in self.parts]



class BlockStreamer:
    """Installs hooks on ``blocks`` (each with its extra modules) and undoes everything on ``close()``."""

    def __init__(self, blocks: list[nn.Module], extras: list[list[nn.Module]], device: torch.device,
                 resident: list[bool], compute_dtype: torch.dtype | None, storage_dtype: torch.dtype | None = None,
                 prefetch: bool = True, passes: int | None = None, copy_stream=None,
                 probes: StreamProbes | None = None):
        """``compute_dtype`` None: every weight keeps the dtype it is stored in. ``passes``: how many times the
        blocks run in this use (denoising steps, CFG passes); after each pass but the last the first group is
        prefetched for the next one (None: always). ``copy_stream``: the placement's side stream (one per
        placement); made here when missing. ``probes``: see :class:`~.streams.StreamProbes`."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.compute_dtype = compute_dtype
        self.storage_dtype = storage_dtype
        self.prefetch = prefetch
        self.passes = passes
        self.passes_done = 0
        self.probes = probes or StreamProbes()
        self.streams = Streams(self.device, copy_stream, prefetch, self.probes.trace)
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
        self._materializing = [i for i, g in enumerate(self.groups) if g.materializes]
        if self.prefetch and self._materializing:
            self._materialize(self.groups[self._materializing[0]], must=False)

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
                    part.stored = tensor_views(layout, part.resident)
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
        (in :func:`~.planner.buffer_keys` order); then its parameters view them."""
        layout = part.pack.layout
        source, staging, computed = part.resident, None, None
        with torch.inference_mode(part.pack.inference):  # buffers and views of the parameters' kind
            if part.streamed:
                key, staging = next(queue)
                part.held.append((key, staging))
                self.streams.wait(on, staging.free_after)
                if self.probes.copy_delay_cycles and self.cuda:
                    torch.cuda._sleep(self.probes.copy_delay_cycles)
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
            views = part.views[key] = tensor_views(part.pack.layout, stored, computed.data if computed is not None else None)
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

    def _next_to_materialize(self, i: int) -> int | None:
        later = [j for j in self._materializing if j > i]
        if later:
            return later[0]
        more = self.passes is None or self.passes_done + 1 < self.passes
        return self._materializing[0] if more and self._materializing else None

    def _before(self, i: int):
        def hook(module, args):
            group = self.groups[i]
            if not group.materializes:
                return
            self._running.add(i)
            if not group.materialized:
                self._materialize(group, must=True)
            self.streams.wait("compute", group.ready)
            for part in group.parts:
                for _, buf in part.held:
                    self.streams.access("read", "compute", buf.data)
            if self.prefetch:
                j = self._next_to_materialize(i)
                if j is not None and j != i and not self.groups[j].materialized:
                    self._materialize(self.groups[j], must=False)
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            group = self.groups[i]
            if group.materializes:
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
