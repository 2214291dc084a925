"""The flat form of a streamed part: where each of its tensors lies in one buffer, and in which dtype.

A *group* is one block together with the character-attention layer(s) that run inside it, so the 57 character
layers travel with their blocks. A group is made of *parts*, one per module that owns weights (the FLUX block;
its character layer, which belongs to the adapter, a separate cached model; and, for one run, the LoRA branches
inside the block). Each part's weights live in one flat buffer: each tensor starts on a 512-byte boundary (where
the CUDA caching allocator starts a tensor, so kernels see the same alignment), the tensors stored as fp8 first.
Layouts work on ``meta`` tensors too (the residency plan's arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...files.checkpoint import FP8_TYPES

ALIGN = 512  # bytes; where the CUDA caching allocator starts a tensor, so kernels see the same alignment


def is_lora(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


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


def align(n: int, to: int = ALIGN) -> int:
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
                position = align(position + t.numel() * torch.empty((), dtype=dtypes[i]).element_size())
        if first:
            cast_nbytes = position
    return Layout(tuple(offsets), tuple(dtypes), tuple(tuple(t.shape) for t in tensors), tuple(cast), position,
                  cast_nbytes, compute_dtype if casting else None)


def tensor_views(layout: Layout, stored: torch.Tensor, computed: torch.Tensor | None = None) -> list[torch.Tensor]:
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

