"""The run store's tables (SQLAlchemy Core): the models every migration must reproduce.

``tests/server/test_store_migrations.py`` checks that a database built by the migrations in
:mod:`medfed.server.store.migrations` has exactly these tables, columns and indexes; a change here
needs a new migration (``versions/``) that makes the same change to existing stores.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["checkpoints", "cross_site", "events", "metadata", "rounds", "runs", "site_rounds"]

metadata = sa.MetaData()


def _run_id(table: str, **kwargs: bool) -> sa.Column:
    """The ``run_id`` column of a per-run table: a foreign key to ``runs`` (migration 0003)."""
    fk = sa.ForeignKey("runs.id", ondelete="CASCADE", name=f"fk_{table}_run_id")
    return sa.Column("run_id", sa.String(200), fk, **kwargs)


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
    sa.Column("last_update", sa.Float),  # migration 0002
)

rounds = sa.Table(
    "rounds",
    metadata,
    _run_id("rounds", primary_key=True),
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
    _run_id("site_rounds", primary_key=True),
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
    _run_id("events", nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("level", sa.String(10), nullable=False),  # info | warning | error
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("round", sa.Integer),
    sa.Column("message", sa.Text, nullable=False),
    sa.Index("ix_events_run_id_id", "run_id", "id"),  # migration 0002: the dashboard's "events after id"
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    _run_id("checkpoints", primary_key=True),
    sa.Column("kind", sa.String(40), primary_key=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("saved", sa.Float, nullable=False),
)

cross_site = sa.Table(
    "cross_site",
    metadata,
    _run_id("cross_site", primary_key=True),
    sa.Column("checkpoint", sa.String(40), primary_key=True),  # final | best | ...
    sa.Column("site", sa.String(100), primary_key=True),
    sa.Column("key", sa.String(40), primary_key=True),  # "" for the site's own row, else the metadata key
    sa.Column("value", sa.String(40), primary_key=True),  # "" for the site's own row, else the subgroup
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("task", sa.String(20), nullable=False),
    sa.Column("min_count", sa.Integer, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("suppressed", sa.Integer),  # the site's row: subgroups it left out
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("recorded", sa.Float, nullable=False),
)  # migration 0004: one row per site and per reported subgroup (medfed.server.cross_site)
