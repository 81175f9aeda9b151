"""Which code a site runs: the signed bundle's, not the site's installed copy of medfed.

``medfed-clientapp`` imports ``medfed.client.deploy`` (and with it ``medfed``) from the site's
installed package before any bundle exists. These tests run, in a fresh Python process, the
steps of Flower's ``run_clientapp`` between pulling a task and handling its message (install the
FAB, load the ClientApp) with medfed's verifier installed, on a real bundle staged by
``medfed run``'s own code (``medfed/`` package folder inside) whose ``client_app.py`` carries a
mark the installed package does not have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import medfed.server.deploy as server_deploy
from medfed.server.signing import SIGNATURE_KEY, generate_signing_key, write_signing_key
from medfed.shared.config import RunConfig

# The child process: the SuperNode's runtime API is replaced by the task built here; everything
# after the pull is Flower's and medfed's real code, in the order run_clientapp calls it.
CHILD = r'''
import json, sys
from pathlib import Path
from types import SimpleNamespace

from flwr.common.config import get_fab_config, get_metadata_from_config
from flwr.supernode.runtime import run_clientapp as runtime

fab_path, config_path, public_key, mode = sys.argv[1:5]
fab = Path(fab_path).read_bytes()
fab_id, fab_version = get_metadata_from_config(get_fab_config(fab))

import medfed.client.deploy as site
from medfed.server.signing import fab_hash

task = (
    "message",
    SimpleNamespace(run_config=json.loads(Path(config_path).read_text())),
    SimpleNamespace(run_id=7, fab_id=fab_id, fab_version=fab_version),
    SimpleNamespace(hash_str=fab_hash(fab), content=fab),
)
runtime.pull_task_input = lambda client: task
installed = {"medfed": sys.modules["medfed"].__file__, "medfed.client.deploy": site.__file__}
site.install_fab_verifier(public_key)

message, context, run, pulled = runtime.pull_task_input(None)
runtime.install_from_fab(pulled.content, skip_prompt=True)
if mode == "stale":  # what _forget_modules prevents: the installed copy imported before load_app
    import medfed.client.client_app  # noqa: F401
load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
try:
    load(run.fab_id, run.fab_version, pulled.hash_str)
    outcome = "loaded"
except site.AppRejected as err:
    outcome = f"rejected: {err}"
module = sys.modules["medfed.client.client_app"]
print("RESULT " + json.dumps({
    "outcome": outcome,
    "installed": installed,
    "app_dir": str(runtime.get_project_dir(run.fab_id, run.fab_version, pulled.hash_str)),
    "client_app": module.__file__,
    "mark": getattr(module, "BUNDLE_MARK", None),
    "medfed": {name: getattr(m, "__file__", None) for name, m in sys.modules.items()
               if name == "medfed" or name.startswith("medfed.")},
}))
'''


@pytest.fixture(scope="module")
def marked_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A signed bundle staged by ``build_signed_app`` whose ``client_app.py`` carries a mark."""
    root = tmp_path_factory.mktemp("bundle")
    key = generate_signing_key()
    write_signing_key(key, private_path=root / "app-signing.key", public_path=root / "app-signing.pub")
    mark = uuid.uuid4().hex
    real_stage = server_deploy.stage_app

    def stage_marked(cfg: RunConfig, dest: Path) -> Path:
        app = real_stage(cfg, dest)
        client_app = app / "medfed" / "client" / "client_app.py"
        client_app.write_text(client_app.read_text() + f"\nBUNDLE_MARK = {mark!r}\n")
        return app

    cfg = RunConfig.from_mapping({"dataset": "deployment", "image-size": 16, "model": "simplecnn"})
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(server_deploy, "stage_app", stage_marked)
        signed = server_deploy.build_signed_app(cfg, signing_key=root / "app-signing.key", workdir=root / "work")
    finally:
        mp.undo()
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(signed.app_dir)  # Flower's builder is reproducible: the signed bytes
    (root / "app.fab").write_bytes(fab)
    (root / "run-config.json").write_text(json.dumps({**signed.run_config, SIGNATURE_KEY: signed.signature}))
    return {"root": root, "mark": mark}


def _run_child(bundle: dict[str, object], tmp_path: Path, mode: str) -> dict[str, object]:
    root = Path(str(bundle["root"]))
    (tmp_path / "cwd").mkdir()  # an empty working directory: no medfed source on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FLWR_HOME=str(tmp_path / "flwr-home"), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root / "app.fab"), str(root / "run-config.json"),
         str(root / "app-signing.pub"), mode],
        cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return {**json.loads(lines[-1][len("RESULT "):]), "stderr": proc.stderr}


def test_the_clientapp_runs_the_signed_bundles_code(marked_bundle, tmp_path: Path) -> None:
    result = _run_child(marked_bundle, tmp_path, "verified")
    app_dir = Path(str(result["app_dir"])).resolve()
    assert app_dir.is_relative_to((tmp_path / "flwr-home" / "apps").resolve())
    # Before the bundle: medfed and its verifier came from the site's installed package.
    for name, origin in dict(result["installed"]).items():
        assert not Path(origin).resolve().is_relative_to(app_dir), name
    assert result["outcome"] == "loaded"
    assert Path(str(result["client_app"])).resolve() == app_dir / "medfed" / "client" / "client_app.py"
    assert result["mark"] == marked_bundle["mark"]
    loaded = dict(result["medfed"])
    assert {"medfed", "medfed.client.client_app", "medfed.shared.config"} <= set(loaded)
    outside = {name: origin for name, origin in loaded.items()
               if origin is not None and not Path(origin).resolve().is_relative_to(app_dir)}
    assert outside == {}, "medfed modules loaded from outside the verified bundle"


def test_a_clientapp_module_from_the_installed_package_is_refused(marked_bundle, tmp_path: Path) -> None:
    result = _run_child(marked_bundle, tmp_path, "stale")
    outcome = str(result["outcome"])  # Flower sends this text to the server: no site paths in it
    assert outcome.startswith("rejected: module medfed") and "not imported from the verified app bundle" in outcome
    assert "/" not in outcome
    assert result["mark"] is None  # the installed copy, which the check caught
    refused = [line for line in str(result["stderr"]).splitlines() if "REFUSED app bundle: module medfed" in line]
    assert refused and "was imported from" in refused[0]  # the site's log names the file
