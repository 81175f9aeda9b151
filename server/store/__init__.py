"""The run store: one database through which the server side records every run.

A run's config, each round's start and end (sites selected and responding, global and per-site
metrics, SecAgg+ status and dropouts, epsilon spent per site), checkpoints, warnings, errors and
the outcome go into a relational database that ``medfed dashboard`` reads while runs write it.

* :mod:`.schema`: the tables; :mod:`.migrate` and ``migrations/``: their alembic migrations,
  applied when a store is opened (stores from before alembic are adopted);
* :mod:`.database`: the engine (SQLite in WAL mode by default, any SQLAlchemy URL, e.g.
  PostgreSQL) and its transactions;
* :mod:`.writes`: :class:`RunStore`, the write path; :mod:`.sink`: :class:`StoreSink`, what
  :class:`medfed.server.run_dir.RunDirectory` calls (see :func:`open_sink`);
* :mod:`.redaction`: no data paths and no passwords in what is stored.

The dashboard's read models are in :mod:`medfed.server.dashboard.read_models`.
"""

from medfed.server.store.errors import StoreError
from medfed.server.store.migrate import head_revision
from medfed.server.store.redaction import redact_config, scrub
from medfed.server.store.sink import RunSink, StoreSink, open_sink
from medfed.server.store.writes import RunStore

__all__ = [
    "RunSink",
    "RunStore",
    "StoreError",
    "StoreSink",
    "head_revision",
    "open_sink",
    "redact_config",
    "scrub",
]
