"""The run store's error."""

from __future__ import annotations

__all__ = ["StoreError"]


class StoreError(RuntimeError):
    """The run store cannot be opened or is of an unknown schema version."""
