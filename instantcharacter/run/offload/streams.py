"""The two streams a block streamer orders its work on: the compute stream (the caller's current one) and a side
copy stream, with the events between them; on the CPU, where there are neither, the record of what would be
recorded and waited on (a :class:`StreamProbes` trace)."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch


@dataclass
class StreamProbes:
    """What a check of a streamer's synchronisation plugs into it (a normal run has none). ``trace``, when a list,
    receives every access, record, wait and free in issue order, as ``(op, stream, key)``, to be replayed under
    CUDA's ordering rules; ``copy_delay_cycles``: GPU cycles slept on the copy stream before each copy (CUDA
    only), so that a missing wait for a copy reads stale weights."""

    trace: list | None = None
    copy_delay_cycles: int = 0


class Streams:
    """The compute stream (the caller's current one) and the copy stream. Copies run on the copy stream when
    there is one (prefetch), else on the compute stream. ``trace``: see :class:`StreamProbes`."""

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


