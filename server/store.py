"""The run store: one database through which the server side records every run.

A run's config, each round's start and end (sites selected and responding, global and per-site
metrics, SecAgg+ status and dropouts, epsilon spent per site), checkpoints, warnings, errors and
the outcome go into a relational database that ``medfed dashboard`` reads while runs write it.

* Embedded SQLite by default (``sqlite:///<run-dir>/medfed.db``) in WAL mode: readers never block
  the writer and see each committed round at once. Any SQLAlchemy URL works, so a larger
  deployment can point every coordinator process at PostgreSQL (``postgresql://...``).
* The schema is versioned: a ``schema_version`` table and the ordered :data:`MIGRATIONS`; opening
  a store applies the missing ones in one transaction, and refuses a store written by a newer
  medfed.
* Nothing here sees patient data: only what the server already has (scalar metrics, example
  counts, epsilon). Paths in the config (``dataset``) are reduced to file names, passwords in
  URLs are hidden, and log messages have paths removed before they are stored.

The server writes through :class:`StoreSink`, which :class:`server.run_dir.RunDirectory` calls
next to its JSONL/CSV files (see :func:`open_sink`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from medfed.shared.config import RunConfig

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "RunSink",
    "RunStore",
    "StoreError",
    "StoreSink",
    "open_sink",
    "redact_config",
    "scrub",
]

logger = logging.getLogger(__name__)

STALE_AFTER_S = 15 * 60.0
"""A run still marked running with no write for this long is reported as ``stale``."""

_EVENT_MESSAGE_CHARS = 500


class StoreError(RuntimeError):
    """The run store cannot be opened or is of an unknown schema version."""


class RunSink(Protocol):
    """What :class:`server.run_dir.RunDirectory` tells a sink (implemented by :class:`StoreSink`)."""

    def run_started(
        self, *, run_dir: Path, mode: str, config: Mapping[str, Any], versions: Mapping[str, str]
    ) -> None: ...

    def run_resumed(self, *, run_id: str, run_dir: Path, config: Mapping[str, Any], after_round: int) -> None: ...

    def round_started(self, server_round: int, *, selected: int) -> None: ...

    def round_finished(self, record: Mapping[str, Any]) -> None: ...

    def checkpoint(self, kind: str, *, server_round: int, metrics: Mapping[str, float]) -> None: ...

    def run_finished(self, summary: Mapping[str, Any]) -> None: ...

    def run_failed(self, error: BaseException) -> None: ...


# --------------------------------------------------------------------------- schema
metadata = sa.MetaData()

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("mode", sa.String(20), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # running | finished | failed
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("finished", sa.Float),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("versions", sa.JSON, nullable=False),
    sa.Column("planned_rounds", sa.Integer, nullable=False),
    sa.Column("num_sites", sa.Integer),
    sa.Column("current_round", sa.Integer, nullable=False),
    sa.Column("rounds_done", sa.Integer, nullable=False),
    sa.Column("summary", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("last_update", sa.Float),  # schema 2
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("run_id", sa.String(200), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),  # running | finished
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("finished", sa.Float),
    sa.Column("seconds", sa.Float),
    sa.Column("selected", sa.Integer),
    sa.Column("responded", sa.Integer, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("global_metrics", sa.JSON, nullable=False),
    sa.Column("fit_metrics", sa.JSON, nullable=False),
    sa.Column("eval_metrics", sa.JSON, nullable=False),
    sa.Column("secagg", sa.JSON),
)

site_rounds = sa.Table(
    "site_rounds",
    metadata,
    sa.Column("run_id", sa.String(200), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),
    sa.Column("site", sa.String(100), primary_key=True),
    sa.Column("recorded", sa.Float, nullable=False),
    sa.Column("fit", sa.JSON),
    sa.Column("eval", sa.JSON),
    sa.Column("num_examples", sa.Float),
    sa.Column("epsilon", sa.Float),
    sa.Column("budget_epsilon", sa.Float),
    sa.Column("declined", sa.Boolean, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(200), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("level", sa.String(10), nullable=False),  # info | warning | error
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("round", sa.Integer),
    sa.Column("message", sa.Text, nullable=False),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("run_id", sa.String(200), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.String(40), primary_key=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("saved", sa.Float, nullable=False),
)

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))


# --------------------------------------------------------------------------- migrations
def _migration_1(conn: Connection) -> None:
    """Runs, rounds, per-site rounds, events and checkpoints (the tables as of schema 1)."""
    v1 = sa.MetaData()
    for table in (runs, rounds, site_rounds, events, checkpoints):
        columns = [c._copy() for c in table.columns if c.name != "last_update"]
        sa.Table(table.name, v1, *columns)
    v1.create_all(conn)


def _migration_2(conn: Connection) -> None:
    """``runs.last_update`` (time of the run's latest write: tells a live run from a dead one) and
    an index that serves the dashboard's ``events after id`` polling."""
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN last_update FLOAT"))
    conn.execute(sa.text("UPDATE runs SET last_update = COALESCE(finished, started)"))
    conn.execute(sa.text("CREATE INDEX ix_events_run_id_id ON events (run_id, id)"))


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_migration_1, _migration_2)
"""Migration ``i`` (1-based) brings a store from schema ``i - 1`` to ``i``. Append only."""

