"""The run store's alembic migrations (``env.py`` and ``versions/``); applied by :mod:`medfed.server.store.migrate`."""
