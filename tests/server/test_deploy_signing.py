"""App-bundle signing (coordinator) and verification (site), without starting Flower processes."""

from __future__ import annotations

import base64
import logging
import tomllib
import zipfile
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.common.config import get_fused_config_from_fab
from flwr.supercore.run import Run

import medfed.client.deploy as site_deploy
from medfed.server.deploy import build_signed_app
from medfed.server.provision import provision
from medfed.server.signing import generate_signing_key, sign_app
from medfed.shared.app_signature import SIGNATURE_KEY, AppSignatureError, fab_hash, verify_app
from medfed.shared.config import RunConfig

CONFIG = {"num-server-rounds": 2, "dp": True, "learning-rate": 0.05, "model": "simplecnn"}


def _fab(files: dict[str, bytes]) -> bytes:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _signed(fab: bytes, config: dict, key=None) -> dict:
    key = key or generate_signing_key()
    return {**config, SIGNATURE_KEY: sign_app(fab, config, key)}, key


def test_valid_signature_verifies_and_returns_the_hash() -> None:
    fab = _fab({"pyproject.toml": b"x", "client/__init__.py": b""})
    config, key = _signed(fab, CONFIG)
    assert verify_app(fab, config, claimed_hash=fab_hash(fab), public_key=key.public_key()) == fab_hash(fab)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda fab, cfg: (fab + b"\0", cfg), "does not match app bundle"),
        (lambda fab, cfg: (fab, {**cfg, "dp": False}), "does not match app bundle"),
        (lambda fab, cfg: (fab, {**cfg, "num-server-rounds": 3}), "does not match app bundle"),
        (lambda fab, cfg: (fab, {**cfg, "extra-key": 1}), "does not match app bundle"),
        (lambda fab, cfg: (fab, {**cfg, SIGNATURE_KEY: ""}), "unsigned bundle"),
        (lambda fab, cfg: (fab, {k: v for k, v in cfg.items() if k != SIGNATURE_KEY}), "unsigned bundle"),
        (lambda fab, cfg: (fab, {**cfg, SIGNATURE_KEY: "not base64!"}), "not valid base64"),
    ],
)
def test_altered_bundle_or_config_or_missing_signature_is_refused(mutate, match: str) -> None:
    fab = _fab({"pyproject.toml": b"x"})
    config, key = _signed(fab, CONFIG)
    fab2, config2 = mutate(fab, config)
    with pytest.raises(AppSignatureError, match=match):
        verify_app(fab2, config2, claimed_hash="", public_key=key.public_key())


def test_signature_of_another_key_is_refused() -> None:
    fab = _fab({"pyproject.toml": b"x"})
    config, _ = _signed(fab, CONFIG)
    other = generate_signing_key()
    with pytest.raises(AppSignatureError, match="another key"):
        verify_app(fab, config, claimed_hash=fab_hash(fab), public_key=other.public_key())


def test_bytes_that_do_not_match_the_announced_hash_are_refused() -> None:
    fab = _fab({"pyproject.toml": b"x"})
    config, key = _signed(fab, CONFIG)
    with pytest.raises(AppSignatureError, match="altered in transit"):
        verify_app(fab, config, claimed_hash="0" * 64, public_key=key.public_key())


