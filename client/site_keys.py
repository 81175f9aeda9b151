"""``medfed site keygen``: the site's own SuperNode authentication key pair.

The private key is generated at the hospital and never leaves it; the site sends only the
public key (and reads its fingerprint to the coordinator by phone), and the coordinator
enrols it with ``medfed provision --site-public-key NAME=FILE``. The site's ``site.toml`` then
names the private key (``auth-private-key``); the kit the coordinator sends holds none.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from medfed.shared.auth_keys import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    fingerprint,
    generate_auth_key_pair,
    write_auth_key_pair,
)

__all__ = ["KeygenError", "SiteKey", "keygen"]

logger = logging.getLogger(__name__)


class KeygenError(RuntimeError):
    """The key pair cannot be written (it would overwrite a key, or the folder is unusable)."""


@dataclass(frozen=True)
class SiteKey:
    """A generated pair: where it is, and the public key's fingerprint."""

    private_key: Path
    public_key: Path
    fingerprint: str


def keygen(out_dir: str | Path, *, comment: str = "", overwrite: bool = False) -> SiteKey:
    """Write a new ECDSA P-384 pair into ``out_dir`` (``site-auth.key`` 0600, ``site-auth.pub``).

    Parameters
    ----------
    out_dir
        The folder (created with mode 0700 if missing).
    comment
        Comment of the public key line (e.g. the site's name).
    overwrite
        Replace an existing pair (the old private key is renamed ``site-auth.key.<time>.old``,
        never deleted: it may still be the enrolled one).

    Raises
    ------
    KeygenError
        A pair exists and ``overwrite`` is false, or ``out_dir`` is not a folder.
    """
    folder = Path(out_dir).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise KeygenError(f"--out {folder} is a file, not a folder: give a folder for the key pair.")
    private, public = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if private.exists() and not overwrite:
        raise KeygenError(
            f"{private} exists: this site already has a key (keep it if it is enrolled). Pass --force to "
            "generate a new one (the old one is kept as site-auth.key.<time>.old), then send the coordinator "
            "the new public key."
        )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if private.exists():
        private.rename(folder / f"{PRIVATE_KEY_NAME}.{time.strftime('%Y%m%dT%H%M%S')}.old")
    pair = generate_auth_key_pair()
    write_auth_key_pair(pair, private_path=private, public_path=public, comment=comment)
    os.chmod(private, 0o600)
    key = SiteKey(private_key=private, public_key=public, fingerprint=fingerprint(pair.public))
    logger.info("site authentication key written: %s (fingerprint %s)", public.name, key.fingerprint)
    return key
