"""``medfed provision``: the federation folder with its CA, SuperLink certificate and site kits.

Layout of a federation folder (``F``)::

    F/federation.toml               what the federation is: name, SuperLink address, sites
    F/ca/ca.crt                     the federation's CA certificate (public)
    F/ca/ca.key                     its private key (0600; only needed to reissue certificates)
    F/superlink/server.crt          the SuperLink's TLS certificate (SANs: the given hosts)
    F/superlink/server.key          its private key (0600)
    F/coordinator/app-signing.key   ed25519 key that signs every run's app bundle (0600)
    F/coordinator/app-signing.pub   its public key (copied into every kit)
    F/coordinator/flwr/config.toml  a Flower CLI home (FLWR_HOME) with the TLS connection
    F/sites/<site>/                 one startup kit per site (copy it to the hospital):
        ca.crt, site-auth.key (0600; absent when the site enrolled its own key), site-auth.pub,
        app-signing.pub, kit.toml, site.toml (template), README.md
    F/backups/<UTC time>/           what a ``force=True`` run replaced or dropped (0700)

Provisioning is idempotent: files that exist are kept (and listed as kept), missing ones are
created, so running it again with a new site name adds that site's kit. Keys and
certificates are never replaced without ``force=True``; a forced run first copies every file
it replaces, and moves every dropped site's kit, into a fresh ``F/backups/<UTC time>/``
(mode 0700), and lists the sites it drops or re-keys (``ProvisionResult.dropped``,
``.rekeyed``). Their old keys stay registered at the SuperLink until ``medfed server start``
reconciles the registrations with ``federation.toml`` (:func:`medfed.server.deploy.register_sites`
unregisters every key that is not enrolled).

Site authentication keys are ECDSA P-384 in OpenSSH format (:mod:`medfed.shared.auth_keys`), the
format ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read.
A site either gets a key pair generated here (the coordinator then holds its private key too),
or generates its own with ``medfed site keygen`` and sends only the public key
(``site_public_keys``, ``medfed provision --site-public-key NAME=FILE``): its kit then holds no
private key, and the site names its own in ``site.toml`` (``auth-private-key``).
``federation.toml`` records every enrolled site's name, index and public key: the enrolment the
SuperLink's registrations and the ServerApp's site identities (:mod:`medfed.server.identity`)
are checked against.

The CA private key is needed only to issue the SuperLink certificate. ``ca_key`` puts it outside
the federation folder (e.g. on removable media); left inside, where the SuperLink runs from,
provisioning and ``medfed server start`` warn.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.server.signing import generate_signing_key, key_fingerprint, load_public_key, write_signing_key
from medfed.shared.auth_keys import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    AuthKeyError,
    fingerprint,
    generate_auth_key_pair,
    public_key_text,
    read_public_key_text,
)
from medfed.shared.files import read_toml, write_atomically

__all__ = [
    "ProvisionError",
    "Federation",
    "SiteEntry",
    "ProvisionResult",
    "provision",
    "load_federation",
    "parse_address",
    "SITE_NAME_PATTERN",
    "BACKUP_DIR",
    "describe",
    "ca_key_warning",
    "main_describe",
]

logger = logging.getLogger(__name__)

SITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MANIFEST = "federation.toml"
BACKUP_DIR = "backups"
KEY_ORIGINS = ("coordinator", "site")
DEFAULT_RUNTIME_PORT = 9094


class ProvisionError(RuntimeError):
    """Provisioning cannot proceed (bad input, or it would overwrite keys)."""


@dataclass(frozen=True)
class SiteEntry:
    """One enrolled site: its name, its index in the federation, its kit folder and its key.

    ``key`` is the enrolled public key (``"<type> <base64>"``, OpenSSH); ``key_origin`` says who
    generated the pair: ``"coordinator"`` (the kit holds the private key) or ``"site"`` (the
    site kept it: ``medfed site keygen``).
    """

    name: str
    index: int
    kit: Path
    key: str = ""
    key_origin: str = "coordinator"

    @property
    def public_key(self) -> Path:
        """The site's SuperNode authentication public key file in its kit (OpenSSH)."""
        return self.kit / PUBLIC_KEY_NAME

    @property
    def fingerprint(self) -> str:
        """OpenSSH fingerprint of :attr:`key` (``""`` if none is recorded)."""
        return fingerprint(self.key) if self.key else ""


