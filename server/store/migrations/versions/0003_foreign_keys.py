"""Foreign keys from every per-run table to ``runs`` (``ON DELETE CASCADE``).

The tables always declared them, but the stores medfed created before alembic did not get them
(its schema 1 copied the columns without their constraints). Rows whose run is not in ``runs``
(no medfed writes those; the dashboard never shows them) are deleted first, since the constraint
would refuse them. On SQLite each table is rebuilt with its rows (alembic's batch mode).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES: tuple[str, ...] = ("rounds", "site_rounds", "events", "checkpoints")


def upgrade() -> None:
    """Delete orphaned rows, then add ``fk_<table>_run_id`` to each per-run table."""
    for table in TABLES:
        op.execute(f"DELETE FROM {table} WHERE run_id NOT IN (SELECT id FROM runs)")
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(f"fk_{table}_run_id", "runs", ["run_id"], ["id"], ondelete="CASCADE")


def downgrade() -> None:
    """Drop the foreign keys."""
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_run_id", type_="foreignkey")
