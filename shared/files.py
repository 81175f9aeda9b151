"""Crash-safe file writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["write_atomically"]


def write_atomically(
    target: str | Path, write: Callable[[IO[bytes]], object], *, mode: int | None = None
) -> Path:
    """Write ``target`` so that a crash leaves either the old file or the new one, never half.

    ``write`` fills a temporary file in the same folder (opened in binary mode); the file is
    flushed and fsynced, then moved over ``target`` in one ``os.replace``. The folder is created
    if needed; on any error the temporary file is removed and the error re-raised.

    Parameters
    ----------
    target
        The file to write (replaced if it exists).
    write
        Writes the content to the binary file object it is given.
    mode
        The new file's permission bits (e.g. ``0o644``, set as given, whatever the umask);
        ``None`` keeps the temporary file's ``0o600`` (owner only).

    Returns
    -------
    Path
        ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