def test_signed_app_verifies_against_the_run_config_flower_gives_the_sites(tmp_path: Path) -> None:
    """Stage, build with Flower's builder, sign; then fuse the config as a SuperNode does."""
    fed = provision(tmp_path / "fed", sites=["a"], superlink_address="127.0.0.1:9000").federation
    cfg = RunConfig(dataset="deployment", image_size=16, model="simplecnn", num_sites=1, num_server_rounds=2)
    signed = build_signed_app(cfg, signing_key=fed.signing_key, workdir=tmp_path / "work")

    pyproject = tomllib.loads((signed.app_dir / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == {**cfg.to_run_config(), SIGNATURE_KEY: ""}
    fab = _build(signed.app_dir)
    assert fab_hash(fab) == signed.fab_sha256  # Flower's build is reproducible: `flwr run` sends these bytes
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert {"medfed/__init__.py", "medfed/client/client_app.py", "medfed/server/server_app.py"} <= set(names)
    assert sorted(n for n in names if not n.startswith("medfed/")) == [".info/CONTENT", "pyproject.toml"]  # one package
    assert not [n for n in names if n.startswith(("medfed/tests/", "medfed/simulations/"))]

    overrides = tomllib.loads(signed.overrides_file.read_text())
    assert list(overrides) == [SIGNATURE_KEY]
    run = Run.create_empty(run_id=1)
    run.override_config = overrides
    site_config = get_fused_config_from_fab(fab, run)
    key = site_deploy_public_key(fed)
    verify_app(fab, site_config, claimed_hash=signed.fab_sha256, public_key=key)
    assert RunConfig.from_mapping(site_config).replace(app_signature="") == cfg.replace(app_signature="")

    # The same bundle with one setting overridden at submission no longer verifies.
    run.override_config = {**overrides, "dp": True}
    with pytest.raises(AppSignatureError):
        verify_app(fab, get_fused_config_from_fab(fab, run), claimed_hash="", public_key=key)


def _build(app_dir: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def site_deploy_public_key(fed):
    from medfed.shared.app_signature import load_public_key

    return load_public_key(fed.sites[0].kit / "app-signing.pub")


# ------------------------------------------------------------------ the site's ClientApp hook
@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch):
    """Flower's run_clientapp module with fake pull/install (restored after the test)."""
    from flwr.supernode.runtime import run_clientapp as runtime

    state = SimpleNamespace(installed=[], forgotten=[], task=None)
    monkeypatch.setattr(runtime, "pull_task_input", lambda client: state.task)
    monkeypatch.setattr(runtime, "install_from_fab", lambda content, **kw: state.installed.append(content))
    monkeypatch.setattr(runtime, "get_load_client_app_fn", runtime.get_load_client_app_fn)  # wrapped by the hook
    monkeypatch.setattr(site_deploy, "_forget_modules", lambda packages: state.forgotten.append(packages))
    return runtime, state


def _task(fab: bytes, config: dict, run_id: int = 7):
    context = SimpleNamespace(run_config=config)
    return ("message", context, SimpleNamespace(run_id=run_id), SimpleNamespace(hash_str=fab_hash(fab), content=fab))


def _write_public(tmp_path: Path, key) -> Path:
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / "app-signing.pub"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_clientapp_hook_installs_only_signed_bundles(tmp_path: Path, fake_runtime, caplog) -> None:
    runtime, state = fake_runtime
    fab = _fab({"pyproject.toml": b"x", "medfed/__init__.py": b"", "medfed/client/__init__.py": b""})
    config, key = _signed(fab, CONFIG)
    site_deploy.install_fab_verifier(_write_public(tmp_path, key))

    state.task = _task(fab, config)
    runtime.pull_task_input(None)
    with caplog.at_level(logging.INFO, logger="medfed.client.deploy"):
        runtime.install_from_fab(fab, skip_prompt=True)
    assert state.installed == [fab]
    assert state.forgotten == [{"medfed"}]  # the bundle's package, loaded fresh from it
    assert "verified app bundle" in caplog.text


@pytest.mark.parametrize("case", ["unsigned", "altered", "other-key", "config-changed"])
def test_clientapp_hook_refuses_with_a_clear_log_line(tmp_path: Path, fake_runtime, caplog, case: str) -> None:
    runtime, state = fake_runtime
    fab = _fab({"pyproject.toml": b"x", "client/__init__.py": b""})
    config, key = _signed(fab, CONFIG)
    if case == "unsigned":
        config = {**config, SIGNATURE_KEY: ""}
    elif case == "altered":
        fab = _fab({"pyproject.toml": b"x", "client/__init__.py": b"import os  # injected"})
    elif case == "other-key":
        config, _ = _signed(fab, CONFIG)
    else:
        config = {**config, "dp": False}
    site_deploy.install_fab_verifier(_write_public(tmp_path, key))
    state.task = _task(fab, config, run_id=42)
    runtime.pull_task_input(None)
    with caplog.at_level(logging.INFO, logger="medfed.client.deploy"), pytest.raises(site_deploy.AppRejected):
        runtime.install_from_fab(fab, skip_prompt=True)
    assert state.installed == [] and state.forgotten == []
    refused = [r for r in caplog.records if "REFUSED app bundle" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert "run 42" in refused[0].getMessage() and "not installed" in refused[0].getMessage()


def test_signature_is_base64_of_64_bytes() -> None:
    fab = _fab({"a": b"b"})
    config, _ = _signed(fab, CONFIG)
    assert len(base64.b64decode(config[SIGNATURE_KEY])) == 64


# ------------------------------------------------------------------ the SuperLink's API guard
@pytest.mark.parametrize(
    ("path", "client", "host", "allowed"),
    [
        ("/v1/control/start-run", "127.0.0.1", "0.0.0.0", True),
        ("/v1/control/start-run", "::1", "0.0.0.0", True),
        ("/v1/control/register-node", "10.1.2.3", "0.0.0.0", False),
        ("/v1/runtime/acquire-task", "10.1.2.3", "0.0.0.0", False),
        ("/v1/runtime/acquire-task", "10.0.0.5", "10.0.0.5", True),  # the SuperLink's own address
        ("/v1/control/list-runs", "192.168.7.9", "0.0.0.0", True),  # --control-allow 192.168.7.0/24
        ("/v1/fleet/activate-node", "10.1.2.3", "0.0.0.0", True),  # sites: Fleet API only
    ],
)
def test_control_and_runtime_apis_answer_only_the_coordinator(path, client, host, allowed, caplog) -> None:
    import asyncio

    from medfed.server.deploy import LocalAPIGuard, allowed_networks

    reached: list[str] = []
    sent: list[dict] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    guard = LocalAPIGuard(app, allowed_networks(host, ["192.168.7.0/24"]))
    scope = {"type": "http", "path": path, "client": (client, 50000)}
    with caplog.at_level(logging.WARNING, logger="medfed.server.deploy"):
        asyncio.run(guard(scope, None, send))
    if allowed:
        assert reached == [path] and not sent
    else:
        assert reached == [] and sent[0]["status"] == 403
        assert f"refused {path} from {client}" in caplog.text


def test_control_allow_must_be_a_network() -> None:
    from medfed.server.deploy import DeployError, allowed_networks

    with pytest.raises(DeployError, match="not an IP network"):
        allowed_networks("0.0.0.0", ["hospital-vpn"])
