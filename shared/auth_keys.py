"""SuperNode authentication keys: ECDSA P-384 pairs in OpenSSH format, and their fingerprints.

One place for the key format both sides use: the coordinator's ``medfed provision`` (which
enrols a site with a key it generates, or with the site's own public key) and the site's
``medfed site keygen`` (which generates the pair at the hospital, so that the private key never
leaves it). ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
read exactly this format. Fingerprints are OpenSSH's (``SHA256:<base64>``, as ``ssh-keygen -lf``
prints them), so the two sides can compare them by phone.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.shared.files import write_atomically

__all__ = [
    "AuthKeyError",
    "AuthKeyPair",
    "generate_auth_key_pair",
    "write_auth_key_pair",
    "read_public_key_text",
    "public_key_text",
    "fingerprint",
    "private_key_matches",
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
]

PRIVATE_KEY_NAME = "site-auth.key"
PUBLIC_KEY_NAME = "site-auth.pub"
_CURVES = ("secp256r1", "secp384r1", "secp521r1")
"""NIST curves: what Flower's ``RegisterNode`` accepts."""


class AuthKeyError(ValueError):
    """A key file is missing, unreadable, or not an ECDSA key on a NIST curve."""


@dataclass(frozen=True)
class AuthKeyPair:
    """A fresh key pair, serialised: ``private`` (OpenSSH PEM) and ``public`` (one OpenSSH line)."""

    private: bytes
    public: str


def generate_auth_key_pair() -> AuthKeyPair:
    """A new ECDSA P-384 pair (the curve of ``ssh-keygen -t ecdsa -b 384``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return AuthKeyPair(private=private, public=public.decode())


def write_auth_key_pair(pair: AuthKeyPair, *, private_path: Path, public_path: Path, comment: str = "") -> None:
    """Write the private key (mode 0600) and the public key line (0644, with ``comment``)."""
    write_atomically(private_path, lambda fh: fh.write(pair.private), mode=0o600)
    line = f"{pair.public} {comment}".rstrip() + "\n"
    write_atomically(public_path, lambda fh: fh.write(line.encode()), mode=0o644)


def public_key_text(text: str, *, source: str) -> str:
    """``"<type> <base64>"`` of an OpenSSH public key line (comment dropped), checked.

    Raises
    ------
    AuthKeyError
        Naming ``source``, when the text is not an ECDSA public key on a NIST curve.
    """
    parts = text.strip().split()
    try:
        key = serialization.load_ssh_public_key(" ".join(parts[:2]).encode())
    except (ValueError, UnsupportedAlgorithm, IndexError):
        raise AuthKeyError(
            f"{source} is not an OpenSSH public key. Give the site-auth.pub that `medfed site keygen` "
            "wrote (one line starting with ecdsa-sha2-nistp384)."
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise AuthKeyError(
            f"{source} is not an ECDSA key on a NIST curve (Flower accepts only those). Generate one "
            "with `medfed site keygen --out DIR`."
        )
    return f"{parts[0]} {parts[1]}"


def read_public_key_text(path: str | Path) -> str:
    """:func:`public_key_text` of the file ``path`` (errors name the file)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise AuthKeyError(f"public key file {path} cannot be read ({type(err).__name__}).") from None
    return public_key_text(text, source=f"public key file {path}")


def fingerprint(public: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line (as ``ssh-keygen -lf`` prints it)."""
    blob = base64.b64decode(public.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def private_key_matches(private_path: Path, public: str) -> bool:
    """Whether the OpenSSH private key at ``private_path`` belongs to the public key line ``public``.

    Raises
    ------
    AuthKeyError
        The private key file cannot be read or parsed.
    """
    try:
        key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise AuthKeyError(
            f"private key {private_path} cannot be read as an unencrypted OpenSSH key ({type(err).__name__})."
        ) from None
    own = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return own.decode().split()[:2] == public.split()[:2]
