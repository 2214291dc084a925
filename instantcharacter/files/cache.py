"""Keeps the most recently loaded model of each kind, so re-running a graph does not reload 30 GB."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Any, Callable


def file_key(path: str | os.PathLike, *extra) -> tuple:
    """A cache key that changes when the file (or any file directly in a folder) changes on disk."""
    path = Path(path)
    if path.is_dir():
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                             for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts))
    elif path.exists():
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    else:
        stamp = None
    return (str(path.resolve()), stamp) + extra


class ModelCache:
    """One slot per kind: asking for another model of the same kind releases the previous one first,
    so two 24 GB transformers are never held at once."""

    def __init__(self):
        self._slots: dict[str, tuple[tuple, Any]] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:
            slot = self._slots.get(kind)
            if slot is not None and slot[0] == key:
                return slot[1]
            self._slots.pop(kind, None)
            slot = None
            gc.collect()
            value = load()
            self._slots[kind] = (key, value)
            return value

    def clear(self, kind: str | None = None) -> None:
        with self._lock:
            if kind is None:
                self._slots.clear()
            else:
                self._slots.pop(kind, None)
        gc.collect()

    def __contains__(self, kind: str) -> bool:
        return kind in self._slots


MODELS = ModelCache()
