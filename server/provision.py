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
        ca.crt, site-auth.key (0600), site-auth.pub, app-signing.pub, kit.toml,
        site.toml (template), README.md

Provisioning is idempotent: files that exist are kept (and listed as kept), missing ones are
created, so running it again with a new site name adds that site's kit. Keys and
certificates are never replaced without ``force=True``.

Site authentication keys are ECDSA P-384 in OpenSSH format, the format
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.server.signing import generate_signing_key, key_fingerprint, load_public_key, write_signing_key
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
    "describe",
    "main_describe",
]

logger = logging.getLogger(__name__)

SITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MANIFEST = "federation.toml"
DEFAULT_RUNTIME_PORT = 9094


class ProvisionError(RuntimeError):
    """Provisioning cannot proceed (bad input, or it would overwrite keys)."""


@dataclass(frozen=True)
class SiteEntry:
    """One enrolled site: its name, its index in the federation and its kit folder."""

    name: str
    index: int
    kit: Path

    @property
    def public_key(self) -> Path:
        """The site's SuperNode authentication public key (OpenSSH)."""
        return self.kit / "site-auth.pub"


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


class _Writer:
    """Creates files that are missing, keeps those that exist (unless forced)."""

    def __init__(self, result: ProvisionResult, force: bool) -> None:
        self.result = result
        self.force = force

    def wants(self, path: Path) -> bool:
        """Whether ``path`` should be (re)written."""
        if path.exists() and not self.force:
            self.result.kept.append(path)
            return False
        return True

    def write(self, path: Path, data: bytes, *, mode: int = 0o644) -> None:
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


