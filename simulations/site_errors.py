"""Each distinct site failure of a simulation logged once, not once per site per round.

When a simulated site raises, Flower's simulation engine (flwr 1.42, ``vce_api.worker`` and
``RayBackend.process_message``) logs three ERROR records on the ``flwr`` logger: "An exception
was raised when processing a message by RayBackend", the Ray task error (the site's traceback),
and the server-side traceback around it (the site's again, inside Ray's). A failure at 12 sites
over 4 rounds is 48 tracebacks. :class:`SiteErrorLog`, a filter on the ``flwr`` logger, drops
those records and logs the site's own traceback the first time an error (its exception class
and message) occurs, and counts the repeats (:meth:`SiteErrorLog.repeats`).

An exception inside medfed's ClientApp never gets this far: the site's egress guard
(:mod:`medfed.client.egress`) logs its traceback at the site (once per distinct failure and worker
process) and replies with a category and a code, which the coordinator records
(:mod:`medfed.server.rounds`). What remains for this filter is what fails outside the guard:
loading the ClientApp, Ray's own errors, and ClientApps built without the guard.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["SiteError", "SiteErrorLog", "site_error_log", "root_error", "site_traceback"]

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError", "LoadClientAppError")
_PROCESSING = "An exception was raised when processing a message by"
_SITE_MARKERS = ("ClientAppActor", "ClientAppException", "LoadClientAppError")


@dataclass(frozen=True)
class SiteError:
    """One distinct site failure: the site's exception class and the first line of its message."""

    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}" if self.message else self.kind


def _is_exception_name(name: str) -> bool:
    """Whether a dotted name looks like an exception class (``ImportError``, ``pkg.DataError``)."""
    return name.rsplit(".", 1)[-1].endswith(("Error", "Exception", "Interrupt", "Exit", "Warning"))


def root_error(text: str) -> SiteError | None:
    """The site's own exception in a logged traceback text: the first ``Class: message`` line
    at the start of a line that is not one of Flower's or Ray's wrappers."""
    for line in _ANSI.sub("", text).splitlines():
        match = _ERROR_LINE.match(line)
        if not match or not _is_exception_name(match.group(1)):
            continue
        name = match.group(1)
        if any(wrapper in name for wrapper in _WRAPPERS):
            continue
        return SiteError(kind=name.rsplit(".", 1)[-1], message=(match.group(2) or "").strip())
    return None


def site_traceback(text: str) -> str:
    """The part of a logged traceback that ran at the site (inside Ray's task error), else all of it."""
    lines = _ANSI.sub("", text).splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("ray.exceptions.RayTaskError")), None)
    if start is None:
        return "\n".join(lines)
    end = next(
        (i for i in range(start, len(lines)) if lines[i].startswith("The above exception was the direct cause")),
        len(lines),
    )
    body = [line for line in lines[start:end] if line.strip() and not set(line.strip()) <= {"^", "~"}]
    return "Traceback at the site (most recent call last):\n" + "\n".join(body)


class SiteErrorLog(logging.Filter):
    """A filter for the ``flwr`` logger that turns Flower's per-failure tracebacks into one each.

    Thread-safe: Flower's simulation workers log from several threads.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.counts: Counter[SiteError] = Counter()
        self.first: SiteError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Flower's records of a site failure; log the site's traceback the first time."""
        if record.levelno < logging.ERROR:
            return True
        if isinstance(record.msg, str) and record.msg.startswith(_PROCESSING):
            return False
        text = record.getMessage()
        if not any(marker in text for marker in _SITE_MARKERS):
            return True  # not a site's failure: Flower's own error, shown as it is
        if isinstance(record.msg, BaseException):
            return False  # the Ray task error: the traceback record that follows holds it all
        error = root_error(text) or SiteError(kind="unknown", message="")
        with self._lock:
            self.counts[error] += 1
            new = self.counts[error] == 1
            if self.first is None:
                self.first = error
        if new:
            logger.error(
                "a site failed: %s (its traceback is shown once; the same failure elsewhere is counted)\n%s",
                error,
                site_traceback(text),
            )
        return False

    def repeats(self) -> list[tuple[SiteError, int]]:
        """Errors seen more than once, with their counts, commonest first."""
        with self._lock:
            return [(error, n) for error, n in self.counts.most_common() if n > 1]

    def total(self) -> int:
        """Site failures seen."""
        with self._lock:
            return sum(self.counts.values())


@contextmanager
def site_error_log() -> Iterator[SiteErrorLog]:
    """Install a :class:`SiteErrorLog` on the ``flwr`` logger for the block; remove it after."""
    flt = SiteErrorLog()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(flt)
    try:
        yield flt
    finally:
        flwr_logger.removeFilter(flt)
