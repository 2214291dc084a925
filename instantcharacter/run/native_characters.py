"""The part of the native path (ComfyUI's own FLUX model) that needs no ComfyUI: the characters applied to one
MODEL, what one sampling run fixes for them, and what one model call asks of them.

Three scopes, three objects, so that model calls running at the same time (ComfyUI's MultiGPU CFG Split runs the
passes in threads, each on its device's copy of the model and of the adapter) share nothing that one of them
writes:

- :class:`CharacterSet`: the characters of the Apply nodes of one MODEL; fixed once made, shared by every run.
- :class:`RunState`: one sampling run: each character's window in sigmas (after any sampling-shift node),
  which conditioning is the negative one, and the run's character tokens, kept per character and adapter copy
  (so per device) behind a lock.
- :class:`CharacterCall`: one model call: its :class:`CallState`, the adapter copy of the call's device for
  each character, and which characters act on which batch rows.

The character tokens come from :mod:`.tokens`, as on the pipeline path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import NonFiniteResultError
from ..model.adapter import InstantCharacterAdapter
from ..model.attention import weighted_sum
from ..reference.character import ReferenceFeatures
from .regions import share_overlaps, token_region
from .tokens import merge_reference, project_tokens


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


class AppliedCharacter:
    """One Apply node: a character with its weight, its window of the schedule and an optional region.

    The window is ``start_percent``–``end_percent`` of the schedule, turned into sigmas for each sampling run
    (:meth:`window`), so a sampling-shift node placed after Apply moves it as it moves the schedule. The sigmas
    given at construction serve model calls made outside a sampling run.
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
        self._regions: dict[tuple[int, int], torch.Tensor] = {}

    def window(self, percent_to_sigma: Callable[[float], float] | None) -> tuple[float, float]:
        """(highest, lowest) sigma at which the character acts."""
        if percent_to_sigma is None:
            return self.sigma_start, self.sigma_end
        return float(percent_to_sigma(self.start_percent)), float(percent_to_sigma(self.end_percent))

    def region(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """This character's weight per generated token (None: everywhere). Concurrent callers may both compute
        a missing grid's region; they store the same values."""
        if self.mask is None:
            return None
        region = self._regions.get(grid)
        if region is None:
            region = self._regions[grid] = token_region(self.mask, grid)
        return region


class _TokenSlot:
    __slots__ = ("lock", "merged", "key", "tokens")

    def __init__(self):
        self.lock = threading.Lock()
        self.merged = self.key = self.tokens = None


class TokenCache:
    """The character tokens of one run: per character and adapter copy (hence per device), the merged features
    and the latest sigma's tokens. The negative and positive passes of a step share them, so what stays on a
    device between calls is one token set and the merged features per character: small, transient, inside
    ComfyUI's inference reserve. Safe under concurrent calls: each slot computes under its own lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._slots: dict[tuple[int, int], _TokenSlot] = {}

    def tokens(self, entry: AppliedCharacter, adapter: InstantCharacterAdapter, sigma: float,
               device: torch.device) -> torch.Tensor:
        with self._lock:
            slot = self._slots.setdefault((id(entry), id(adapter)), _TokenSlot())
        key = round(sigma, 6)
        with slot.lock:
            if slot.tokens is None or slot.key != key or slot.tokens.device != device:
                if slot.merged is None or slot.merged.device != device:
                    slot.merged = merge_reference(adapter, entry.features, device)
                timestep = torch.tensor([sigma * 1000.0], device=device).to(slot.merged.dtype)
                tokens = project_tokens(adapter, slot.merged, timestep)
                if tokens.device.type != "meta" and not torch.isfinite(tokens).all():  # meta holds no values
                    raise NonFiniteResultError(
                        f"The character's tokens at sigma {sigma:.4g} are not finite numbers: its features are "
                        "implausible (a damaged or edited character file?). Encode the reference again or load "
                        "another character.")
                slot.tokens, slot.key = tokens, key
            return slot.tokens


class CharacterSet:
    """Every character applied to one MODEL (Apply nodes in a row add up). Never changed once made: a MODEL
    patched again gets a new set."""

    def __init__(self, entries: tuple[AppliedCharacter, ...] = ()):
        self.entries = tuple(entries)
        self.outside_runs = RunState(self)  # for model calls made outside a sampling run

    def with_entry(self, entry: AppliedCharacter) -> "CharacterSet":
        return CharacterSet(self.entries + (entry,))

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.x deep-copies model options on clone(): the characters (adapters, features) are shared
        return self

    def run(self, percent_to_sigma: Callable[[float], float] | None = None, negative_uuids=()) -> "RunState":
        return RunState(self, percent_to_sigma, negative_uuids)


class RunState:
    """One sampling run of a MODEL: fixed when the run starts, except the token cache (thread-safe)."""

    def __init__(self, characters: CharacterSet, percent_to_sigma: Callable[[float], float] | None = None,
                 negative_uuids=()):
        self.characters = characters
        self.windows = tuple(e.window(percent_to_sigma) for e in characters.entries)
        self.negative_uuids = frozenset(negative_uuids)
        self.tokens = TokenCache()

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

    def call(self, state: CallState, adapters: Sequence[InstantCharacterAdapter], model=None) -> "CharacterCall":
        """What one model call asks of the characters; ``adapters``: the adapter copy of the call's device for
        each entry, in order; ``model``: the diffusion model being called (its blocks get the hooks)."""
        acting = []
        for entry, adapter, (start, end) in zip(self.characters.entries, adapters, self.windows, strict=True):
            if entry.weight == 0 or not end - 1e-6 <= state.sigma <= start + 1e-6:
                continue
            rows = tuple(0.0 if negative and not entry.on_negative else entry.weight
                         for negative in state.negative_rows)
            if any(rows):
                acting.append(ActingCharacter(entry, adapter, rows))
        return CharacterCall(self, state, tuple(acting), model)


@dataclass(frozen=True)
class ActingCharacter:
    """A character acting in one model call: the adapter copy it uses there and its weight per batch row."""

    entry: AppliedCharacter
    adapter: InstantCharacterAdapter
    rows: tuple[float, ...]


class CharacterCall:
    """One model call: made by the call, read by its blocks, written by nobody else."""

    def __init__(self, run: RunState, state: CallState, acting: tuple[ActingCharacter, ...], model=None):
        self.run, self.state, self.acting, self.model = run, state, acting, model
        self.characters = run.characters
        batch = len(state.negative_rows)
        rows = [i for i in range(batch) if any(a.rows[i] for a in acting)]
        # rows no character acts on are left out of the character attention altogether
        self.rows = slice(None) if len(rows) == batch else torch.tensor(rows, device=state.device)
        self._row_list = rows
        self._scales = [torch.tensor([a.rows[i] for i in rows], device=state.device) for a in acting]
        self._own_rows = [self._positions(a) for a in acting]

    def _positions(self, acting: ActingCharacter) -> torch.Tensor | None:
        """Where this character's rows lie among the call's acting rows (None: all of them)."""
        own = [k for k, i in enumerate(self._row_list) if acting.rows[i]]
        return None if len(own) == len(self._row_list) else torch.tensor(own, device=self.state.device)

    @property
    def hidden_size(self) -> int:
        return self.acting[0].adapter.hidden_size

    def delta(self, layer_index: int, raw_query: torch.Tensor) -> torch.Tensor:
        """The sum of the acting characters' attention for one layer, [acting rows, generated tokens, hidden]
        (the rows of :attr:`rows`): each weighted per row and, where it has a region, per token. Keys and
        values are projected once per character for all rows."""
        if not isinstance(self.rows, slice):
            raw_query = raw_query[self.rows]
        regions = share_overlaps([a.entry.region(self.state.grid) for a in self.acting])
        terms = []
        for acting, scale, own, region in zip(self.acting, self._scales, self._own_rows, regions):
            tokens = self.run.tokens.tokens(acting.entry, acting.adapter, self.state.sigma, raw_query.device)
            query = raw_query if own is None else raw_query[own]
            out = acting.adapter.ip_adapter[layer_index](query, tokens)
            if own is not None:
                out = out.new_zeros((raw_query.shape[0],) + out.shape[1:]).index_copy_(0, own, out)
            weight = scale.to(out.dtype)[:, None, None]
            if region is not None:
                weight = weight * region.to(out.device, out.dtype)[None, :, None]
            terms.append((out, weight))
        return weighted_sum(terms)
