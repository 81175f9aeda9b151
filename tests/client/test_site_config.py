"""``site.toml`` and startup-kit validation; the SuperNode node config; SuperNode log diagnoses."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from medfed.client.deploy import diagnose_supernode_line, supernode_command
from medfed.client.site_config import SiteConfigError, load_kit, load_site_config, node_config_arg
from medfed.server.provision import provision


@pytest.fixture
def kit_dir(tmp_path: Path) -> Path:
    fed = provision(tmp_path / "fed", sites=["st-mary"], superlink_address="127.0.0.1:9000").federation
    return fed.sites[0].kit


def _site(tmp_path: Path, body: str) -> Path:
    (tmp_path / "data dir").mkdir(exist_ok=True)
    (tmp_path / "data dir" / "datalist.json").write_text('{"training": []}')
    path = tmp_path / "site.toml"
    path.write_text(body)
    return path


def test_template_from_the_kit_validates_once_the_datalist_is_set(kit_dir: Path, tmp_path: Path) -> None:
    template = (kit_dir / "site.toml").read_text()
    with pytest.raises(SiteConfigError, match="does not exist"):
        load_site_config(kit_dir / "site.toml")
    path = _site(tmp_path, template.replace("/path/to/datalist.json", "data dir/datalist.json"))
    site = load_site_config(path)
    assert site.site_name == "st-mary" and site.datalist == tmp_path / "data dir" / "datalist.json"
    assert site.device == "auto" and site.dp_budget_epsilon == 8.0 and site.runtime_port == 9094
    assert site.state_path(load_kit(kit_dir)) == kit_dir / "state"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('site-name = "a"\ndatalist = "data dir/datalist.json"\ndatalst = 1\n', "unknown key 'datalst'"),
        ('datalist = "data dir/datalist.json"\n', "'site-name' is missing"),
        ('site-name = "a"\ndatalist = "nope.json"\n', "does not exist"),
        ('site-name = "a"\ndatalist = "data dir/datalist.json"\ndevice = "gpu"\n', "device = 'gpu' is invalid"),
        ('site-name = "a"\ndatalist = "data dir/datalist.json"\ndp-budget-epsilon = 0\n', "must be > 0"),
        ('site-name = "a"\ndatalist = "data dir/datalist.json"\nruntime-port = 80\n', "1024-65535"),
        ('site-name = "a"\ndatalist = "data dir/datalist.json"\nruntime-port = "x"\n', "expected an integer port"),
        ('site-name = "a"\ndatalist = [1]\n', "expected the path of a datalist"),
        ("site-name = \n", "not valid TOML"),
    ],
)
def test_invalid_site_config_names_file_key_and_fix(tmp_path: Path, body: str, match: str) -> None:
    path = _site(tmp_path, body)
    with pytest.raises(SiteConfigError, match=match) as err:
        load_site_config(path)
    assert str(path) in str(err.value)


def test_node_config_round_trips_through_flowers_parser(kit_dir: Path, tmp_path: Path) -> None:
    path = _site(tmp_path, 'site-name = "st mary"\ndatalist = "data dir/datalist.json"\ndevice = "cpu"\ndp-budget-epsilon = 3\n')
    site, kit = load_site_config(path), load_kit(kit_dir)
    parsed = parse_config_args([node_config_arg(kit, site)])
    assert parsed == {
        "site-name": "st mary",
        "site-index": 0,
        "datalist": str(tmp_path / "data dir" / "datalist.json"),
        "device": "cpu",
        "dp-budget-epsilon": 3.0,
        "require-dp": False,
        "dp-max-delta": 1e-5,
        "dp-min-noise-multiplier": 0.0,
        "dp-require-secure-noise": True,
        "ledger-dir": str(kit.root / "state" / "ledgers"),
    }
    command = supernode_command(kit, site)
    assert command[command.index("--isolation") + 1] == "process"
    assert command[command.index("--root-certificates") + 1] == str(kit.ca_cert)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--insecure" not in command and "--allow-runtime-dependency-installation" not in command


def test_kit_with_a_readable_private_key_or_missing_file_is_rejected(kit_dir: Path) -> None:
    key = kit_dir / "site-auth.key"
    os.chmod(key, 0o644)
    with pytest.raises(SiteConfigError, match="chmod 600"):
        load_kit(kit_dir)
    os.chmod(key, 0o600)
    (kit_dir / "app-signing.pub").unlink()
    with pytest.raises(SiteConfigError, match="app-signing public key"):
        load_kit(kit_dir)
    with pytest.raises(SiteConfigError, match="not a startup kit"):
        load_kit(kit_dir.parent)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer", "not signed by this kit's CA"),
        ("[code: 2004] Failed to activate SuperNode.", "does not know this site's key"),
        ("WARNING :   Connection attempt failed, retrying in 0.5 seconds", None),
        ("INFO :      SuperNode ID: 123", None),
    ],
)
def test_supernode_log_lines_get_clear_diagnoses(line: str, expected: str | None) -> None:
    diagnosis = diagnose_supernode_line(line)
    if expected is None:
        assert diagnosis is None
    else:
        assert diagnosis is not None and expected in diagnosis


def test_site_start_with_a_bad_config_exits_with_a_clear_error(kit_dir: Path, tmp_path: Path) -> None:
    from tests.support.deploy_support import MEDFED

    path = _site(tmp_path, 'site-name = "a"\ndatalist = "missing.json"\n')
    proc = subprocess.run([MEDFED, "site", "start", "--kit", str(kit_dir), "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "missing.json" in proc.stderr and "does not exist" in proc.stderr


# --------------------------------------------------------------------------- the site's own key
def test_keygen_writes_a_private_pair_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from medfed.client.site_keys import KeygenError, keygen

    key = keygen(tmp_path / "keys", comment="st-mary")
    assert os.stat(key.private_key).st_mode & 0o777 == 0o600
    private = load_ssh_private_key(key.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert key.public_key.read_text().endswith(" st-mary\n") and key.fingerprint.startswith("SHA256:")
    if shutil.which("ssh-keygen"):  # the fingerprint the coordinator reads back is OpenSSH's
        ssh = subprocess.run(["ssh-keygen", "-lf", str(key.public_key)], capture_output=True, text=True, check=True)
        assert key.fingerprint in ssh.stdout
    before = key.private_key.read_bytes()
    with pytest.raises(KeygenError, match="already has a key"):
        keygen(tmp_path / "keys")
    assert key.private_key.read_bytes() == before
    again = keygen(tmp_path / "keys", overwrite=True)
    assert again.private_key.read_bytes() != before
    assert [p.read_bytes() for p in (tmp_path / "keys").glob("site-auth.key.*.old")] == [before]


def test_keygen_cli_prints_the_public_key_and_fingerprint(tmp_path: Path) -> None:
    from tests.support.deploy_support import MEDFED

    out = subprocess.run([MEDFED, "site", "keygen", "--out", str(tmp_path / "k")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"public key:  {tmp_path / 'k' / 'site-auth.pub'}" in out.stdout and "fingerprint: SHA256:" in out.stdout
    again = subprocess.run([MEDFED, "site", "keygen", "--out", str(tmp_path / "k")], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.fixture
def own_key_kit(tmp_path: Path) -> tuple[Path, Path]:
    from medfed.client.site_keys import keygen

    key = keygen(tmp_path / "keys")
    fed = provision(tmp_path / "fed", sites=[], superlink_address="127.0.0.1:9000",
                    site_public_keys={"st-mary": key.public_key}).federation
    return fed.sites[0].kit, key.private_key


def test_a_kit_enrolled_with_the_sites_own_key_needs_it_from_site_toml(own_key_kit: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    kit_dir, private = own_key_kit
    assert not (kit_dir / "site-auth.key").exists()
    with pytest.raises(SiteConfigError, match="Set auth-private-key in site.toml"):
        load_kit(kit_dir)
    path = _site(tmp_path, f'site-name = "st-mary"\ndatalist = "data dir/datalist.json"\nauth-private-key = "{private}"\n')
    site = load_site_config(path)
    kit = load_kit(kit_dir, auth_private_key=site.auth_key_path())
    assert kit.auth_private_key == private
    command = supernode_command(kit, site)
    assert command[command.index("--auth-supernode-private-key") + 1] == str(private)
    relative = _site(tmp_path, 'site-name = "st-mary"\ndatalist = "data dir/datalist.json"\nauth-private-key = "keys/site-auth.key"\n')
    assert load_site_config(relative).auth_key_path() == private  # relative to site.toml's folder


def test_a_site_key_that_is_not_the_enrolled_one_or_readable_by_others_is_rejected(
    own_key_kit: tuple[Path, Path], tmp_path: Path
) -> None:
    from medfed.client.site_keys import keygen

    kit_dir, private = own_key_kit
    other = keygen(tmp_path / "other").private_key
    with pytest.raises(SiteConfigError, match="does not belong to .*site-auth.pub"):
        load_kit(kit_dir, auth_private_key=other)
    os.chmod(private, 0o640)
    with pytest.raises(SiteConfigError, match=f"chmod 600 {private}"):
        load_kit(kit_dir, auth_private_key=private)
    with pytest.raises(SiteConfigError, match="is missing"):
        load_kit(kit_dir, auth_private_key=tmp_path / "nowhere.key")
