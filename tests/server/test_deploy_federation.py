"""A real federation on Flower's deployment engine: SuperLink + 3 SuperNodes as subprocesses.

Freshly provisioned (CA, TLS, SuperNode authentication), each site with its own NIfTI datalist,
on 127.0.0.1 with free ports. The module fixture starts everything once and stops every
process (process groups, SIGTERM then SIGKILL) in ``finally``, also when a test fails.

These tests run minutes on 2 shared cores (Flower starts one ClientApp process per message,
each importing torch and MONAI), so they are ``slow``; ``test_deploy_smoke.py`` is the small
default-suite variant.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
from io import StringIO
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.client.deploy import watch_supernode
from medfed.server.deploy import build_signed_app, flwr_env, run_status, wait_for_run
from medfed.server.provision import provision
from medfed.server.run_dir import read_metrics
from medfed.shared.config import RunConfig
from tests.support.deploy_support import (
    FLWR,
    MEDFED,
    RUN,
    LiveFederation,
    free_port,
    write_site_toml,
)

pytestmark = pytest.mark.slow

SITES = ("site0", "site1", "site2")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("federation")
    fed = provision(root / "fed", sites=list(SITES), superlink_address=f"127.0.0.1:{free_port()}").federation
    federation = LiveFederation(root=root, fed=fed)
    try:
        federation.start_server()
        for index, name in enumerate(SITES):
            federation.start_site(name, index)
        for name, proc in federation.sites.items():
            assert proc.wait_for("connected to the SuperLink", 90), f"{name}:\n{proc.text()}"
        yield federation
    finally:
        federation.stop()


def _only_run_dir(base: Path) -> Path:
    runs = [p for p in base.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _flwr_run(live: LiveFederation, app_dir: Path, *extra: str) -> int:
    proc = subprocess.run(
        [FLWR, "run", str(app_dir), live.fed.connection_name, "--format", "json", *extra],
        capture_output=True, text=True, env=flwr_env(live.fed), timeout=300,
    )
    payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert payload["success"], proc.stdout + proc.stderr
    return int(payload["run-id"])


# ------------------------------------------------------------------ acceptance 1
def test_three_sites_two_rounds_with_tls_and_node_authentication(live: LiveFederation) -> None:
    config = live.run_config("e2e", **{"num-server-rounds": 2})
    start = time.perf_counter()
    proc = subprocess.run([MEDFED, "run", "-f", str(live.fed.root), "--config", str(config), "--timeout", "900"],
                          capture_output=True, text=True, timeout=1000)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished:completed" in proc.stdout
    print(f"\n3 sites x 2 rounds on the deployment engine: {seconds:.1f} s (medfed run, submit to finish)")

    run_dir = _only_run_dir(live.root / "runs" / "e2e")
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["fit_results"] == 3 and record["fit_failures"] == 0
        assert set(record["sites"]) == set(SITES)  # keyed by the enrolled site, not a reported index
        for site in record["sites"].values():
            assert site["fit"]["num_examples"] == 12 and "train-loss" in site["fit"]
            assert site["eval"]["num_examples"] == 4 and {"loss", "accuracy", "auc"} <= set(site["eval"])
    config_json = json.loads((run_dir / "config.json").read_text())
    assert config_json["config"]["dataset"] == "deployment"
    assert len(base64.b64decode(config_json["config"]["app-signature"])) == 64  # provenance of the run
    assert (run_dir / "checkpoints" / "final.pt").exists()

    hash_line = [line for line in proc.stdout.splitlines() if "app bundle" in line][0]
    fab_prefix = hash_line.split("app bundle ")[1][:12]
    for name, site in live.sites.items():
        assert f"verified app bundle {fab_prefix}" in site.text(), name
        installed = list((live.root / name / "state" / "apps").iterdir())
        assert any(fab_prefix[:8] in p.name for p in installed), installed
    assert "Uvicorn running on https://" in live.server.text()


# ------------------------------------------------------------------ issue 15: the site's privacy policy
def test_a_run_weaker_than_the_sites_policy_is_refused_by_every_site(live: LiveFederation) -> None:
    """dp-delta = 0.5, seeded noise and a ledger-dir of the coordinator's choosing, under SecAgg+:
    every site refuses before training, creates no folder, and the coordinator records why."""
    elsewhere = live.root / "coordinator-chosen-ledgers"
    config = live.run_config("weak", **{"num-server-rounds": 2, "dp": True, "dp-delta": 0.5,
                                        "dp-secure-noise": False, "ledger-dir": str(elsewhere)})
    proc = subprocess.run([MEDFED, "run", "-f", str(live.fed.root), "--config", str(config), "--timeout", "900"],
                          capture_output=True, text=True, timeout=1000)
    assert "finished" in proc.stdout, proc.stdout + proc.stderr
    run_dir = _only_run_dir(live.root / "runs" / "weak")
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1]  # stopped: no site trained
    assert set(records[0]["sites"]) == set(SITES)  # keyed by the enrolled site
    for site in records[0]["sites"].values():
        fit = site["fit"]
        assert fit["num_examples"] == 0 and fit["policy-refused"] == 1
        assert fit["policy-refused-dp-delta"] == 1 and fit["policy-refused-dp-secure-noise"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {k: v["keys"] for k, v in summary["policy_refused"].items()} == {
        name: ["dp-delta", "dp-secure-noise"] for name in SITES
    }
    assert not elsewhere.exists()
    for name, site in live.sites.items():
        text = site.text()
        assert "refuses training in round 1" in text and "dp-delta = 0.5" in text, f"{name}:\n{text[-3000:]}"
        assert not (live.root / name / "state" / "ledgers").exists()  # nothing charged


# ------------------------------------------------------------------ acceptance 2: bundles
def _assert_refused_everywhere(live: LiveFederation, run_id: int, run_dir_base: Path) -> None:
    assert wait_for_run(live.fed, run_id, timeout=600).startswith("finished")
    for name, site in live.sites.items():
        text = site.text()
        assert f"REFUSED app bundle of run {run_id}" in text, f"{name}:\n{text[-3000:]}"
    records = read_metrics(_only_run_dir(run_dir_base))
    assert records and all(r["fit_results"] == 0 and r["fit_failures"] == 3 for r in records)


def test_unsigned_bundle_is_refused_by_every_site(live: LiveFederation, tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**RUN, "dataset": "deployment", "num-sites": 3, "num-server-rounds": 1,
                                  "run-dir": str(live.root / "runs" / "unsigned")})
    signed = build_signed_app(cfg, signing_key=live.fed.signing_key, workdir=tmp_path)
    before = {name: set((live.root / name / "state" / "apps").iterdir()) for name in SITES}
    run_id = _flwr_run(live, signed.app_dir)  # plain `flwr run`: no signature
    _assert_refused_everywhere(live, run_id, live.root / "runs" / "unsigned")
    for name in SITES:  # nothing new installed at any site
        assert set((live.root / name / "state" / "apps").iterdir()) == before[name]


def test_altered_bundle_is_refused_by_every_site(live: LiveFederation, tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**RUN, "dataset": "deployment", "num-sites": 3, "num-server-rounds": 1,
                                  "run-dir": str(live.root / "runs" / "altered")})
    signed = build_signed_app(cfg, signing_key=live.fed.signing_key, workdir=tmp_path)
    target = signed.app_dir / "medfed" / "client" / "site_client.py"
    target.write_text(target.read_text() + "\n# changed after signing\n")
    run_id = _flwr_run(live, signed.app_dir, "--run-config", str(signed.overrides_file))
    _assert_refused_everywhere(live, run_id, live.root / "runs" / "altered")


# ------------------------------------------------------------------ acceptance 2: connections
def test_unregistered_site_key_cannot_join(live: LiveFederation, tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    shutil.copytree(live.fed.site("site0").kit, kit, ignore=shutil.ignore_patterns("state"))
    key = ec.generate_private_key(ec.SECP384R1())
    (kit / "site-auth.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    (kit / "site-auth.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    toml = write_site_toml(tmp_path / "site.toml", name="intruder", datalist=live.root / "site0" / "data" / "datalist.json",
                           runtime_port=free_port(), state_dir=tmp_path / "state")
    proc = subprocess.run([MEDFED, "site", "start", "--kit", str(kit), "--config", str(toml)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    assert "does not know this site's key" in proc.stderr
    assert "No SuperNode found with the given public key" in live.server.text()


def test_site_with_a_wrong_ca_cannot_connect(live: LiveFederation, tmp_path: Path) -> None:
    other = provision(tmp_path / "other", sites=["site0"], superlink_address=live.address).federation
    toml = write_site_toml(tmp_path / "site.toml", name="site0", datalist=live.root / "site0" / "data" / "datalist.json",
                           runtime_port=free_port(), state_dir=tmp_path / "state")
    proc = subprocess.run([MEDFED, "site", "start", "--kit", str(other.site("site0").kit), "--config", str(toml)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    assert "not signed by this kit's CA" in proc.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stdout


def test_plaintext_connections_are_refused(live: LiveFederation) -> None:
    host, port = live.address.rsplit(":", 1)
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://{host}:{port}/v1/fleet/activate-node", content=b"", timeout=5)
    # A SuperNode that dials without TLS never joins; medfed turns its retries into one message.
    supernode = subprocess.Popen(
        [str(Path(FLWR).parent / "flower-supernode"), "--superlink", live.address, "--insecure",
         "--port", str(free_port()), "--isolation", "process"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out = StringIO()
        message = watch_supernode(supernode, out=out, max_connect_attempts=3)
    finally:
        supernode.kill()
        supernode.wait(timeout=10)
    assert message is not None and "does not speak TLS" in message
    assert out.getvalue().count("Connection attempt failed") == 3
    assert "SuperNode ID" not in out.getvalue()


# ------------------------------------------------------------------ acceptance 3: restart
def test_superlink_restart_keeps_runs_and_the_federation_usable(live: LiveFederation) -> None:
    config = live.run_config("interrupted", **{"num-server-rounds": 4})
    submit = subprocess.run([MEDFED, "run", "-f", str(live.fed.root), "--config", str(config), "--no-wait"],
                            capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    run_id = int(submit.stdout.split("run ")[1].split()[0])
    deadline = time.monotonic() + 600
    metrics = None
    while time.monotonic() < deadline:
        base = live.root / "runs" / "interrupted"
        found = list(base.glob("*/metrics.jsonl")) if base.exists() else []
        if found and read_metrics(found[0]):
            metrics = found[0]
            break
        time.sleep(1)
    assert metrics is not None, "round 1 never finished"

    # Kill the SuperLink (and the ServerApp it runs) hard, then start it on the same database.
    assert live.server is not None
    live.server.stop(sig=signal.SIGKILL, timeout=5)
    server = live.start_server()
    assert "already registered" in server.text()
    status = run_status(live.fed, run_id)  # the run is still known after the restart
    print(f"\nrun {run_id} after the SuperLink restart: {status!r}; rounds recorded: "
          f"{[r['round'] for r in read_metrics(metrics)]}")

    # The sites reconnect by themselves; a new run completes with all three.
    config = live.run_config("after-restart", **{"num-server-rounds": 1})
    proc = subprocess.run([MEDFED, "run", "-f", str(live.fed.root), "--config", str(config), "--timeout", "900"],
                          capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(_only_run_dir(live.root / "runs" / "after-restart"))
    assert records[-1]["fit_results"] == 3 and set(records[-1]["sites"]) == set(SITES)
    listing = subprocess.run([FLWR, "ls", live.fed.connection_name, "--format", "json"], capture_output=True,
                             text=True, env=flwr_env(live.fed), timeout=120)
    run_ids = {int(r["run-id"]) for r in json.loads(listing.stdout[listing.stdout.index("{"):])["runs"]}
    assert run_id in run_ids
    print(f"run {run_id} status at the end: {run_status(live.fed, run_id)!r}")
