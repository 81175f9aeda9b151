"""Reading the TOML files a user or a kit provides, with errors that name the file and the fix."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["read_toml"]


def read_toml(
    path: str | Path,
    *,
    error: Callable[[str], BaseException],
    missing: str,
    label: str | None = None,
    fix: str = "",
) -> dict[str, Any]:
    """The parsed TOML file ``path``.

    Parameters
    ----------
    path
        The file.
    error
        Builds the exception raised for a missing or malformed file (the caller's own error
        type, so its command-line handler reports it); given the message.
    missing
        The whole message when the file does not exist (say what the file is and how to get it).
    label
        How messages name the file (default: its path), e.g. ``"site config /etc/site.toml"``.
    fix
        Appended to the message for a malformed file, e.g. ``"; ask for a fresh kit"``.

    Raises
    ------
    BaseException
        ``error(message)`` if the file is missing or is not valid TOML.
    """
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{label or path} is not valid TOML ({err}){fix}.") from None
