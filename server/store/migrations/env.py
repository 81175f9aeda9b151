"""alembic's environment for the run store: migrations run on the connection medfed passes in.

:func:`medfed.server.store.migrate.upgrade` puts the open connection (inside its write transaction)
into ``config.attributes["connection"]``; no ``alembic.ini`` and no URL are needed.
"""

from __future__ import annotations

from alembic import context

from medfed.server.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
