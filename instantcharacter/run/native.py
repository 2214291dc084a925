"""The part of the native path (ComfyUI's own FLUX model) that needs no ComfyUI: the characters applied to one
MODEL and what one model call tells them.

The node layer builds a :class:`CallState` once per model call (sigma, which batch rows are the negative pass,
text length, the grid of generated image tokens) and every block reads it, so no block looks at ComfyUI's
per-block options or syncs with the host. The projector takes the timestep on the 0–1000 scale, sigma × 1000,
as in the pipeline path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model.adapter import InstantCharacterAdapter
from ..reference.encoders import ReferenceFeatures
from .regions import share_overlaps, token_region

@dataclass(frozen=True)
class CallState:
    """One call of the diffusion model."""

    sigma: float
    negative_rows: tuple[bool, ...]  # per batch row: the negative (uncond) pass
    text_len: int
    grid: tuple[int, int]  # generated image tokens: rows, columns (row-major order)
    image_tokens: int  # generated + reference (Kontext) image tokens, in that order
    device: torch.device

    @property
    def generated(self) -> int:
        return self.grid[0] * self.grid[1]


class CharacterEntry:
    """One Apply node: a character with its weight, its window of the schedule and an optional region.

    The window is ``start_percent``–``end_percent`` of the schedule, turned into sigmas when sampling starts
    (:meth:`set_window`), so a sampling-shift node placed after Apply moves it as it moves the schedule. The
    sigmas given at construction serve calls made outside a sampling run. Tokens are computed once per sigma
    (the latest is kept until :meth:`reset`).
    """

    def __init__(self, adapter: InstantCharacterAdapter, features: ReferenceFeatures, weight: float,
                 start_percent: float = 0.0, end_percent: float = 1.0, on_negative: bool = True,
                 mask: torch.Tensor | None = None, sigma_start: float = 1.0, sigma_end: float = 0.0):
        features.check_fits(adapter.image_proj.config.feature_dim)
        self.adapter = adapter
        self.features = features
        self.weight = float(weight)
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.on_negative = on_negative
        self.mask = mask
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self._merged: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._tokens_key: float | None = None
        self._regions: dict[tuple[int, int], torch.Tensor] = {}

    def set_window(self, percent_to_sigma: Callable[[float], float]) -> None:
        self.sigma_start = float(percent_to_sigma(self.start_percent))
        self.sigma_end = float(percent_to_sigma(self.end_percent))

    def reset(self) -> None:
        """Forget per-run state (called around each sampling run)."""
        self._tokens = self._tokens_key = self._merged = None

    def acts_at(self, sigma: float) -> bool:
        return self.weight != 0 and self.sigma_end - 1e-6 <= sigma <= self.sigma_start + 1e-6

    def row_weights(self, call: CallState) -> torch.Tensor | None:
        """Per-row weight of the character for this model call, or None when it does not act at all."""
        if not self.acts_at(call.sigma):
            return None
        rows = [0.0 if negative and not self.on_negative else self.weight for negative in call.negative_rows]
        if not any(rows):
            return None
        return torch.tensor(rows, device=call.device)

    def region(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """This character's weight per generated token (None: everywhere)."""
        if self.mask is None:
            return None
        if grid not in self._regions:
            self._regions[grid] = token_region(self.mask, grid)
        return self._regions[grid]

    def _tokens_for(self, sigma: float, device: torch.device) -> torch.Tensor:
        """The character tokens at ``sigma`` on the call's device. Only the latest sigma's are kept (the negative
        and positive passes of a step share them), so what stays on the device between calls is one token set
        and the merged features: small, transient, inside ComfyUI's inference reserve."""
        key = round(sigma, 6)
        if self._tokens_key != key or self._tokens is None or self._tokens.device != device:
            proj = self.adapter.image_proj
            # ComfyUI loads (or partly loads) the adapter and its layers cast themselves to ``device``; nothing
            # here moves a module, so its bookkeeping stays true
            dtype = next(proj.parameters()).dtype
            with torch.inference_mode():
                if self._merged is None or self._merged.device != device:
                    self._merged = proj.merge_features(*(t.to(device, dtype) for t in self.features.tensors()))
                t = torch.tensor([sigma * 1000.0], device=device).to(dtype)
                self._tokens = proj.tokens(self._merged, t)
            self._tokens_key = key
        return self._tokens

    def attention(self, layer_index: int, raw_query: torch.Tensor, sigma: float) -> torch.Tensor:
        """This character's attention output for one FLUX layer (not yet weighted)."""
        return self.adapter.ip_adapter[layer_index](raw_query, self._tokens_for(sigma, raw_query.device))


class CharacterSet:
    """Every character applied to one MODEL (Apply nodes in a row add up) and the model call in progress.

    The node layer's wrappers set :attr:`call` around each model call and call :meth:`begin_run` /
    :meth:`end_run` around each sampling run; the block patches read them.
    """

    def __init__(self, entries: tuple[CharacterEntry, ...] = ()):
        self.entries = tuple(entries)
        self.call: CallState | None = None
        self.model = None  # the diffusion model of the call in progress (its blocks get the hooks)
        self._active: tuple = (None, [])
        self.negative_uuids: frozenset = frozenset()

    def with_entry(self, entry: CharacterEntry) -> "CharacterSet":
        return CharacterSet(self.entries + (entry,))

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.x deep-copies model options on clone(): the characters (adapters, features) are shared
        return self

    def begin_run(self, percent_to_sigma: Callable[[float], float] | None, negative_uuids=()) -> None:
        self.negative_uuids = frozenset(negative_uuids)
        for entry in self.entries:
            entry.reset()
            if percent_to_sigma is not None:
                entry.set_window(percent_to_sigma)

    def end_run(self) -> None:
        self.negative_uuids = frozenset()
        for entry in self.entries:
            entry.reset()

    def negative_rows(self, batch: int, cond_or_uncond, uuids) -> tuple[bool, ...]:
        """Which rows are the negative pass: by the negative conditioning's ids when the run told them (any
        guider), else ComfyUI's chunk index (1 = uncond, as CFGGuider batches them)."""
        chunks = list(cond_or_uncond or [])
        if not chunks or batch % len(chunks):
            return (False,) * batch
        if self.negative_uuids and uuids and len(uuids) == len(chunks):
            flags = [u in self.negative_uuids for u in uuids]
        else:
            flags = [kind == 1 for kind in chunks]
        per = batch // len(chunks)
        return tuple(flag for flag in flags for _ in range(per))

    def active(self, call: CallState) -> list[tuple[CharacterEntry, torch.Tensor]]:
        """The characters acting in this call with their per-row weights (made once per call, on its device)."""
        if self._active[0] is not call:
            self._active = (call, [(e, w) for e in self.entries if (w := e.row_weights(call)) is not None])
        return self._active[1]

    def delta(self, layer_index: int, raw_query: torch.Tensor, call: CallState,
              active: list[tuple[CharacterEntry, torch.Tensor]]) -> torch.Tensor:
        """The sum of the active characters' attention for one layer, [B, generated tokens, hidden]: each
        weighted per row and, where it has a region, per token."""
        regions = share_overlaps([entry.region(call.grid) for entry, _ in active])
        total = None
        for (entry, rows), region in zip(active, regions):
            out = entry.attention(layer_index, raw_query, call.sigma)
            scale = rows.to(out.dtype)[:, None, None]
            if region is not None:
                scale = scale * region.to(out.device, out.dtype)[None, :, None]
            out = out * scale
            total = out if total is None else total + out
        return total
