"""Bringing a run store's schema up to date: alembic migrations, and adopting pre-alembic stores.

The migrations are in ``migrations/versions/`` (one alembic revision each, append only) and run
on the connection :class:`medfed.server.store.database.Database` opens, inside its write transaction:
a store is migrated completely or not at all. A store written by medfed before alembic carries
a ``schema_version`` table (its version ``i`` equals revision ``000i``): it is stamped with that
revision, the old table dropped, and the remaining revisions applied. A store whose schema is
newer than this medfed knows is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from medfed.server.store.errors import StoreError

__all__ = ["LEGACY_REVISIONS", "MIGRATIONS_DIR", "current_revision", "head_revision", "upgrade"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""alembic's script location (``env.py`` and ``versions/``)."""

_VERSION_TABLE = "alembic_version"

LEGACY_REVISIONS: dict[int, str] = {1: "0001", 2: "0002"}
"""The revision that matches each ``schema_version`` of the stores medfed wrote before alembic."""


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS_DIR))


def _config(conn: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    """The newest revision this medfed knows (what :func:`upgrade` brings a store to)."""
    head = _scripts().get_current_head()
    assert head is not None, "the run store has no migrations"
    return head


def current_revision(conn: Connection) -> str | None:
    """The store's revision (``None``: a store without any, e.g. a new database).

    Read from alembic's ``alembic_version`` table directly: alembic's own reader logs two INFO
    lines each time, and every open of a store asks.
    """
    if not sa.inspect(conn).has_table(_VERSION_TABLE):
        return None
    versions = conn.execute(sa.text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars().all()
    if len(versions) > 1:  # branches: medfed's history is linear, so this is not a store of ours
        raise StoreError(
            f"the run store's {_VERSION_TABLE} table holds several revisions {versions}: "
            "not a medfed store; use another one."
        )
    return versions[0] if versions else None


def upgrade(conn: Connection, *, url: str) -> None:
    """Apply the missing migrations on ``conn`` (inside the caller's transaction).

    Parameters
    ----------
    conn
        A connection in a write transaction.
    url
        The store's URL (password hidden), for messages.

    Raises
    ------
    StoreError
        If the store's schema is newer than this medfed knows.
    """
    inspector = sa.inspect(conn)
    if not inspector.has_table(_VERSION_TABLE) and inspector.has_table("schema_version"):
        _adopt_legacy(conn, url=url)
    scripts = _scripts()
    head = scripts.get_current_head()
    current = current_revision(conn)
    if current == head:
        return
    if current is not None and current not in {script.revision for script in scripts.walk_revisions()}:
        raise StoreError(
            f"store {url!r} has schema revision {current!r}, newer than this medfed knows ({head}): "
            "upgrade medfed, or use another store."
        )
    command.upgrade(_config(conn), "head")
    logger.info("run store %s migrated from revision %s to %s", url, current or "none", head)


def _adopt_legacy(conn: Connection, *, url: str) -> None:
    """Stamp a pre-alembic store with the revision of its ``schema_version`` and drop that table."""
    version = int(conn.execute(sa.text("SELECT MAX(version) FROM schema_version")).scalar() or 0)
    if version > max(LEGACY_REVISIONS):
        raise StoreError(
            f"store {url!r} has schema version {version}, newer than this medfed knows "
            f"({max(LEGACY_REVISIONS)}): upgrade medfed, or use another store."
        )
    if version:
        command.stamp(_config(conn), LEGACY_REVISIONS[version])
    conn.execute(sa.text("DROP TABLE schema_version"))
    logger.info("run store %s: schema version %d adopted as revision %s", url, version, LEGACY_REVISIONS.get(version))
