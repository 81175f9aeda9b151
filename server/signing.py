"""The coordinator's side of app-bundle signing: its ed25519 key pair and the signature.

What a signature covers, and how a site verifies it, is in :mod:`medfed.shared.app_signature` (sites
import that module; only the coordinator holds the private key). Its names are re-exported here
for the coordinator's code. Pure ``cryptography``: no Flower, no torch.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.shared.app_signature import (
    SIGNATURE_KEY,
    AppSignatureError,
    fab_hash,
    key_fingerprint,
    load_public_key,
    signed_payload,
    verify_app,
)

__all__ = [
    "SIGNATURE_KEY",
    "AppSignatureError",
    "generate_signing_key",
    "write_signing_key",
    "load_private_key",
    "load_public_key",
    "key_fingerprint",
    "fab_hash",
    "signed_payload",
    "sign_app",
    "verify_app",
]

logger = logging.getLogger(__name__)


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh ed25519 key pair for signing app bundles."""
    return Ed25519PrivateKey.generate()


def write_signing_key(key: Ed25519PrivateKey, *, private_path: Path, public_path: Path) -> None:
    """Write the private key (PKCS#8 PEM, mode 0600) and the public key (PEM).

    Both files must not exist yet (callers decide about overwriting).
    """
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, mode=0o600)
    _write_new(public_path, public_pem, mode=0o644)


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load the coordinator's app-signing private key.

    Raises
    ------
    AppSignatureError
        If the file is missing or not an unencrypted ed25519 PEM key.
    """
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise AppSignatureError(
            f"app-signing key {path} does not exist: run `medfed provision` first, or pass the "
            "coordinator's key with --signing-key."
        ) from None
    except ValueError as err:
        raise AppSignatureError(f"app-signing key {path} is not a PEM private key ({err}).") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AppSignatureError(f"app-signing key {path} is not an ed25519 key.")
    return key


def sign_app(fab: bytes, run_config: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """Base64 ed25519 signature over :func:`signed_payload` of ``fab`` and ``run_config``."""
    signature = key.sign(signed_payload(fab_hash(fab), run_config))
    return base64.b64encode(signature).decode()
