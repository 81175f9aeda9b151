"""One alembic revision per file, in order (``0001_...``, ``0002_...``); append only."""
