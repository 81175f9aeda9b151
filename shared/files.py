"""Crash-safe file writes, the one TOML reader (errors name the file), and the one file hasher."""

from __future__ import annotations

import hashlib
import os
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomically", "read_toml", "file_sha256"]


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


def read_toml(
    path: str | Path,
    *,
    error: Callable[[str], Exception],
    what: str,
    if_missing: str = "",
    if_invalid: str = "",
) -> dict[str, Any]:
    """Read a TOML file, with errors of type ``error`` that name the file.

    Parameters
    ----------
    path
        The file.
    error
        The exception type raised (``ConfigError``, ``SiteConfigError``, ``ProvisionError``).
    what
        What the file is, starting the messages: ``"Config file"``, ``"site config"``.
    if_missing
        The whole message when the file does not exist (default: ``"<what> <path> does not
        exist."``).
    if_invalid
        Appended to the message when the file is not valid TOML (what to do about it).

    Raises
    ------
    Exception
        ``error``: the file is missing, unreadable (a folder, no permission) or not valid TOML.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(if_missing or f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} cannot be read ({err.__class__.__name__}: {err}).") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise error(f"{what} {path} is not valid TOML: {err}.{(' ' + if_invalid) if if_invalid else ''}") from None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
