"""The run store sink: how :class:`medfed.server.run_dir.RunDirectory` records a run into the store.

:class:`medfed.server.run_dir.RunDirectory` calls a :class:`RunSink` next to its JSONL/CSV files;
:func:`open_sink` gives the one for the run config's ``store``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from medfed.server.store.writes import RunStore
from medfed.shared.config import RunConfig

__all__ = ["RunSink", "StoreSink", "open_sink"]

logger = logging.getLogger(__name__)


class RunSink(Protocol):
    """What :class:`medfed.server.run_dir.RunDirectory` tells a sink (implemented by :class:`StoreSink`)."""

    def run_started(
        self, *, run_dir: Path, mode: str, config: Mapping[str, Any], versions: Mapping[str, str]
    ) -> None: ...

    def run_resumed(self, *, run_id: str, run_dir: Path, config: Mapping[str, Any], after_round: int) -> None: ...

    def round_started(self, server_round: int, *, selected: int) -> None: ...

    def round_finished(self, record: Mapping[str, Any]) -> None: ...

    def checkpoint(self, kind: str, *, server_round: int, metrics: Mapping[str, float]) -> None: ...

    def cross_site(self, report: Mapping[str, Any]) -> None: ...

    def run_finished(self, summary: Mapping[str, Any]) -> None: ...

    def run_failed(self, error: BaseException) -> None: ...


class StoreSink:
    """Records one run into a :class:`RunStore`; :class:`medfed.server.run_dir.RunDirectory` calls it.

    A write that fails (the database is gone, say) is logged once and the run goes on: the
    run directory still has every round. WARNING and ERROR log records emitted on the thread
    that started the run (the ServerApp's) are stored as events, scrubbed of paths.

    Parameters
    ----------
    store
        Where to write; closed when the run finishes or fails.
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.run_id: str | None = None
        self._handler: _EventLogHandler | None = None
        self._failed_write = False

    def _guard(self, action: str, fn: Callable[[], None]) -> None:
        if self.run_id is None:
            return
        try:
            fn()
        except SQLAlchemyError as err:
            if not self._failed_write:
                logger.warning(
                    "run store %s: could not record %s (%s); the run goes on and the run "
                    "directory keeps every round.", self.store.url, action, err.__class__.__name__,
                )
            self._failed_write = True

    def run_started(
        self, *, run_dir: Path, mode: str, config: Mapping[str, Any], versions: Mapping[str, str]
    ) -> None:
        """Create the run (its id is the run directory's name) and start capturing warnings."""
        self.run_id = self.store.start_run(Path(run_dir).name, mode=mode, config=config, versions=versions)
        self._handler = _EventLogHandler(self, threading.get_ident())
        logging.getLogger().addHandler(self._handler)

    def run_resumed(self, *, run_id: str, run_dir: Path, config: Mapping[str, Any], after_round: int) -> None:
        """Continue the run ``run_id`` after round ``after_round`` and start capturing warnings."""
        self.run_id = self.store.resume_run(run_id, config=config, after_round=after_round)
        self._handler = _EventLogHandler(self, threading.get_ident())
        logging.getLogger().addHandler(self._handler)

    def round_started(self, server_round: int, *, selected: int) -> None:
        """Round ``server_round`` began with ``selected`` sites."""
        self._guard("a round start", lambda: self.store.round_started(self.run_id, server_round, selected=selected))

    def round_finished(self, record: Mapping[str, Any]) -> None:
        """A finished round (``RoundRecord.to_json()``)."""
        self._guard("a round", lambda: self.store.round_finished(self.run_id, record))

    def checkpoint(self, kind: str, *, server_round: int, metrics: Mapping[str, float]) -> None:
        """A checkpoint was written."""
        self._guard(
            "a checkpoint", lambda: self.store.checkpoint(self.run_id, kind, server_round=server_round, metrics=metrics)
        )

    def cross_site(self, report: Mapping[str, Any]) -> None:
        """A cross-site report (:mod:`medfed.server.cross_site`)."""
        self._guard("the cross-site evaluation", lambda: self.store.cross_site(self.run_id, report))

    def event(self, *, level: str, kind: str, message: str, server_round: int | None = None) -> None:
        """Append an event to the run's log."""
        self._guard(
            "an event",
            lambda: self.store.add_event(self.run_id, level=level, kind=kind, message=message, server_round=server_round),
        )

    def run_finished(self, summary: Mapping[str, Any]) -> None:
        """The run ended normally."""
        self._guard("the run's end", lambda: self.store.finish_run(self.run_id, summary))
        self._close()

    def run_failed(self, error: BaseException) -> None:
        """The run ended with ``error``."""
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self._guard("the run's failure", lambda: self.store.fail_run(self.run_id, text))
        self._close()

    def _close(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
        self.store.close()


class _EventLogHandler(logging.Handler):
    """Stores WARNING+ records from the run's own thread as events."""

    def __init__(self, sink: StoreSink, thread: int) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink
        self.thread = thread
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread or getattr(self._busy, "on", False):
            return
        if record.name.startswith(("sqlalchemy", "alembic", "medfed.server.store")):
            return
        self._busy.on = True
        try:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            self.sink.event(level=level, kind="log", message=record.getMessage())
        except Exception:  # noqa: BLE001 - a log handler must never raise
            self.handleError(record)
        finally:
            self._busy.on = False


def open_sink(cfg: RunConfig) -> StoreSink | None:
    """The run store sink for ``cfg.store`` (``None`` when ``store = "off"``).

    Raises
    ------
    StoreError
        If the store cannot be opened (the message names the URL and what to do).
    """
    url = cfg.store_url
    if url is None:
        return None
    return StoreSink(RunStore(url))