def provision(
    out_dir: str | Path,
    *,
    sites: Sequence[str],
    superlink_address: str = "localhost:8000",
    hosts: Sequence[str] = (),
    name: str = "medfed",
    force: bool = False,
    validity_days: int = 825,
) -> ProvisionResult:
    """Create (or complete) a federation folder.

    Parameters
    ----------
    out_dir
        The federation folder; created if missing.
    sites
        Names of the sites to enroll (each gets a startup kit). Sites enrolled by an earlier
        call stay enrolled.
    superlink_address
        ``HOST:PORT`` the sites connect to; its host is put in the certificate's SANs.
    hosts
        Extra DNS names / IP addresses for the certificate (``localhost`` and ``127.0.0.1``
        are always added, so the coordinator can reach its own SuperLink).
    name
        Federation name (also the Flower CLI connection name).
    force
        Replace existing keys and certificates (every kit then has to be redistributed).
    validity_days
        Lifetime of the CA and the SuperLink certificate.

    Returns
    -------
    ProvisionResult
        The federation and the files created or kept.

    Raises
    ------
    ProvisionError
        Invalid names or address, or an existing certificate whose hosts differ from the
        requested ones (without ``force``).
    """
    root = Path(out_dir).expanduser().resolve()
    if not SITE_NAME_PATTERN.match(name):
        raise ProvisionError(f"federation name {name!r} is invalid: use letters, digits, '-' or '_'.")
    _check_site_names(sites)
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
    names = [s.name for s in previous.sites] if previous and not force else []
    names += [s for s in sites if s not in names]
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

    # CA and SuperLink certificate.
    ca_key: ec.EllipticCurvePrivateKey | None = None
    if w.wants(fed.ca_cert):
        ca_key, ca_cert = _new_ca(name, validity_days)
        w.write(fed.ca_key, _pem_key(ca_key), mode=0o600)
        w.write(fed.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        force_server = True
    else:
        ca_cert = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
        if fed.ca_key.exists():
            result.kept.append(fed.ca_key)
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
        if ca_key is None:
            try:
                loaded = serialization.load_pem_private_key(fed.ca_key.read_bytes(), password=None)
            except FileNotFoundError:
                raise ProvisionError(
                    f"{fed.server_cert} must be issued but the CA key {fed.ca_key} is not here. "
                    "Put the CA key back (it may be kept offline) and run again."
                ) from None
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            ca_key = loaded
        key, cert = _new_server_cert(all_hosts, ca_key, ca_cert, validity_days)
        w.write(fed.server_key, _pem_key(key), mode=0o600)
        w.write(fed.server_cert, cert.public_bytes(serialization.Encoding.PEM))

    # Coordinator: app-signing key and a Flower CLI home with the TLS connection.
    if w.wants(fed.signing_key):
        fed.signing_key.parent.mkdir(parents=True, exist_ok=True)
        for path in (fed.signing_key, fed.signing_pub):
            if path.exists():
                path.unlink()
        write_signing_key(generate_signing_key(), private_path=fed.signing_key, public_path=fed.signing_pub)
        result.created += [fed.signing_key, fed.signing_pub]
    else:
        result.kept.append(fed.signing_pub)
    fingerprint = key_fingerprint(load_public_key(fed.signing_pub))
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
    for site in fed.sites:
        _write_kit(w, fed, site, port=port, fingerprint=fingerprint)

    manifest = {
        "name": name,
        "superlink-address": superlink_address,
        "hosts": all_hosts,
        "app-signing-fingerprint": fingerprint,
        "sites": {s.name: {"index": s.index} for s in fed.sites},
    }
    w.write(root / MANIFEST, tomli_w.dumps(manifest).encode())
    logger.info(
        "provisioned federation %s: %d site(s), %d file(s) created, %d kept",
        name, len(fed.sites), len(result.created), len(result.kept),
    )
    return result


def _write_kit(w: _Writer, fed: Federation, site: SiteEntry, *, port: int, fingerprint: str) -> None:
    kit = site.kit
    kit.mkdir(parents=True, exist_ok=True)
    w.write(kit / "ca.crt", fed.ca_cert.read_bytes())
    w.write(kit / "app-signing.pub", fed.signing_pub.read_bytes())
    key_path = kit / "site-auth.key"
    if w.wants(key_path):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        w.write(key_path, private, mode=0o600)
        w.write(site.public_key, public + f" medfed-{fed.name}-{site.name}\n".encode())
    else:
        w.result.kept.append(site.public_key)
    kit_info = {
        "federation": fed.name,
        "site-name": site.name,
        "site-index": site.index,
        "superlink": fed.superlink_address,
        "ca-certificate": "ca.crt",
        "auth-private-key": "site-auth.key",
        "auth-public-key": "site-auth.pub",
        "app-signing-public-key": "app-signing.pub",
        "app-signing-fingerprint": fingerprint,
    }
    w.write(kit / "kit.toml", tomli_w.dumps(kit_info).encode())
    template = kit / "site.toml"
    if w.wants(template):
        w.write(template, _SITE_TEMPLATE.format(site=site.name, runtime_port=DEFAULT_RUNTIME_PORT).encode())
    w.write(kit / "README.md", _KIT_README.format(
        site=site.name, federation=fed.name, address=fed.superlink_address, port=port,
        fingerprint=fingerprint, runtime_port=DEFAULT_RUNTIME_PORT,
    ).encode())


def load_federation(root: str | Path) -> Federation:
    """Read a federation folder written by :func:`provision`.

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
        sites = sorted(
            (SiteEntry(n, int(v["index"]), root / "sites" / n) for n, v in data["sites"].items()),
            key=lambda s: s.index,
        )
        return Federation(
            root=root,
            name=str(data["name"]),
            superlink_address=str(data["superlink-address"]),
            hosts=tuple(data["hosts"]),
            sites=tuple(sites),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ProvisionError(f"{path} lacks or garbles {err}: re-run `medfed provision`.") from None


def describe(result: ProvisionResult) -> dict[str, object]:
    """A JSON-able summary (paths relative to the federation folder)."""
    root = result.federation.root
    return {
        "federation": str(root),
        "sites": [s.name for s in result.federation.sites],
        "created": sorted(str(p.relative_to(root)) for p in result.created),
        "kept": sorted(str(p.relative_to(root)) for p in result.kept),
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
"""

_KIT_README = """\
# medfed startup kit: site `{site}` of federation `{federation}`

| file | what it is |
| --- | --- |
| `ca.crt` | the federation's CA; the site trusts only a SuperLink whose certificate it signed |
| `site-auth.key` | this site's private authentication key: keep it secret (mode 0600) |
| `site-auth.pub` | its public key, registered at the SuperLink by the coordinator |
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
