"""``medfed provision``: CA, SuperLink certificate, startup kits; idempotent, keys 0600."""

from __future__ import annotations

import hashlib
import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from medfed.client.site_config import load_kit
from medfed.server.provision import ProvisionError, load_federation, provision
from medfed.server.signing import load_private_key, load_public_key
from tests.support.deploy_support import MEDFED

PRIVATE_FILES = ("ca/ca.key", "superlink/server.key", "coordinator/app-signing.key")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".key", ".crt", ".pub"}
    }


def test_federation_folder_has_ca_server_certificate_and_kits(tmp_path: Path) -> None:
    result = provision(tmp_path / "fed", sites=["st-mary", "charite"], superlink_address="fl.example.org:8443",
                       hosts=["10.0.0.5"])
    fed = result.federation
    assert [s.name for s in fed.sites] == ["st-mary", "charite"]
    assert [s.index for s in fed.sites] == [0, 1]

    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(fed.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")
    }

    for rel in PRIVATE_FILES:
        assert stat.S_IMODE((fed.root / rel).stat().st_mode) == 0o600, rel
    signing_key = load_private_key(fed.signing_key)
    assert isinstance(signing_key, ed25519.Ed25519PrivateKey)

    for site in fed.sites:
        kit = load_kit(site.kit)  # validates files and the key's 0600 mode
        assert kit.site_name == site.name and kit.site_index == site.index
        assert kit.superlink == "fl.example.org:8443"
        assert kit.ca_cert.read_bytes() == fed.ca_cert.read_bytes()
        assert stat.S_IMODE(kit.auth_private_key.stat().st_mode) == 0o600
        private = load_ssh_private_key(kit.auth_private_key.read_bytes(), password=None)
        public = load_ssh_public_key(kit.auth_public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        # The kit carries only the coordinator's public signing key, never the private one.
        assert load_public_key(kit.signing_public_key).public_bytes_raw() == signing_key.public_key().public_bytes_raw()
        assert not list(site.kit.glob("*signing.key")) and not (site.kit / "ca.key").exists()
        for name in ("site.toml", "README.md"):
            assert (site.kit / name).is_file()
    # Each site has its own key.
    keys = {s.public_key.read_bytes() for s in fed.sites}
    assert len(keys) == 2
    assert load_federation(fed.root).sites == fed.sites


def test_second_provision_without_force_keeps_every_key(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    provision(root, sites=["a", "b"], superlink_address="127.0.0.1:9000")
    before = _digests(root)
    mtimes = {rel: (root / rel).stat().st_mtime_ns for rel in before}

    again = provision(root, sites=["a", "b", "c"], superlink_address="127.0.0.1:9000")
    after = _digests(root)
    for rel, digest in before.items():
        assert after[rel] == digest, f"{rel} changed"
        if rel.endswith(".key"):
            assert (root / rel).stat().st_mtime_ns == mtimes[rel], f"{rel} was rewritten"
    assert {"sites/c/site-auth.key", "sites/c/site-auth.pub"} <= set(after) - set(before)
    kept = {str(p.relative_to(root)) for p in again.kept}
    assert {"ca/ca.key", "superlink/server.key", "coordinator/app-signing.key", "sites/a/site-auth.key"} <= kept
    assert [s.name for s in again.federation.sites] == ["a", "b", "c"]


def test_force_replaces_keys(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    provision(root, sites=["a"], superlink_address="127.0.0.1:9000")
    before = _digests(root)
    provision(root, sites=["a"], superlink_address="127.0.0.1:9000", force=True)
    after = _digests(root)
    for rel in ("ca/ca.key", "superlink/server.key", "coordinator/app-signing.key", "sites/a/site-auth.key"):
        assert after[rel] != before[rel], rel
        assert stat.S_IMODE((root / rel).stat().st_mode) == 0o600


def test_changed_address_or_hosts_need_force(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    provision(root, sites=["a"], superlink_address="127.0.0.1:9000")
    with pytest.raises(ProvisionError, match="--force"):
        provision(root, sites=["a"], superlink_address="10.1.1.1:9000")
    with pytest.raises(ProvisionError, match="does not cover host"):
        provision(root, sites=["a"], superlink_address="127.0.0.1:9000", hosts=["fl.example.org"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sites": ["ok", "bad name"]}, "site name 'bad name' is invalid"),
        ({"sites": ["a", "a"]}, "given twice"),
        ({"sites": ["a"], "superlink_address": "no-port"}, "write HOST:PORT"),
        ({"sites": []}, "at least one"),
    ],
)
def test_invalid_input_is_rejected_with_a_clear_message(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ProvisionError, match=match):
        provision(tmp_path / "fed", **kwargs)


def test_cli_second_run_without_force_does_not_touch_keys(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    args = [MEDFED, "provision", str(root), "--site", "a", "--address", "127.0.0.1:9000"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    before = _digests(root)
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert '"sites/a/site-auth.key"' in second.stdout.split('"kept"')[1]
    assert _digests(root) == before
