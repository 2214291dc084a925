"""Block streaming: transformer blocks that do not fit the VRAM budget live in (pinned) host memory and
come to the GPU one block ahead of use, on a side CUDA stream, so the copy overlaps the previous block's
compute. Optionally weights are *stored* as float8_e4m3fn (half the bytes to keep or move) and turned
into the compute dtype on the GPU just before the block runs.

Each "group" is one FLUX block together with the character-attention layer(s) that run inside it, so the
57 character layers travel with their blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn


def module_bytes(modules, dtype: torch.dtype | None = None) -> int:
    total = 0
    for m in modules:
        for p in m.parameters():
            size = torch.empty((), dtype=dtype).element_size() if dtype is not None else p.element_size()
            total += p.numel() * size
    return total


def plan_residency(group_bytes: list[int], budget_bytes: float) -> list[bool]:
    """Which groups stay on the GPU: as many as the budget holds, with the streamed ones spread evenly through
    the sequence, so that each streamed block's copy overlaps the compute of the resident blocks before it.
    FLUX's blocks differ in size (a double block is about twice a single one), so the count alone does not
    decide: the resident bytes must fit."""
    n = len(group_bytes)
    if sum(group_bytes) <= budget_bytes:
        return [True] * n
    for streamed in range(1, n):
        resident = _spread_out(n, streamed)
        if sum(b for b, keep in zip(group_bytes, resident) if keep) <= budget_bytes:
            return resident
    return [False] * n


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


@dataclass
class _Group:
    modules: list[nn.Module]
    resident: bool
    params: list[nn.Parameter] = field(default_factory=list)
    stored: list[torch.Tensor] = field(default_factory=list)  # the kept copy (host or GPU, storage dtype)
    original: list[torch.Tensor | None] = field(default_factory=list)  # param.data before, where it differs
    ready: object = None  # CUDA event: the copy to the GPU has finished


class BlockStreamer:
    """Installs hooks on ``blocks`` (each with its extra modules) and undoes everything on ``close()``."""

    def __init__(self, blocks: list[nn.Module], extras: list[list[nn.Module]], device: torch.device,
                 resident: list[bool], compute_dtype: torch.dtype | None, storage_dtype: torch.dtype | None = None,
                 prefetch: bool = True, repeats: bool = True):
        """``compute_dtype`` None: every weight keeps the dtype it is stored in. ``repeats``: the blocks run
        again after the last one (denoising steps), so the first streamed block is prefetched then."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.compute_dtype = compute_dtype
        self.storage_dtype = storage_dtype
        self.prefetch = prefetch and self.cuda
        self.repeats = repeats
        self.copy_stream = torch.cuda.Stream(self.device) if self.prefetch else None
        self.bytes_moved = 0
        self.unpinned_bytes = 0
        self.groups: list[_Group] = []
        self._hooks = []
        self._closed = False
        for block, extra, keep in zip(blocks, extras, resident):
            group = _Group([block, *extra], keep)
            for m in group.modules:
                for name, p in m.named_parameters():
                    # LoRA factors are small-valued (fp8 would flush most of them to zero) and small in bytes
                    stored = self._store(p.data, keep, exact=".lora_" in name or name.startswith("lora_"))
                    same = stored.dtype == p.dtype and stored.device == p.device
                    group.params.append(p)
                    # Keep the original only where the stored copy could not stand in for it afterwards
                    # (another dtype, or a device copy of a host tensor): no second host copy otherwise.
                    group.original.append(None if same or (not keep and stored.dtype == p.dtype) else p.data)
                    group.stored.append(stored)
                    p.data = stored  # streamed and fp8 weights are materialised just before use
            self.groups.append(group)
        for i, group in enumerate(self.groups):
            self._hooks.append(group.modules[0].register_forward_pre_hook(self._before(i)))
            self._hooks.append(group.modules[0].register_forward_hook(self._after(i)))
        if self.copy_stream is not None:
            # the resident copies made above were queued on the compute stream; the side stream reads them
            # (fp8 → compute dtype) and must not start before they exist
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    @property
    def _needs_cast(self) -> bool:
        return self.storage_dtype is not None and self.storage_dtype != self.compute_dtype

    def _store(self, data: torch.Tensor, resident: bool, exact: bool = False) -> torch.Tensor:
        dtype = self.storage_dtype if (self.storage_dtype is not None and not exact and data.is_floating_point()
                                       and data.ndim >= 2) else data.dtype
        target = self.device if resident else torch.device("cpu")
        out = data.to(device=target, dtype=dtype)
        if not resident and self.cuda and not out.is_pinned():
            try:
                out = out.pin_memory()
            except RuntimeError:  # page-locked memory exhausted: pageable copies still work, more slowly
                self.unpinned_bytes += out.numel() * out.element_size()
        return out

    def _materialize(self, group: _Group) -> None:
        """Give every parameter of ``group`` a compute-dtype copy on the device."""
        stream = self.copy_stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for p, stored in zip(group.params, group.stored):
                on_device = stored.to(self.device, non_blocking=True) if stored.device != self.device else stored
                if not stored.device == self.device:
                    self.bytes_moved += stored.numel() * stored.element_size()
                want = self.compute_dtype if p.is_floating_point() or stored.is_floating_point() else stored.dtype
                if want is not None and on_device.is_floating_point() and on_device.dtype != want and stored.ndim >= 2:
                    on_device = on_device.to(want)
                p.data = on_device
            if stream is not None:
                group.ready = torch.cuda.Event()
                group.ready.record(stream)

    def _release(self, group: _Group) -> None:
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        for p, stored in zip(group.params, group.stored):
            if current is not None and p.data.device.type == "cuda" and p.data.data_ptr() != stored.data_ptr():
                p.data.record_stream(current)
            p.data = stored
        group.ready = None

    def _next_streamed(self, i: int) -> int | None:
        for j in range(i + 1, len(self.groups)):
            if not self.groups[j].resident or self._needs_cast:
                return j
        return None

    def _before(self, i: int):
        def hook(module, args):
            group = self.groups[i]
            needs = (not group.resident) or self._needs_cast
            if needs and group.ready is None and not self._is_materialized(group):
                self._materialize(group)
            if group.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(group.ready)
            if self.prefetch:
                j = self._next_streamed(i)
                if j is not None and self.groups[j].ready is None and not self._is_materialized(self.groups[j]):
                    self._materialize(self.groups[j])
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            group = self.groups[i]
            if (not group.resident) or self._needs_cast:
                self._release(group)
            if self.prefetch and self.repeats and i == len(self.groups) - 1:
                first = self._next_streamed(-1)  # the next step starts with it
                if first is not None and self.groups[first].ready is None:
                    self._materialize(self.groups[first])
        return hook

    @staticmethod
    def _is_materialized(group: _Group) -> bool:
        return any(p.data.data_ptr() != s.data_ptr() for p, s in zip(group.params, group.stored))

    def close(self) -> None:
        """Remove the hooks and give every parameter back the tensor it had before."""
        if self._closed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        for group in self.groups:
            for p, stored, original in zip(group.params, group.stored, group.original):
                p.data = original if original is not None else stored
            group.ready = None
        self._closed = True

