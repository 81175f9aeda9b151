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
from medfed.server.provision import ProvisionError, describe, load_federation, provision
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


# --------------------------------------------------------------------------- site-owned keys, --force
def _site_key(folder: Path) -> Path:
    from medfed.client.site_keys import keygen

    return keygen(folder).public_key


def test_site_public_key_enrolls_a_site_without_its_private_key(tmp_path: Path) -> None:
    from medfed.shared.auth_keys import fingerprint, read_public_key_text

    pub = _site_key(tmp_path / "charite-keys")
    fed = provision(tmp_path / "fed", sites=["st-mary"], superlink_address="127.0.0.1:9000",
                    site_public_keys={"charite": pub}).federation
    charite = fed.site("charite")
    assert charite.key_origin == "site" and fed.site("st-mary").key_origin == "coordinator"
    assert charite.key == read_public_key_text(pub) and charite.fingerprint == fingerprint(charite.key)
    assert not (charite.kit / "site-auth.key").exists()
    assert read_public_key_text(charite.public_key) == charite.key
    assert charite.fingerprint in (charite.kit / "README.md").read_text()
    assert load_federation(fed.root).sites == fed.sites  # name, index and key are in federation.toml
    manifest = (fed.root / "federation.toml").read_text()
    assert charite.key in manifest and fed.site("st-mary").key in manifest


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not a key\n", "is not an OpenSSH public key"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB2Yq9hSOPqZwdGJpKG7w2gsbeaIEawB9fWGTm+6jW+J x\n", "not an ECDSA key"),
    ],
)
def test_a_bad_site_public_key_is_refused_naming_the_flag(tmp_path: Path, content: str, match: str) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text(content)
    with pytest.raises(ProvisionError, match=rf"--site-public-key charite=.*bad.pub: .*{match}"):
        provision(tmp_path / "fed", sites=[], superlink_address="127.0.0.1:9000", site_public_keys={"charite": bad})
    assert not (tmp_path / "fed").exists()


def test_a_new_key_for_an_enrolled_site_needs_force(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    provision(root, sites=["a"], superlink_address="127.0.0.1:9000", site_public_keys={"b": _site_key(tmp_path / "b1")})
    with pytest.raises(ProvisionError, match="site 'b' is enrolled with another key .*--force"):
        provision(root, sites=["a"], superlink_address="127.0.0.1:9000", site_public_keys={"b": _site_key(tmp_path / "b2")})
    with pytest.raises(ProvisionError, match="site 'a' is enrolled with another key"):  # coordinator key -> own key
        provision(root, sites=[], superlink_address="127.0.0.1:9000", site_public_keys={"a": _site_key(tmp_path / "a2")})


def test_force_backs_up_what_it_replaces_and_lists_dropped_and_rekeyed_sites(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    own = _site_key(tmp_path / "c-keys")
    provision(root, sites=["a", "b"], superlink_address="127.0.0.1:9000", site_public_keys={"c": own})
    before = {rel: (root / rel).read_bytes() for rel in _digests(root)}
    result = provision(root, sites=["a"], superlink_address="127.0.0.1:9000", force=True, site_public_keys={"c": own})
    assert result.dropped == ["b"] and result.rekeyed == ["a"]  # c keeps its own key; b is not listed: dropped
    assert [s.name for s in result.federation.sites] == ["a", "c"] and not (root / "sites" / "b").exists()
    backup = result.backup
    assert backup is not None and backup.parent == root / "backups"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700 and stat.S_IMODE(backup.parent.stat().st_mode) == 0o700
    for rel, data in before.items():  # every replaced or dropped key and certificate, as it was
        if rel.startswith("sites/c/"):
            continue  # unchanged: c's public key and the CA copy are rewritten, the rest kept
        assert (backup / rel).read_bytes() == data, rel
    assert stat.S_IMODE((backup / "ca" / "ca.key").stat().st_mode) == 0o600
    assert result.federation.site("c").key == load_federation(root).site("c").key
    summary = describe(result)
    assert summary["dropped"] == ["b"] and summary["rekeyed"] == ["a"] and summary["backup"] == str(backup)
    assert any("old private keys" in w for w in result.warnings)


def test_the_ca_key_can_live_outside_the_federation_folder(tmp_path: Path) -> None:
    inside = provision(tmp_path / "fed", sites=["a"], superlink_address="127.0.0.1:9000")
    assert any("CA private key" in w and "move it offline" in w for w in inside.warnings)
    offline = tmp_path / "usb" / "ca.key"
    outside = provision(tmp_path / "fed2", sites=["a"], superlink_address="127.0.0.1:9000", ca_key=offline)
    assert not any("CA private key" in w for w in outside.warnings)
    assert offline.is_file() and not (tmp_path / "fed2" / "ca" / "ca.key").exists()
    assert stat.S_IMODE(offline.stat().st_mode) == 0o600
    fed2 = tmp_path / "fed2"
    (fed2 / "superlink" / "server.crt").unlink()  # reissuing the certificate needs the CA key
    with pytest.raises(ProvisionError, match="the CA key .*fed2/ca/ca.key is not here.*--ca-key FILE"):
        provision(fed2, sites=["a"], superlink_address="127.0.0.1:9000")
    again = provision(fed2, sites=["a"], superlink_address="127.0.0.1:9000", ca_key=offline)
    cert = x509.load_pem_x509_certificate((fed2 / "superlink" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(again.federation.ca_cert.read_bytes()))


def test_cli_site_public_key_and_force_report(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    pub = _site_key(tmp_path / "k")
    first = subprocess.run([MEDFED, "provision", str(root), "--site", "a", "--site-public-key", f"b={pub}",
                            "--address", "127.0.0.1:9000"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "CA private key" in first.stderr
    bad = subprocess.run([MEDFED, "provision", str(root), "--site-public-key", "b", "--address", "127.0.0.1:9000"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "write NAME=FILE" in bad.stderr
    forced = subprocess.run([MEDFED, "provision", str(root), "--site-public-key", f"b={pub}", "--force",
                             "--address", "127.0.0.1:9000"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert "dropped: site a" in forced.stderr and "backups" in forced.stdout