SCHEMA_VERSION = len(MIGRATIONS)


# --------------------------------------------------------------------------- redaction
_PATH = re.compile(r"(?:[A-Za-z]:|~|\.{1,2})?(?:[\\/][^\s'\"\\/:,;()\[\]{}]+){2,}[\\/]?")


def scrub(message: str, *, limit: int = _EVENT_MESSAGE_CHARS) -> str:
    """``message`` with file-system paths replaced by ``<path>``, cut to ``limit`` characters.

    Stored log lines and error messages go through this: a path can name a patient's file.
    """
    text = _PATH.sub("<path>", message)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as the store keeps it: data paths reduced to file names, no passwords."""
    out = dict(config)
    dataset = str(out.get("dataset", ""))
    if dataset and dataset not in ("synthetic", "deployment"):
        out["dataset"] = Path(dataset).name
    for key in ("ledger-dir", "resume"):
        if out.get(key):
            out[key] = Path(str(out[key])).name
    store = str(out.get("store", ""))
    if "://" in store:
        try:
            out["store"] = make_url(store).render_as_string(hide_password=True)
        except ArgumentError:
            out["store"] = "<invalid url>"
    return out


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Finite numeric metrics only (JSON has no NaN)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        number = _finite(value)
        if number is not None:
            out[str(key)] = number
    return out


# --------------------------------------------------------------------------- the store
class RunStore:
    """A run store at an SQLAlchemy URL.

    Parameters
    ----------
    url
        ``sqlite:///PATH`` (the folder is created), ``postgresql://...`` or any SQLAlchemy URL.
    create
        Create a missing SQLite file (``False``: a missing file raises :class:`StoreError`).

    Raises
    ------
    StoreError
        If the URL is invalid, the database cannot be reached, or its schema is newer than
        this medfed knows.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StoreError(
                f"store URL {url!r} is invalid: use e.g. 'sqlite:///runs/medfed.db' or "
                "'postgresql://user@host/dbname'."
            ) from None
        self.url = parsed.render_as_string(hide_password=True)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            database = parsed.database or ""
            if database in ("", ":memory:"):
                raise StoreError(f"store URL {self.url!r}: give a file, e.g. 'sqlite:///runs/medfed.db'.")
            path = Path(database)
            if not path.exists():
                if not create:
                    raise StoreError(
                        f"no run store at {path}: run `medfed simulate` first, or pass the "
                        "store of your runs with --store sqlite:///PATH/medfed.db."
                    )
                path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(
                parsed, connect_args={"timeout": 30.0, "check_same_thread": False}
            )
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
            sa.event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            try:
                self.engine = sa.create_engine(parsed, pool_pre_ping=True)
            except (ArgumentError, ImportError, SQLAlchemyError) as err:
                raise StoreError(
                    f"cannot use store {self.url!r}: {err}. For PostgreSQL install a driver "
                    "(e.g. `pip install psycopg[binary]` and a 'postgresql+psycopg://' URL)."
                ) from None
        try:
            self._migrate()
        except SQLAlchemyError as err:
            self.engine.dispose()
            raise StoreError(f"cannot open store {self.url!r}: {err.__class__.__name__}: {err}") from None

    # ------------------------------------------------------------ infrastructure
    def close(self) -> None:
        """Release the store's connections."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``, so writers queue instead of failing)."""
        with self.engine.connect() as conn:
            conn.execution_options(medfed_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _migrate(self) -> None:
        with self._write() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7270011)"))
            current = self._version(conn)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.url!r} has schema version {current}, newer than this medfed "
                    f"knows ({SCHEMA_VERSION}): upgrade medfed, or use another store."
                )
            if current == SCHEMA_VERSION:
                return
            if current == 0 and not sa.inspect(conn).has_table("schema_version"):
                schema_version.create(conn)
            for index in range(current, SCHEMA_VERSION):
                MIGRATIONS[index](conn)
            conn.execute(schema_version.delete())
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            logger.info("run store %s migrated from schema %d to %d", self.url, current, SCHEMA_VERSION)

    @staticmethod
    def _version(conn: Connection) -> int:
        if not sa.inspect(conn).has_table("schema_version"):
            return 0
        value = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        return int(value or 0)

    @property
    def schema_version(self) -> int:
        """The store's schema version."""
        with self._read() as conn:
            return self._version(conn)

    @property
    def journal_mode(self) -> str | None:
        """SQLite's journal mode (``"wal"``); ``None`` for other databases."""
        if not self.is_sqlite:
            return None
        with self.engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())

    # ------------------------------------------------------------ writes
    def start_run(
        self,
        run_id: str,
        *,
        mode: str,
        config: Mapping[str, Any],
        versions: Mapping[str, str] | None = None,
    ) -> str:
        """Record a new run; return its id (``run_id``, suffixed ``-2``, ... if taken)."""
        now = time.time()
        cfg = redact_config(config)
        with self._write() as conn:
            taken = set(conn.execute(sa.select(runs.c.id).where(runs.c.id.like(f"{run_id}%"))).scalars())
            final_id, suffix = run_id, 1
            while final_id in taken:
                suffix += 1
                final_id = f"{run_id}-{suffix}"
            conn.execute(
                runs.insert().values(
                    id=final_id,
                    mode=mode,
                    status="running",
                    started=now,
                    config=cfg,
                    versions=dict(versions or {}),
                    planned_rounds=int(cfg.get("num-server-rounds", 0) or 0),
                    num_sites=int(cfg["num-sites"]) if mode == "federated" and "num-sites" in cfg else None,
                    current_round=0,
                    rounds_done=0,
                    last_update=now,
                )
            )
            self._event(conn, final_id, "info", "run-started", None, f"{mode} run started", now)
        return final_id

    def resume_run(self, run_id: str, *, config: Mapping[str, Any], after_round: int) -> str:
        """Continue run ``run_id`` after round ``after_round`` (its server process died).

        Rounds after ``after_round`` (a round that was running, or one finished after the saved
        resume state) are deleted with their per-site rows, since the resumed run records them
        again; the run is marked running again and a ``run-resumed`` event is added. Earlier
        events stay: they are the run's history. A run the store does not know (the store was
        replaced) is created under the same id, with a warning event.

        Returns
        -------
        str
            The run id (``run_id``).
        """
        now = time.time()
        with self._write() as conn:
            known = conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() is not None
        if not known:
            final_id = self.start_run(run_id, mode="federated", config=config)
            self.add_event(
                final_id, level="warning", kind="run-resumed", server_round=after_round,
                message=f"run resumed after round {after_round}, but the run store had no record of "
                "rounds up to it (the store was replaced); the run directory has them",
            )
            return final_id
        with self._write() as conn:
            conn.execute(site_rounds.delete().where(site_rounds.c.run_id == run_id, site_rounds.c.round > after_round))
            conn.execute(rounds.delete().where(rounds.c.run_id == run_id, rounds.c.round > after_round))
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(
                    status="running", finished=None, error=None, summary=None,
                    current_round=after_round, rounds_done=after_round, last_update=now,
                )
            )
            self._event(
                conn, run_id, "warning", "run-resumed", after_round,
                f"run resumed after round {after_round}: the server process had stopped; "
                f"rounds from {after_round + 1} on run now", now,
            )
        return run_id

    def round_started(self, run_id: str, server_round: int, *, selected: int | None) -> None:
        """Round ``server_round`` began with ``selected`` sites."""
        now = time.time()
        with self._write() as conn:
            exists = conn.execute(
                sa.select(rounds.c.round).where(rounds.c.run_id == run_id, rounds.c.round == server_round)
            ).first()
            if exists:
                conn.execute(
                    rounds.update()
                    .where(rounds.c.run_id == run_id, rounds.c.round == server_round)
                    .values(selected=selected)
                )
            else:
                conn.execute(rounds.insert().values(**self._empty_round(run_id, server_round, now), selected=selected))
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(current_round=server_round, last_update=now)
            )
            sites = f" with {selected} site(s)" if selected is not None else ""
            self._event(conn, run_id, "info", "round-started", server_round, f"round {server_round} started{sites}", now)

    @staticmethod
    def _empty_round(run_id: str, server_round: int, now: float) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "round": server_round,
            "status": "running",
            "started": now,
            "responded": 0,
            "failures": 0,
            "global_metrics": {},
            "fit_metrics": {},
            "eval_metrics": {},
        }

    def round_finished(self, run_id: str, record: Mapping[str, Any]) -> None:
        """Record a finished round: ``record`` is :meth:`server.run_dir.RoundRecord.to_json`."""
        now = time.time()
        server_round = int(record["round"])
        sites: Mapping[str, Mapping[str, Any]] = record.get("sites") or {}
        secagg = record.get("secagg")
        values = {
            "status": "finished",
            "finished": now,
            "seconds": _finite(record.get("seconds")),
            "responded": int(record.get("fit_results", 0) or 0),
            "failures": int(record.get("fit_failures", 0) or 0),
            "global_metrics": _clean(record.get("global")),
            "fit_metrics": _clean(record.get("fit")),
            "eval_metrics": _clean(record.get("eval")),
            "secagg": _clean_secagg(secagg) if secagg else None,
        }
        with self._write() as conn:
            existing = conn.execute(
                sa.select(rounds.c.selected, rounds.c.started).where(
                    rounds.c.run_id == run_id, rounds.c.round == server_round
                )
            ).first()
            if existing is None:
                started = now - (values["seconds"] or 0.0)
                conn.execute(rounds.insert().values(**{**self._empty_round(run_id, server_round, started), **values}))
            else:
                conn.execute(
                    rounds.update().where(rounds.c.run_id == run_id, rounds.c.round == server_round).values(**values)
                )
            selected = existing.selected if existing is not None else None
            conn.execute(site_rounds.delete().where(site_rounds.c.run_id == run_id, site_rounds.c.round == server_round))
            declined: list[str] = []
            for site in sorted(sites):
                parts = sites[site] or {}
                fit, ev = _clean(parts.get("fit")), _clean(parts.get("eval"))
                is_declined = bool(fit.get("dp-declined", 0))
                if is_declined:
                    declined.append(site)
                conn.execute(
                    site_rounds.insert().values(
                        run_id=run_id,
                        round=server_round,
                        site=str(site),
                        recorded=now,
                        fit=fit or None,
                        eval=ev or None,
                        num_examples=fit.get("num_examples", ev.get("num_examples")),
                        epsilon=fit.get("dp-epsilon"),
                        budget_epsilon=fit.get("dp-budget-epsilon"),
                        declined=is_declined,
                    )
                )
            done = max(0, server_round)
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(
                    rounds_done=sa.func.max(runs.c.rounds_done, done)
                    if self.is_sqlite
                    else sa.func.greatest(runs.c.rounds_done, done),
                    last_update=now,
                )
            )
            if server_round == 0:
                self._event(conn, run_id, "info", "initial-model", 0, "initial model evaluated", now)
                return
            msg = f"round {server_round} finished: {values['responded']} site(s) responded"
            if selected is not None:
                msg += f" of {selected} selected"
            if values["seconds"] is not None:
                msg += f" in {values['seconds']:.1f} s"
            self._event(conn, run_id, "info", "round-finished", server_round, msg, now)
            if values["failures"]:
                self._event(
                    conn, run_id, "warning", "site-failures", server_round,
                    f"round {server_round}: {values['failures']} site(s) failed to train", now,
                )
            for failure in record.get("failed_sites") or []:
                self._event(
                    conn, run_id, "warning", "site-failed", server_round,
                    f"round {server_round}: {_failure_text(failure)}", now,
                )
            if declined:
                self._event(
                    conn, run_id, "warning", "dp-declined", server_round,
                    f"round {server_round}: {', '.join(declined)} declined to train "
                    "(one more round would exceed the site's privacy budget)", now,
                )
            for rejection in record.get("rejected") or []:
                self._event(
                    conn, run_id, "warning", "update-rejected", server_round,
                    f"round {server_round}: {rejection.get('site', '?')}'s update rejected "
                    f"({rejection.get('reason', '?')}: {rejection.get('detail', '')})", now,
                )
            if record.get("skipped"):
                self._event(
                    conn, run_id, "error", "round-skipped", server_round,
                    f"round {server_round}: nothing aggregated, {record['skipped']}", now,
                )
            if values["secagg"]:
                sec = values["secagg"]
                if not sec.get("completed", False):
                    stage = sec.get("failed_stage") or "unknown stage"
                    self._event(
                        conn, run_id, "error", "secagg-failed", server_round,
                        f"round {server_round}: SecAgg+ failed at {stage}; the model was not updated", now,
                    )
                elif sec.get("dropped"):
                    self._event(
                        conn, run_id, "warning", "secagg-dropouts", server_round,
                        f"round {server_round}: SecAgg+ completed with {sec['dropped']} dropout(s)", now,
                    )

    def checkpoint(self, run_id: str, kind: str, *, server_round: int, metrics: Mapping[str, float]) -> None:
        """Record that checkpoint ``kind`` (``best``, ``final``) now holds round ``server_round``."""
        now = time.time()
        values = {"round": int(server_round), "metrics": _clean(metrics), "saved": now}
        with self._write() as conn:
            where = (checkpoints.c.run_id == run_id, checkpoints.c.kind == kind)
            if conn.execute(sa.select(checkpoints.c.kind).where(*where)).first():
                conn.execute(checkpoints.update().where(*where).values(**values))
            else:
                conn.execute(checkpoints.insert().values(run_id=run_id, kind=kind, **values))
            conn.execute(runs.update().where(runs.c.id == run_id).values(last_update=now))
            self._event(conn, run_id, "info", "checkpoint", server_round, f"{kind} checkpoint: round {server_round}", now)

    def add_event(
        self, run_id: str, *, level: str, kind: str, message: str, server_round: int | None = None
    ) -> None:
        """Append an event (``message`` is scrubbed of paths and shortened)."""
        now = time.time()
        with self._write() as conn:
            self._event(conn, run_id, level, kind, server_round, message, now)
            conn.execute(runs.update().where(runs.c.id == run_id).values(last_update=now))

    @staticmethod
    def _event(
        conn: Connection, run_id: str, level: str, kind: str, server_round: int | None, message: str, now: float
    ) -> None:
        conn.execute(
            events.insert().values(
                run_id=run_id, time=now, level=level, kind=kind, round=server_round, message=scrub(message)
            )
        )

    def finish_run(self, run_id: str, summary: Mapping[str, Any]) -> None:
        """The run ended normally with ``summary`` (see :meth:`RecordingStrategy.finish`)."""
        now = time.time()
        clean = _json_safe(summary)
        with self._write() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(status="finished", finished=now, summary=clean, last_update=now)
            )
            stopped = clean.get("stopped_early") if isinstance(clean, dict) else None
            if stopped:
                self._event(
                    conn, run_id, "warning", "stopped-early", stopped.get("round"),
                    f"stopped early in round {stopped.get('round')}: {stopped.get('reason', '')}", now,
                )
            self._event(conn, run_id, "info", "run-finished", None, "run finished", now)

    def fail_run(self, run_id: str, error: str) -> None:
        """The run ended with ``error`` (scrubbed of paths)."""
        now = time.time()
        message = scrub(error)
        with self._write() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(status="failed", finished=now, error=message, last_update=now)
            )
            self._event(conn, run_id, "error", "run-failed", None, f"run failed: {message}", now)

    # ------------------------------------------------------------ reads
    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first (without config and summary)."""
        with self._read() as conn:
            rows = conn.execute(sa.select(runs).order_by(runs.c.started.desc(), runs.c.id)).mappings().all()
        return [_run_row(row, full=False) for row in rows]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run with its config, versions, summary, error and checkpoints; ``None`` if unknown."""
        with self._read() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None:
                return None
            cps = conn.execute(
                sa.select(checkpoints).where(checkpoints.c.run_id == run_id).order_by(checkpoints.c.kind)
            ).mappings().all()
            last_event = conn.execute(sa.select(sa.func.max(events.c.id)).where(events.c.run_id == run_id)).scalar()
        out = _run_row(row, full=True)
        out["checkpoints"] = [
            {"kind": c["kind"], "round": c["round"], "metrics": c["metrics"], "saved": c["saved"]} for c in cps
        ]
        out["last_event_id"] = int(last_event or 0)
        return out

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        """The run's rounds in order (round 0: the initial model's evaluation)."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(rounds).where(rounds.c.run_id == run_id).order_by(rounds.c.round)
            ).mappings().all()
        return [{k: v for k, v in row.items() if k != "run_id"} for row in rows]

    def site_rounds(self, run_id: str) -> list[dict[str, Any]]:
        """Every (round, site) record of the run, by round then site."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(site_rounds)
                .where(site_rounds.c.run_id == run_id)
                .order_by(site_rounds.c.round, site_rounds.c.site)
            ).mappings().all()
        return [{k: v for k, v in row.items() if k != "run_id"} for row in rows]

    def sites(self, run_id: str) -> list[dict[str, Any]]:
        """One summary per site: last seen, examples, latest local metrics, epsilon, dropouts.

        ``rounds_missed`` counts the finished rounds (after the site's first one) in which the
        site sent no result: a dropout or a failure the server could not attribute.
        """
        per_round = self.site_rounds(run_id)
        finished = [r["round"] for r in self.rounds(run_id) if r["status"] == "finished" and r["round"] > 0]
        by_site: dict[str, list[dict[str, Any]]] = {}
        for row in per_round:
            by_site.setdefault(row["site"], []).append(row)
        out = []
        for site in sorted(by_site, key=_site_sort_key):
            rows = by_site[site]
            fits = [r for r in rows if r["fit"] is not None]
            evals = [r for r in rows if r["eval"] is not None]
            eps = [r for r in rows if r["epsilon"] is not None]
            trained = [r for r in fits if not r["declined"]]
            first = min(r["round"] for r in fits) if fits else None
            fit_rounds = {r["round"] for r in fits}
            missed = sum(1 for rnd in finished if first is not None and rnd > first and rnd not in fit_rounds)
            last = rows[-1]
            out.append(
                {
                    "site": site,
                    "last_round": last["round"],
                    "last_seen": max(r["recorded"] for r in rows),
                    "num_examples": trained[-1]["num_examples"] if trained else last["num_examples"],
                    "local_metrics": dict(evals[-1]["eval"]) if evals else {},
                    "local_metrics_round": evals[-1]["round"] if evals else None,
                    "train_metrics": dict(fits[-1]["fit"]) if fits else {},
                    "epsilon": eps[-1]["epsilon"] if eps else None,
                    "budget_epsilon": eps[-1]["budget_epsilon"] if eps else None,
                    "rounds_participated": len(fit_rounds),
                    "rounds_declined": sum(1 for r in rows if r["declined"]),
                    "rounds_missed": missed,
                }
            )
        return out

    def fairness(self, run_id: str) -> dict[str, Any]:
        """Per round, the best and worst site on the primary local metric and the gap between them.

        The metric is the sites' ``dice``, else ``auc``, else ``accuracy`` (higher is better),
        else ``loss`` (lower is better), from their validation (``eval``) results.
        """
        evals = [r for r in self.site_rounds(run_id) if r["eval"]]
        metric, higher = _fairness_metric(evals)
        points = []
        by_round: dict[int, list[tuple[str, float]]] = {}
        for row in evals:
            if metric in row["eval"]:
                by_round.setdefault(row["round"], []).append((row["site"], float(row["eval"][metric])))
        for rnd in sorted(by_round):
            values = sorted(by_round[rnd], key=lambda sv: sv[1], reverse=higher)
            (best_site, best), (worst_site, worst) = values[0], values[-1]
            points.append(
                {
                    "round": rnd,
                    "best": best,
                    "worst": worst,
                    "gap": abs(best - worst),
                    "best_site": best_site,
                    "worst_site": worst_site,
                    "sites": len(values),
                }
            )
        return {"metric": metric, "higher_is_better": higher, "rounds": points}

    def events(self, run_id: str, *, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """The run's events with ``id > after``, oldest first, at most ``limit``."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(events)
                .where(events.c.run_id == run_id, events.c.id > after)
                .order_by(events.c.id)
                .limit(limit)
            ).mappings().all()
        return [{k: v for k, v in row.items() if k != "run_id"} for row in rows]


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN (pysqlite's own handling defers it oddly).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("medfed_write") else "BEGIN")


def _failure_text(failure: Mapping[str, Any]) -> str:
    """One failed site, e.g. ``site-3 failed to train: ClientAppException (CLIENT_APP_RAISED_EXCEPTION)``."""
    site = failure.get("site") or f"an unidentified site (node {failure.get('node')})"
    if failure.get("code") == "TIMEOUT":
        return f"{site} did not answer within round-timeout"
    return f"{site} failed to train: {failure.get('error') or 'unknown error'} ({failure.get('code')})"


def _site_sort_key(site: str) -> tuple[str, int]:
    head, _, tail = site.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (site, -1)


def _fairness_metric(evals: list[dict[str, Any]]) -> tuple[str | None, bool]:
    keys: set[str] = set()
    for row in evals:
        keys.update(row["eval"])
    for metric in ("dice", "auc", "accuracy"):
        if metric in keys:
            return metric, True
    return ("loss", False) if "loss" in keys else (None, True)


def _clean_secagg(secagg: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("sampled", "survivors", "dropped"):
        if _finite(secagg.get(key)) is not None:
            out[key] = int(secagg[key])
    if _finite(secagg.get("seconds")) is not None:
        out["seconds"] = float(secagg["seconds"])
    out["completed"] = bool(secagg.get("completed", False))
    stage = secagg.get("failed_stage")
    out["failed_stage"] = str(stage) if stage else None
    stages = secagg.get("active_after_stage") or {}
    out["active_after_stage"] = {str(k): int(v) for k, v in stages.items() if _finite(v) is not None}
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


def _run_row(row: Mapping[str, Any], *, full: bool) -> dict[str, Any]:
    status = row["status"]
    last = row["last_update"] or row["started"]
    stale = status == "running" and time.time() - last > STALE_AFTER_S
    out = {
        "id": row["id"],
        "mode": row["mode"],
        "status": "stale" if stale else status,
        "started": row["started"],
        "finished": row["finished"],
        "last_update": last,
        "planned_rounds": row["planned_rounds"],
        "num_sites": row["num_sites"],
        "current_round": row["current_round"],
        "rounds_done": row["rounds_done"],
        "model": row["config"].get("model"),
        "strategy": row["config"].get("strategy"),
        "dataset": row["config"].get("dataset"),
        "error": row["error"],
    }
    if full:
        out.update(config=row["config"], versions=row["versions"], summary=row["summary"])
    return out


# --------------------------------------------------------------------------- the sink
class StoreSink:
    """Records one run into a :class:`RunStore`; :class:`server.run_dir.RunDirectory` calls it.

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
        if record.name.startswith(("sqlalchemy", __name__)):
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
