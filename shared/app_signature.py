"""Verifying medfed app bundles (FABs): the signed payload and the site's signature check.

The coordinator (:mod:`medfed.server.signing`, which holds the key generation and signing) signs, for
every run it submits, the SHA-256 hash of the Flower App Bundle together with the run's complete
run config (the FAB's defaults fused with the run's overrides, exactly as Flower fuses them at
the sites). A site verifies the signature with the
coordinator's public key from its startup kit before Flower installs or imports anything from
the bundle (see :mod:`medfed.client.deploy`).

The signed payload is::

    b"medfed-app-v1\\n" + <sha256 hex of the FAB bytes> + b"\\n" + <canonical JSON of the run config>

where the canonical JSON has sorted keys, no whitespace, and omits :data:`SIGNATURE_KEY` (the
run-config key that carries the signature itself). Binding the run config means a signed
bundle cannot be re-submitted with other settings (DP off, more rounds, another model).

This module is pure ``cryptography``: no Flower, no torch. Sites import it to verify; the
coordinator to build the same payload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "SIGNATURE_KEY",
    "AppSignatureError",
    "load_public_key",
    "key_fingerprint",
    "fab_hash",
    "signed_payload",
    "verify_app",
]

logger = logging.getLogger(__name__)

SIGNATURE_KEY = "app-signature"
"""Run-config key that carries the signature (base64); excluded from the signed payload."""

_DOMAIN = b"medfed-app-v1\n"


class AppSignatureError(RuntimeError):
    """An app bundle is unsigned, altered, or signed by another key."""


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load an app-signing public key (PEM) from a startup kit.

    Raises
    ------
    AppSignatureError
        If the file is missing or not an ed25519 PEM public key.
    """
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise AppSignatureError(
            f"app-signing public key {path} does not exist: the startup kit is incomplete; ask "
            "the coordinator for a fresh kit."
        ) from None
    except ValueError as err:
        raise AppSignatureError(f"app-signing public key {path} is not a PEM public key ({err}).") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AppSignatureError(f"app-signing public key {path} is not an ed25519 key.")
    return key


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:<base64>`` of the raw public key (what operators compare by phone)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def fab_hash(fab: bytes) -> str:
    """SHA-256 hex digest of FAB bytes (Flower's own FAB hash)."""
    return hashlib.sha256(fab).hexdigest()


def _canonical(value: Any, key: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise AppSignatureError(f"run-config key {key!r} is {value}: only finite numbers can be signed.")
    if not isinstance(value, (bool, int, float, str)):
        raise AppSignatureError(
            f"run-config key {key!r} holds a {type(value).__name__}; Flower run configs hold "
            "only bool, int, float and str."
        )
    return value


def signed_payload(fab_sha256: str, run_config: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed: domain tag, FAB hash and canonical run config.

    Parameters
    ----------
    fab_sha256
        64 hex characters.
    run_config
        The fused run config (flat, kebab-case keys); :data:`SIGNATURE_KEY` is ignored.
    """
    if len(fab_sha256) != 64 or any(c not in "0123456789abcdef" for c in fab_sha256):
        raise AppSignatureError(f"FAB hash {fab_sha256!r:.80} is not a SHA-256 hex digest.")
    config = {str(k): _canonical(v, str(k)) for k, v in run_config.items() if k != SIGNATURE_KEY}
    body = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return _DOMAIN + fab_sha256.encode() + b"\n" + body.encode()


def verify_app(
    fab: bytes,
    run_config: Mapping[str, Any],
    *,
    claimed_hash: str,
    public_key: Ed25519PublicKey,
) -> str:
    """Check that ``fab`` is the bundle the coordinator signed for this run config.

    Parameters
    ----------
    fab
        The bundle's bytes as received.
    run_config
        The fused run config as the site sees it; must hold :data:`SIGNATURE_KEY`.
    claimed_hash
        The hash Flower announced for the bundle (compared with the bytes' own hash).
    public_key
        The coordinator's app-signing key from the startup kit.

    Returns
    -------
    str
        The verified FAB hash.

    Raises
    ------
    AppSignatureError
        Unsigned run, malformed signature, bytes that do not match the announced hash, or a
        signature that does not verify (altered bundle or config, or another signer).
    """
    actual = fab_hash(fab)
    if claimed_hash and claimed_hash != actual:
        raise AppSignatureError(
            f"the app bundle's bytes hash to {actual[:12]}... but Flower announced "
            f"{claimed_hash[:12]}...: the bundle was altered in transit."
        )
    signature_b64 = run_config.get(SIGNATURE_KEY, "")
    if not isinstance(signature_b64, str) or not signature_b64:
        raise AppSignatureError(
            f"the run carries no {SIGNATURE_KEY!r}: it was not submitted with `medfed run` and the "
            "coordinator's signing key (unsigned bundle)."
        )
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        raise AppSignatureError(f"the run's {SIGNATURE_KEY!r} is not valid base64.") from None
    try:
        public_key.verify(signature, signed_payload(actual, run_config))
    except InvalidSignature:
        raise AppSignatureError(
            f"the signature does not match app bundle {actual[:12]}... and its run config: the "
            "bundle or its settings were altered after signing, or another key signed them."
        ) from None
    return actual
