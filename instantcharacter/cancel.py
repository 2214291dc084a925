"""Cancel points inside long model calls: a check run before each of some sub-modules, only while needed."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

from torch import nn


@contextlib.contextmanager
def cancel_points(modules: Iterable[nn.Module], check: Callable[[], None] | None):
    """Run ``check()`` before each call of ``modules`` while the block runs (it stops the call by raising), e.g.
    before every T5 block of a prompt encoding or every VAE tile. Nothing is registered when ``check`` is None."""
    handles = [] if check is None else [m.register_forward_pre_hook(lambda module, args: check()) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
