"""What the run store keeps of configs and messages: no data paths, no passwords.

Nothing in the store sees patient data: only what the server already has (scalar metrics,
example counts, epsilon). Paths in the config (``dataset``) are reduced to file names, passwords
in URLs are hidden, and log messages have paths removed before they are stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["EVENT_MESSAGE_CHARS", "redact_config", "scrub"]

EVENT_MESSAGE_CHARS = 500
"""Stored event messages are cut to this many characters."""

_PATH = re.compile(r"(?:[A-Za-z]:|~|\.{1,2})?(?:[\\/][^\s'\"\\/:,;()\[\]{}]+){2,}[\\/]?")


def scrub(message: str, *, limit: int = EVENT_MESSAGE_CHARS) -> str:
    """``message`` with file-system paths replaced by ``<path>``, cut to ``limit`` characters.

    Stored log lines and error messages go through this: a path can name a patient's file.
    """
    text = _PATH.sub("<path>", message)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as the store keeps it: data paths reduced to file names, no passwords."""
    out = dict(config)
    dataset = str(out.get("dataset", ""))
    if dataset and dataset not in ("synthetic", "deployment"):
        out["dataset"] = Path(dataset).name
    for key in ("ledger-dir", "resume"):
        if out.get(key):
            out[key] = Path(str(out[key])).name
    store = str(out.get("store", ""))
    if "://" in store:
        try:
            out["store"] = make_url(store).render_as_string(hide_password=True)
        except ArgumentError:
            out["store"] = "<invalid url>"
    return out
