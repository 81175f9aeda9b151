"""The run store's database: the engine, read and write transactions, and migration on open.

* Embedded SQLite by default (``sqlite:///<run-dir>/medfed.db``) in WAL mode: readers never block
  the writer and see each committed round at once. Any SQLAlchemy URL works, so a larger
  deployment can point every coordinator process at PostgreSQL (``postgresql://...``).
* Opening a store applies the missing migrations (:mod:`medfed.server.store.migrate`) in one
  transaction, and refuses a store written by a newer medfed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from medfed.server.store import migrate
from medfed.server.store.errors import StoreError

__all__ = ["Database"]

logger = logging.getLogger(__name__)


class Database:
    """A run store's database at an SQLAlchemy URL, migrated to the newest schema when opened.

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
        except StoreError:
            self.engine.dispose()
            raise

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
    def reading(self) -> Iterator[Connection]:
        """A read transaction (under WAL it sees the last committed write, never waits for one)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _migrate(self) -> None:
        with self._write() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7270011)"))
            migrate.upgrade(conn, url=self.url)

    @property
    def schema_revision(self) -> str | None:
        """The store's schema revision (:func:`medfed.server.store.migrate.head_revision` once open)."""
        with self.reading() as conn:
            return migrate.current_revision(conn)

    @property
    def journal_mode(self) -> str | None:
        """SQLite's journal mode (``"wal"``); ``None`` for other databases."""
        if not self.is_sqlite:
            return None
        with self.engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())


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
