"""One console line per Hub retry, while our downloads run.

huggingface_hub logs two warnings for every retry ("'<error>' thrown while requesting GET <url>", then
"Retrying in 1s [Retry 1/5]."), and its logger prints them through its own handler *and* passes them on to
the application's (ComfyUI's, the command line's), so every retry shows as four lines. While
:func:`one_line_per_retry` is active those two records are dropped at their logger and one line of ours says
the same: what failed, and when the next try comes. Every other record of that logger is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

HUB_HTTP_LOGGER = "huggingface_hub.utils._http"
log = logging.getLogger(__name__)

_FAILED = re.compile(r"^(?P<error>.*) thrown while requesting (?P<method>[A-Z]+) (?P<url>\S+)$", re.DOTALL)
_RETRY = re.compile(r"^(?:Retrying in|Rate limited\. Waiting) (?P<wait>[\d.]+)s(?: before retry)? "
                    r"\[Retry (?P<try>\d+)/(?P<of>\d+)\]\.$")


class _FoldRetries(logging.Filter):
    """Drops the pair of records huggingface_hub logs for a retry and logs one line of ours instead."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        failed = _FAILED.match(message)
        if failed:
            error = failed["error"].strip("'")
            self.failure = f"{error} ({failed['method']} {failed['url']})"
            return False
        retry = _RETRY.match(message)
        if retry:
            log.warning("Hub request failed: %s; retry %s/%s in %ss", self.failure or "no answer", retry["try"],
                        retry["of"], retry["wait"])
            self.failure = None
            return False
        return True


@contextlib.contextmanager
def one_line_per_retry() -> Iterator[None]:
    """Fold huggingface_hub's retry warnings into one line each for the duration of the block."""
    logger = logging.getLogger(HUB_HTTP_LOGGER)
    fold = _FoldRetries()
    logger.addFilter(fold)
    try:
        yield
    finally:
        logger.removeFilter(fold)
