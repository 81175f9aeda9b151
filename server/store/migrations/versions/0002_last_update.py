"""``runs.last_update`` and the index behind the dashboard's ``events after id`` polling (schema 2).

``last_update`` is the time of the run's latest write: it tells a live run from a dead one
(``stale``). Existing runs get their finish time, else their start time.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``runs.last_update`` (filled for existing runs) and ``ix_events_run_id_id``."""
    op.add_column("runs", sa.Column("last_update", sa.Float))
    op.execute("UPDATE runs SET last_update = COALESCE(finished, started)")
    op.create_index("ix_events_run_id_id", "events", ["run_id", "id"])


def downgrade() -> None:
    """Drop the index and the column."""
    op.drop_index("ix_events_run_id_id", table_name="events")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("last_update")
