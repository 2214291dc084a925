"""The libraries' console output held back for a block of work, and counted, so a command prints its own lines and
one summary: Python warnings, the log records of diffusers, transformers, huggingface_hub, accelerate and peft
(they print through their own handlers), and whatever is written to ``sys.stderr`` meanwhile (their progress
bars)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterator

LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft")


@dataclass
class HeldBack:
    messages: list[str] = field(default_factory=list)  # warnings and log records, as they would have printed
    stderr: str = ""  # progress bars and other writes to stderr

    def summary(self) -> str:
        bars = " and their progress bars" if self.stderr.strip() else ""
        return f"{len(self.messages)} warning(s) from the libraries{bars} held back"


class _Collect(logging.Handler):
    def __init__(self, held: HeldBack):
        super().__init__(logging.NOTSET)
        self.held = held

    def emit(self, record: logging.LogRecord) -> None:
        self.held.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def libraries_quiet() -> Iterator[HeldBack]:
    """Hold back the libraries' warnings, log records and stderr writes inside the block; yields what was held."""
    held = HeldBack()
    collect = _Collect(held)
    saved = {}
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate)
        logger.handlers[:] = [collect]
        logger.propagate = False
    stderr = io.StringIO()
    failed = True
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
            warnings.simplefilter("default")
            try:
                yield held
            finally:
                held.messages += [f"{w.category.__name__}: {w.message}" for w in caught]
        failed = False
    finally:
        held.stderr = stderr.getvalue()
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        if failed:  # what was held back may explain the failure
            sys.stderr.write(held.stderr + "".join(f"{m}\n" for m in held.messages))
