"""Crash-safe file writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["write_atomically"]


def write_atomically(target: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``target`` so that a crash leaves either the old file or the new one, never half.

    ``write`` fills a temporary file in the same folder (opened in binary mode); the file is
    flushed and fsynced, then moved over ``target`` in one ``os.replace``. The folder is created
    if needed; on any error the temporary file is removed and the error re-raised.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
