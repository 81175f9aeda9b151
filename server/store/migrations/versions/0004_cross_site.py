"""The ``cross_site`` table: the sites' evaluation of a checkpoint on their local test splits.

One row per site (``key`` and ``value`` empty) and per subgroup it reported (``key``: the
metadata key, ``value``: the subgroup as shown), written by :mod:`medfed.server.cross_site`.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``cross_site`` (with its foreign key to ``runs``)."""
    op.create_table(
        "cross_site",
        sa.Column(
            "run_id", sa.String(200), sa.ForeignKey("runs.id", ondelete="CASCADE", name="fk_cross_site_run_id"),
            primary_key=True,
        ),
        sa.Column("checkpoint", sa.String(40), primary_key=True),
        sa.Column("site", sa.String(100), primary_key=True),
        sa.Column("key", sa.String(40), primary_key=True),
        sa.Column("value", sa.String(40), primary_key=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("task", sa.String(20), nullable=False),
        sa.Column("min_count", sa.Integer, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("suppressed", sa.Integer),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("recorded", sa.Float, nullable=False),
    )


def downgrade() -> None:
    """Drop ``cross_site``."""
    op.drop_table("cross_site")