@dataclass(frozen=True)
class Federation:
    """A provisioned federation folder (see the module docstring for its layout)."""

    root: Path
    name: str
    superlink_address: str
    hosts: tuple[str, ...]
    sites: tuple[SiteEntry, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "coordinator" / "app-signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "coordinator" / "app-signing.pub"

    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME`` of the coordinator's Flower CLI (holds ``config.toml``)."""
        return self.root / "coordinator" / "flwr"

    @property
    def connection_name(self) -> str:
        """Name of the SuperLink connection in the coordinator's Flower config."""
        return self.name

    def site(self, name: str) -> SiteEntry:
        """The enrolled site ``name``."""
        for entry in self.sites:
            if entry.name == name:
                return entry
        valid = ", ".join(s.name for s in self.sites) or "none"
        raise ProvisionError(f"site {name!r} is not enrolled in {self.root / MANIFEST}. Enrolled: {valid}.")


@dataclass
class ProvisionResult:
    """What :func:`provision` did."""

    federation: Federation
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    backup: Path | None = None
    """The folder holding what this run replaced or dropped (``None``: nothing was)."""
    dropped: list[str] = field(default_factory=list)
    """Sites enrolled before and not any more (their kits moved into :attr:`backup`)."""
    rekeyed: list[str] = field(default_factory=list)
    """Sites still enrolled whose public key changed."""
    warnings: list[str] = field(default_factory=list)


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``.

    Raises
    ------
    ProvisionError
        Naming the address and the expected form.
    """
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ProvisionError(
            f"SuperLink address {address!r} is invalid: write HOST:PORT, e.g. "
            "coordinator.example.org:8000 or 10.0.0.5:8000."
        )
    return host, int(port_text)


def _check_site_names(sites: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in sites:
        if not SITE_NAME_PATTERN.match(name):
            raise ProvisionError(
                f"site name {name!r} is invalid: use 1-63 letters, digits, '-' or '_', starting "
                "with a letter or digit (it becomes a folder name)."
            )
        if name in seen:
            raise ProvisionError(f"site name {name!r} is given twice.")
        seen.add(name)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _utc_stamp() -> str:
    return _now().strftime("%Y%m%dT%H%M%S.%fZ")


class _Writer:
    """Creates files that are missing, keeps those that exist (unless forced).

    Forced, every existing file is copied into the backup folder before it is overwritten or
    removed (unless its content stays the same).
    """

    def __init__(self, result: ProvisionResult, force: bool) -> None:
        self.result = result
        self.force = force

    def wants(self, path: Path) -> bool:
        """Whether ``path`` should be (re)written."""
        if path.exists() and not self.force:
            self.result.kept.append(path)
            return False
        return True

    def backup_folder(self) -> Path:
        """This run's backup folder (created, mode 0700, on first use)."""
        if self.result.backup is None:
            base = self.result.federation.root / BACKUP_DIR
            base.mkdir(mode=0o700, exist_ok=True)
            os.chmod(base, 0o700)
            folder = base / _utc_stamp()
            folder.mkdir(mode=0o700)
            self.result.backup = folder
        return self.result.backup

    def backup(self, path: Path, *, move: bool = False) -> None:
        """Copy (or move) ``path``, a file or a folder inside the federation folder, into the backup."""
        if not path.exists():
            return
        target = self.backup_folder() / path.relative_to(self.result.federation.root)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if move:
            shutil.move(str(path), str(target))
        elif path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)

    def remove(self, path: Path) -> None:
        """Remove the file ``path`` (backed up first)."""
        if path.exists():
            self.backup(path)
            path.unlink()

    def write(self, path: Path, data: bytes, *, mode: int = 0o644) -> None:
        if self.force and path.is_file() and path.read_bytes() != data:
            self.backup(path)
        write_atomically(path, lambda fh: fh.write(data), mode=mode)
        self.result.created.append(path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_ca(name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _new_server_cert(
    hosts: Sequence[str], ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _server_cert_hosts(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def _site_keys(site_public_keys: Mapping[str, str | Path]) -> dict[str, str]:
    """``--site-public-key`` files read and checked: site name -> public key line."""
    keys: dict[str, str] = {}
    for site, path in site_public_keys.items():
        try:
            keys[site] = read_public_key_text(path)
        except AuthKeyError as err:
            raise ProvisionError(f"--site-public-key {site}={path}: {err}") from None
    seen: dict[str, str] = {}
    for site, key in keys.items():
        if key in seen:
            raise ProvisionError(
                f"--site-public-key: sites {seen[key]!r} and {site!r} were given the same public key; "
                "every site needs its own (`medfed site keygen` at each site)."
            )
        seen[key] = site
    return keys


def ca_key_warning(path: Path, root: Path) -> str | None:
    """A warning when the CA private key ``path`` lies inside the federation folder ``root``."""
    if path.exists() and path.resolve().is_relative_to(root.resolve()):
        return (
            f"the CA private key {path} is inside the federation folder the SuperLink runs from. It is "
            "needed only to reissue the SuperLink certificate: move it offline (e.g. removable media) "
            "and pass --ca-key FILE to `medfed provision` when reissuing."
        )
    return None


def provision(
    out_dir: str | Path,
    *,
    sites: Sequence[str],
    superlink_address: str = "localhost:8000",
    hosts: Sequence[str] = (),
    name: str = "medfed",
    force: bool = False,
    validity_days: int = 825,
    site_public_keys: Mapping[str, str | Path] | None = None,
    ca_key: str | Path | None = None,
) -> ProvisionResult:
    """Create (or complete) a federation folder.

    Parameters
    ----------
    out_dir
        The federation folder; created if missing.
    sites
        Names of the sites to enroll (each gets a startup kit). Sites enrolled by an earlier
        call stay enrolled, unless ``force``: then exactly ``sites`` (and the sites of
        ``site_public_keys``) are enrolled, and the others are dropped.
    superlink_address
        ``HOST:PORT`` the sites connect to; its host is put in the certificate's SANs.
    hosts
        Extra DNS names / IP addresses for the certificate (``localhost`` and ``127.0.0.1``
        are always added, so the coordinator can reach its own SuperLink).
    name
        Federation name (also the Flower CLI connection name).
    force
        Replace existing keys and certificates (every kit then has to be redistributed), after
        backing them up (:attr:`ProvisionResult.backup`). Sites enrolled with their own public
        key keep it unless ``site_public_keys`` gives a new one.
    validity_days
        Lifetime of the CA and the SuperLink certificate.
    site_public_keys
        Site name -> the site's own public key file (``medfed site keygen``): the site is
        enrolled with that key, and its kit holds no private key. Replacing the key of an
        enrolled site needs ``force``.
    ca_key
        Where the CA private key is written (a new CA) or read (reissuing the SuperLink
        certificate); default ``<federation>/ca/ca.key``, with a warning.

    Returns
    -------
    ProvisionResult
        The federation, the files created or kept, the backup, the sites dropped or re-keyed.

    Raises
    ------
    ProvisionError
        Invalid names, address or public key files, an existing certificate whose hosts differ
        from the requested ones, or a new key for an enrolled site (without ``force``).
    """
    root = Path(out_dir).expanduser().resolve()
    if not SITE_NAME_PATTERN.match(name):
        raise ProvisionError(f"federation name {name!r} is invalid: use letters, digits, '-' or '_'.")
    supplied = _site_keys(site_public_keys or {})
    requested = list(dict.fromkeys([*sites, *supplied]))
    _check_site_names(list(sites))
    _check_site_names(requested)
    address_host, port = parse_address(superlink_address)
    all_hosts = list(dict.fromkeys([address_host, *hosts, "localhost", "127.0.0.1"]))

    previous: Federation | None = None
    if (root / MANIFEST).exists():
        previous = load_federation(root)
        if previous.superlink_address != superlink_address and not force:
            raise ProvisionError(
                f"{root / MANIFEST} was provisioned for SuperLink {previous.superlink_address}, not "
                f"{superlink_address}: kits would point elsewhere. Use the same address, or pass "
                "--force to reissue everything."
            )
    before = {s.name: s for s in previous.sites} if previous else {}
    for site, key in supplied.items():
        old = before.get(site)
        if old is not None and old.key and old.key != key and not force:
            raise ProvisionError(
                f"site {site!r} is enrolled with another key ({old.fingerprint}); --site-public-key "
                f"{site}=... gives {fingerprint(key)}. Pass --force to re-key it (the old key is backed "
                "up and removed from the SuperLink at the next `medfed server start`)."
            )
    names = [s.name for s in previous.sites] if previous and not force else []
    names += [s for s in requested if s not in names]
    if not names:
        raise ProvisionError("no sites to enroll: give at least one --site NAME.")
    fed = Federation(
        root=root,
        name=name,
        superlink_address=superlink_address,
        hosts=tuple(all_hosts),
        sites=tuple(SiteEntry(n, i, root / "sites" / n) for i, n in enumerate(names)),
    )
    result = ProvisionResult(federation=fed)
    w = _Writer(result, force)
    root.mkdir(parents=True, exist_ok=True)
    ca_key_path = Path(ca_key).expanduser().resolve() if ca_key is not None else fed.ca_key

    # Dropped sites: their kits (private keys included) go into the backup.
    result.dropped = [n for n in before if n not in names]
    for dropped in result.dropped:
        w.backup(root / "sites" / dropped, move=True)

    # CA and SuperLink certificate.
    loaded_ca_key: ec.EllipticCurvePrivateKey | None = None
    if w.wants(fed.ca_cert):
        loaded_ca_key, ca_cert = _new_ca(name, validity_days)
        w.write(ca_key_path, _pem_key(loaded_ca_key), mode=0o600)
        w.write(fed.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        force_server = True
    else:
        ca_cert = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
        if ca_key_path.exists():
            result.kept.append(ca_key_path)
        force_server = False
    if fed.server_cert.exists() and not force_server and not force:
        missing = set(all_hosts) - _server_cert_hosts(fed.server_cert)
        if missing:
            raise ProvisionError(
                f"{fed.server_cert} does not cover host(s) {', '.join(sorted(missing))}. Pass "
                "--force to reissue the certificate (and every kit), or drop those hosts."
            )
        result.kept += [fed.server_cert, fed.server_key]
    else:
        if loaded_ca_key is None:
            try:
                loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            except FileNotFoundError:
                raise ProvisionError(
                    f"{fed.server_cert} must be issued but the CA key {ca_key_path} is not here. "
                    "Put the CA key back, or pass --ca-key FILE where it is kept offline, and run again."
                ) from None
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            loaded_ca_key = loaded
        key, cert = _new_server_cert(all_hosts, loaded_ca_key, ca_cert, validity_days)
        w.write(fed.server_key, _pem_key(key), mode=0o600)
        w.write(fed.server_cert, cert.public_bytes(serialization.Encoding.PEM))

    # Coordinator: app-signing key and a Flower CLI home with the TLS connection.
    if w.wants(fed.signing_key):
        fed.signing_key.parent.mkdir(parents=True, exist_ok=True)
        for path in (fed.signing_key, fed.signing_pub):
            w.remove(path)
        write_signing_key(generate_signing_key(), private_path=fed.signing_key, public_path=fed.signing_pub)
        result.created += [fed.signing_key, fed.signing_pub]
    else:
        result.kept.append(fed.signing_pub)
    signing_fingerprint = key_fingerprint(load_public_key(fed.signing_pub))
    flwr_config = {
        "superlink": {
            "default": fed.connection_name,
            fed.connection_name: {
                "address": superlink_address,
                "root-certificates": str(fed.ca_cert),
            },
        }
    }
    w.write(fed.flwr_home / "config.toml", tomli_w.dumps(flwr_config).encode())

    # One startup kit per site.
    enrolled = tuple(
        _write_kit(w, fed, site, port=port, signing_fingerprint=signing_fingerprint,
                   supplied=supplied.get(site.name), before=before.get(site.name))
        for site in fed.sites
    )
    fed = Federation(root=root, name=name, superlink_address=superlink_address, hosts=fed.hosts, sites=enrolled)
    result.federation = fed
    result.rekeyed = [s.name for s in enrolled if s.name in before and before[s.name].key not in ("", s.key)]

    manifest = {
        "name": name,
        "superlink-address": superlink_address,
        "hosts": all_hosts,
        "app-signing-fingerprint": signing_fingerprint,
        "sites": {
            s.name: {"index": s.index, "public-key": s.key, "key-origin": s.key_origin, "fingerprint": s.fingerprint}
            for s in fed.sites
        },
    }
    w.write(root / MANIFEST, tomli_w.dumps(manifest).encode())
    if result.backup is not None:
        result.warnings.append(
            f"replaced and dropped files are in {result.backup} (mode 0700); it holds the old private keys: "
            "move it offline or delete it once the new kits work."
        )
    for site in (*result.dropped, *result.rekeyed):  # logged; the CLI prints them (ProvisionResult)
        logger.info(
            "site %s %s: its old key stays registered at the SuperLink until `medfed server start` "
            "unregisters it", site, "dropped" if site in result.dropped else "re-keyed",
        )
    warning = ca_key_warning(ca_key_path, root)
    if warning:
        result.warnings.append(warning)
    for text in result.warnings:
        logger.info("warning: %s", text)
    logger.info(
        "provisioned federation %s: %d site(s), %d file(s) created, %d kept",
        name, len(fed.sites), len(result.created), len(result.kept),
    )
    return result


def _write_kit(
    w: _Writer,
    fed: Federation,
    site: SiteEntry,
    *,
    port: int,
    signing_fingerprint: str,
    supplied: str | None,
    before: SiteEntry | None,
) -> SiteEntry:
    """Write ``site``'s kit; return the entry with its enrolled key."""
    kit = site.kit
    kit.mkdir(parents=True, exist_ok=True)
    w.write(kit / "ca.crt", fed.ca_cert.read_bytes())
    w.write(kit / "app-signing.pub", fed.signing_pub.read_bytes())
    key_path = kit / PRIVATE_KEY_NAME
    comment = f" medfed-{fed.name}-{site.name}\n"
    own = supplied or (before.key if before is not None and before.key_origin == "site" else None)
    if own is not None:  # the site keeps its private key: the kit holds only the public one
        w.remove(key_path)
        w.write(site.public_key, (own + comment).encode())
        origin, key_text = "site", own
    elif w.wants(key_path):
        pair = generate_auth_key_pair()
        w.write(key_path, pair.private, mode=0o600)
        w.write(site.public_key, (pair.public + comment).encode())
        origin, key_text = "coordinator", pair.public
    else:
        w.result.kept.append(site.public_key)
        origin = "coordinator"
        key_text = public_key_text(site.public_key.read_text(), source=str(site.public_key))
    kit_info = {
        "federation": fed.name,
        "site-name": site.name,
        "site-index": site.index,
        "superlink": fed.superlink_address,
        "ca-certificate": "ca.crt",
        "auth-private-key": PRIVATE_KEY_NAME if origin == "coordinator" else "",
        "auth-public-key": PUBLIC_KEY_NAME,
        "auth-key-fingerprint": fingerprint(key_text),
        "app-signing-public-key": "app-signing.pub",
        "app-signing-fingerprint": signing_fingerprint,
    }
    w.write(kit / "kit.toml", tomli_w.dumps(kit_info).encode())
    template = kit / "site.toml"
    if w.wants(template):
        w.write(template, _SITE_TEMPLATE.format(site=site.name, runtime_port=DEFAULT_RUNTIME_PORT).encode())
    w.write(kit / "README.md", _KIT_README.format(
        site=site.name, federation=fed.name, address=fed.superlink_address, port=port,
        fingerprint=signing_fingerprint, runtime_port=DEFAULT_RUNTIME_PORT,
        key_row=_KEY_ROWS[origin], key_fingerprint=fingerprint(key_text),
    ).encode())
    return SiteEntry(site.name, site.index, kit, key=key_text, key_origin=origin)


def load_federation(root: str | Path) -> Federation:
    """Read a federation folder written by :func:`provision`.

    A manifest written before public keys were recorded in it gets each site's key from its
    kit's ``site-auth.pub``.

    Raises
    ------
    ProvisionError
        If the folder has no readable ``federation.toml``.
    """
    root = Path(root).expanduser().resolve()
    path = root / MANIFEST
    data = read_toml(
        path,
        error=ProvisionError,
        what="federation manifest",
        if_missing=f"{path} does not exist: {root} is not a federation folder. Run `medfed provision` first.",
    )
    try:
        entries = []
        for site_name, value in data["sites"].items():
            kit = root / "sites" / site_name
            key = str(value.get("public-key", ""))
            if not key and (kit / PUBLIC_KEY_NAME).is_file():
                key = public_key_text((kit / PUBLIC_KEY_NAME).read_text(), source=str(kit / PUBLIC_KEY_NAME))
            elif key:
                key = public_key_text(key, source=f"{path} [sites.{site_name}] public-key")
            origin = str(value.get("key-origin", "coordinator"))
            if origin not in KEY_ORIGINS:
                raise ValueError(f"key-origin = {origin!r} of site {site_name!r}")
            entries.append(SiteEntry(site_name, int(value["index"]), kit, key=key, key_origin=origin))
        return Federation(
            root=root,
            name=str(data["name"]),
            superlink_address=str(data["superlink-address"]),
            hosts=tuple(data["hosts"]),
            sites=tuple(sorted(entries, key=lambda s: s.index)),
        )
    except AuthKeyError as err:
        raise ProvisionError(f"{err} Re-run `medfed provision`.") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ProvisionError(f"{path} lacks or garbles {err}: re-run `medfed provision`.") from None


def describe(result: ProvisionResult) -> dict[str, object]:
    """A JSON-able summary (paths relative to the federation folder, except the backup's)."""
    root = result.federation.root

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    return {
        "federation": str(root),
        "sites": [s.name for s in result.federation.sites],
        "site-keys": {s.name: {"fingerprint": s.fingerprint, "key-origin": s.key_origin} for s in result.federation.sites},
        "created": sorted(rel(p) for p in result.created),
        "kept": sorted(rel(p) for p in result.kept),
        "dropped": list(result.dropped),
        "rekeyed": list(result.rekeyed),
        "backup": str(result.backup) if result.backup else None,
        "warnings": list(result.warnings),
    }



_SITE_TEMPLATE = """\
# medfed site configuration for site {site!r}.
# Edit the values below, then run:  medfed site check --config site.toml
# Every key is checked when the site starts; an unknown key is an error.

# This site's name (as enrolled by the coordinator; used in local logs only).
site-name = "{site}"

# The MONAI-style datalist of this site's images (NIfTI, DICOM or PNG); relative paths in it
# are resolved against its folder. The file and the images never leave the hospital.
datalist = "/path/to/datalist.json"

# "auto" (CUDA when present), "cpu", or "cuda:0".
device = "auto"

# ---- This site's privacy policy. It is enforced here, at the site, whatever the coordinator's
# run config says: a run that asks for less privacy is refused before training (this site's log
# names the key, the run's value and the limit below; the coordinator sees which keys, as a
# "policy-refused" event). Check a proposed run with:
#   medfed site check --config site.toml --run-config run.toml
# What it cannot do: the coordinator signs the training code this site runs; the policy binds
# medfed's code, so compare the app-signing fingerprint in README.md and trust who holds the key.

# Refuse every run that does not train with sample-level DP-SGD (dp = true).
require-dp = true

# The most differential-privacy budget (epsilon) this site's data ever spends, over all runs
# and run configs (one privacy ledger per datalist). A run whose dp-target-epsilon exceeds it
# is refused; a round that would exceed it is declined.
dp-budget-epsilon = 8.0

# The largest delta accepted (a run's dp-delta above it is refused). Keep it well below
# 1 / (number of training images).
dp-max-delta = 1e-5

# The smallest DP-SGD noise multiplier accepted (the run's dp-noise-multiplier, or the one this
# site derives from the run's dp-target-epsilon). 0 = any noise > 0.
dp-min-noise-multiplier = 0.0

# Refuse runs with dp-secure-noise = false (noise seeded from the run's seed, which the
# coordinator knows: it could remove the noise).
dp-require-secure-noise = true

# Where this site keeps its privacy ledgers ("" = <state-dir>/ledgers). Never delete or edit a
# ledger: that resets the budget. The coordinator's ledger-dir is ignored.
ledger-dir = ""

# Local port of the SuperNode's runtime API (bound to 127.0.0.1 only).
runtime-port = {runtime_port}

# Where Flower keeps this site's state and the installed app bundles ("" = <kit>/state).
state-dir = ""

# Side length images are resized to when checking ("0" = they must all share one size).
image-size = 0

# Unusable datalist entries (unreadable files, labels out of range, wrong channels or dims):
# "strict" refuses to train and names them in this site's log; "skip" trains on the usable
# ones and reports only their count. "" follows the run's bad-data (strict by default).
bad-data = ""

# Voxel size in mm NIfTI/DICOM images are resampled to after reorientation to RAS ("1.5" every
# axis, "1,1,2" per axis); "" follows the run's spacing (native by default). This site's value
# wins: it knows its scanners. See docs/images.md.
spacing = ""

# This site's own SuperNode authentication private key (written by `medfed site keygen`), when
# the coordinator enrolled only its public key. "" = the kit's site-auth.key.
auth-private-key = ""
"""

_KEY_ROWS = {
    "coordinator": "| `site-auth.key` | this site's private authentication key: keep it secret (mode 0600). The "
    "coordinator generated it; to hold the only copy, run `medfed site keygen --out DIR` and send the "
    "coordinator the public key instead |",
    "site": "| (no private key) | this site enrolled its own key (`medfed site keygen`): set `auth-private-key` "
    "in site.toml to that private key file |",
}

_KIT_README = """\
# medfed startup kit: site `{site}` of federation `{federation}`

| file | what it is |
| --- | --- |
| `ca.crt` | the federation's CA; the site trusts only a SuperLink whose certificate it signed |
{key_row}
| `site-auth.pub` | its public key (fingerprint `{key_fingerprint}`), registered at the SuperLink by the coordinator |
| `app-signing.pub` | the coordinator's key: this site runs only training code signed with it |
| `kit.toml` | what this kit is (do not edit) |
| `site.toml` | your site configuration (edit it) |

Coordinator app-signing key fingerprint: `{fingerprint}` (compare it with the coordinator by
phone before the first run).

## Start the site

    medfed site check --config site.toml          # reads the datalist locally, contacts nobody
    medfed site start --kit . --config site.toml  # joins the federation

## Network

One outbound HTTPS (TLS) connection to the SuperLink at `{address}` (port {port}). Nothing is
opened for inbound connections; the SuperNode's runtime API listens on 127.0.0.1:{runtime_port}
for the site's own training process only.

## What leaves the hospital

Model weights (or SecAgg+-masked weights) and numeric metrics (losses, AUC, example counts),
checked by the site's egress guard. Never images, labels, file names or paths.
"""


def main_describe(result: ProvisionResult) -> str:
    """Pretty JSON of :func:`describe` (for the CLI)."""
    return json.dumps(describe(result), indent=2)
