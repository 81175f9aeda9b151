"""Runs, rounds, per-site rounds, events and checkpoints: the tables as of medfed's schema 1.

Exactly the tables medfed's own schema 1 created before alembic (a store of that time is stamped
with this revision): no foreign keys yet, those come with revision 0003.

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the five tables of schema 1 (``runs`` without ``last_update``)."""
    op.create_table(
        "runs",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
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
    )
    op.create_table(
        "rounds",
        sa.Column("run_id", sa.String(200), primary_key=True),
        sa.Column("round", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20), nullable=False),
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
    op.create_table(
        "site_rounds",
        sa.Column("run_id", sa.String(200), primary_key=True),
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
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("round", sa.Integer),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("run_id", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(40), primary_key=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("saved", sa.Float, nullable=False),
    )


def downgrade() -> None:
    """Drop the five tables."""
    for table in ("checkpoints", "events", "site_rounds", "rounds", "runs"):
        op.drop_table(table)
