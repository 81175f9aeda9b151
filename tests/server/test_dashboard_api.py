"""The dashboard's JSON API over a store filled by a real simulation, its token, and its bind address.

One small federation (2 hospitals, 2 rounds, DP-SGD) runs through Flower's simulation engine
while a poller reads the API of a dashboard served on 127.0.0.1; the tests then compare what
the API says with the run directory the same run wrote.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from medfed.server.dashboard.app import COOKIE, DEFAULT_HOST, BackgroundServer, create_app
from medfed.server.dashboard.read_models import RunReader
from medfed.server.dashboard_cli import dashboard_command
from medfed.server.run_dir import RoundRecord, read_metrics
from medfed.server.server_app import ServerHooks
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from medfed.simulations.simulate import run_federated
from tests.support.dashboard_support import ROOT, TOKEN, free_port, listening_addresses, small_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUNDS = 2


@dataclass
class LiveRun:
    server: BackgroundServer
    run_id: str
    run_dir: Path
    runs_dir: Path
    seen: list[tuple[str, int]]
    """(status, rounds_done) of the run as the API reported it, polled while it ran."""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    runs_dir = tmp_path_factory.mktemp("dashboard") / "runs"
    cfg = small_config(runs_dir, rounds=ROUNDS)
    store = RunStore(cfg.store_url)  # the dashboard opens the store first; the run writes into it
    server = BackgroundServer(create_app(store=store, token=TOKEN)).start()
    seen: list[tuple[str, int]] = []
    stop = threading.Event()
    shown = {n: threading.Event() for n in range(1, ROUNDS + 1)}

    def poll() -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
            while not stop.is_set():
                runs = client.get("/api/runs").json()
                if runs:
                    seen.append((runs[0]["status"], runs[0]["rounds_done"]))
                    if runs[0]["rounds_done"] in shown:
                        shown[runs[0]["rounds_done"]].set()
                stop.wait(0.05)

    def wait_until_polled(record: RoundRecord) -> None:
        # A round of this tiny federation can be shorter than one poll under load: the server
        # waits (after the round is in the store) until the poller has read it.
        if record.round in shown:
            shown[record.round].wait(timeout=120)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        try:
            result = run_federated(cfg, hooks=ServerHooks(on_round=wait_until_polled))
        finally:
            stop.set()
            poller.join(timeout=15)
        run_id = result.run_dir.name
        yield LiveRun(server=server, run_id=run_id, run_dir=result.run_dir, runs_dir=runs_dir, seen=seen)
    finally:
        server.stop()
        store.close()


@pytest.fixture(scope="module")
def client(live: LiveRun):
    with httpx.Client(base_url=live.server.url, headers=AUTH, timeout=10) as c:
        yield c


def test_the_round_counter_advanced_while_the_simulation_ran(live: LiveRun) -> None:
    done = [n for _, n in live.seen]
    assert done == sorted(done), "the counter never goes back"
    assert ("running", 1) in live.seen, f"the poller never saw round 1 of {ROUNDS} done mid-run: {set(live.seen)}"
    assert live.seen[0] == ("running", 0)  # it saw the run from its start
    assert live.seen[-1] == ("finished", ROUNDS) or live.seen[-1] == ("running", ROUNDS)


def test_the_runs_list_shows_the_finished_run(live: LiveRun, client: httpx.Client) -> None:
    (run,) = client.get("/api/runs").json()
    assert run["id"] == live.run_id
    assert run["status"] == "finished" and run["mode"] == "federated"
    assert (run["rounds_done"], run["planned_rounds"], run["num_sites"]) == (ROUNDS, ROUNDS, 2)
    assert (run["model"], run["dataset"]) == ("simplecnn", "synthetic")
    detail = client.get(f"/api/runs/{live.run_id}").json()
    assert detail["config"]["num-server-rounds"] == ROUNDS and detail["config"]["dp"] is True
    assert detail["versions"]["flwr"] == "1.42.0"
    assert {c["kind"] for c in detail["checkpoints"]} == {"best", "final"}
    assert detail["summary"]["rounds"] == ROUNDS


def test_rounds_match_the_run_directory(live: LiveRun, client: httpx.Client) -> None:
    records = {r["round"]: r for r in read_metrics(live.run_dir)}
    rounds = client.get(f"/api/runs/{live.run_id}/rounds").json()
    assert [r["round"] for r in rounds] == sorted(records) == list(range(ROUNDS + 1))
    for api in rounds:
        rec = records[api["round"]]
        assert api["status"] == "finished"
        assert api["global_metrics"] == pytest.approx(rec["global"])
        assert {"auc", "accuracy", "loss"} <= set(api["global_metrics"])
        assert api["responded"] == rec["fit_results"] and api["failures"] == rec["fit_failures"]
        if api["round"] > 0:
            assert api["selected"] == 2 and api["responded"] == 2
            assert api["eval_metrics"] == pytest.approx(rec["eval"])


def test_sites_show_examples_local_metrics_and_epsilon_spent(live: LiveRun, client: httpx.Client) -> None:
    last = read_metrics(live.run_dir)[-1]["sites"]
    sites = client.get(f"/api/runs/{live.run_id}/sites").json()
    assert [s["site"] for s in sites] == ["site-0", "site-1"]
    for site in sites:
        fit, ev = last[site["site"]]["fit"], last[site["site"]]["eval"]
        assert site["last_round"] == ROUNDS and site["rounds_participated"] == ROUNDS
        assert site["num_examples"] == fit["num_examples"] > 0
        assert site["local_metrics"] == pytest.approx(ev)
        assert site["epsilon"] == pytest.approx(fit["dp-epsilon"]) and 0 < site["epsilon"] < site["budget_epsilon"]
        assert site["budget_epsilon"] == 20.0
        assert site["rounds_declined"] == 0 and site["rounds_missed"] == 0


def test_fairness_is_the_gap_between_the_best_and_worst_site(live: LiveRun, client: httpx.Client) -> None:
    fair = client.get(f"/api/runs/{live.run_id}/fairness").json()
    assert fair["metric"] == "auc" and fair["higher_is_better"] is True
    by_round = {r["round"]: r for r in read_metrics(live.run_dir)}
    assert [p["round"] for p in fair["rounds"]] == list(range(1, ROUNDS + 1))
    for point in fair["rounds"]:
        aucs = {site: v["eval"]["auc"] for site, v in by_round[point["round"]]["sites"].items()}
        assert point["best"] == pytest.approx(max(aucs.values()))
        assert point["worst"] == pytest.approx(min(aucs.values()))
        assert point["gap"] == pytest.approx(max(aucs.values()) - min(aucs.values()))
        assert aucs[point["best_site"]] == pytest.approx(point["best"])


def test_secagg_status_is_reported_per_round(live: LiveRun, client: httpx.Client) -> None:
    rows = client.get(f"/api/runs/{live.run_id}/secagg").json()
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["enabled"] is False and r["secagg"] is None for r in rows)  # this run has SecAgg+ off


def test_the_event_log_has_the_run_story_in_order(live: LiveRun, client: httpx.Client) -> None:
    events = client.get(f"/api/runs/{live.run_id}/events").json()
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run-started" and kinds[-1] == "run-finished"
    assert kinds.count("round-started") == ROUNDS and kinds.count("round-finished") == ROUNDS
    assert kinds.index("round-started") < kinds.index("round-finished")
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    tail = client.get(f"/api/runs/{live.run_id}/events", params={"after": ids[-3]}).json()
    assert [e["id"] for e in tail] == ids[-2:]


def test_the_cross_site_evaluation_has_one_row_per_site(live: LiveRun, client: httpx.Client) -> None:
    report = client.get(f"/api/runs/{live.run_id}/cross-site").json()
    on_disk = json.loads((live.run_dir / "cross_site.json").read_text())
    assert [s["site"] for s in report["sites"]] == [s["site"] for s in on_disk["sites"]] == ["site-0", "site-1"]
    assert (report["checkpoint"], report["round"]) == ("final", ROUNDS)
    for site, saved in zip(report["sites"], on_disk["sites"], strict=True):
        assert site["n"] == saved["n"] > 0 and site["metrics"] == pytest.approx(saved["metrics"])
        assert site["subgroups"] == [] and site["suppressed"] == 0  # synthetic data carries no metadata
    assert report["gaps"] == []


def test_unknown_runs_are_404_naming_the_run(client: httpx.Client) -> None:
    for path in ("/api/runs/nope", "/api/runs/nope/rounds", "/api/runs/nope/sites", "/api/runs/nope/events"):
        response = client.get(path)
        assert response.status_code == 404 and "'nope'" in response.json()["detail"]


def test_the_openapi_schema_describes_every_api_view(client: httpx.Client) -> None:
    schema = client.get("/api/openapi.json").json()
    paths = set(schema["paths"])
    assert paths == {
        "/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/rounds", "/api/runs/{run_id}/sites",
        "/api/runs/{run_id}/fairness", "/api/runs/{run_id}/secagg", "/api/runs/{run_id}/events",
        "/api/runs/{run_id}/cross-site",
    }
    assert "SiteOut" in schema["components"]["schemas"]
    assert "epsilon" in schema["components"]["schemas"]["SiteOut"]["properties"]


def _every_path(live: LiveRun) -> list[str]:
    app = live.server.server.config.app
    paths = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if path == "/static":  # the mount: one real file stands for it
            paths.append("/static/dashboard.css")
            continue
        paths.append(path.replace("{run_id}", live.run_id))
    return paths + ["/static/run.js", "/docs", "/api/runs?token=wrong"]


def test_without_the_token_every_page_and_api_call_is_refused(live: LiveRun) -> None:
    paths = _every_path(live)
    assert "/" in paths and "/api/openapi.json" in paths and "/static/vendor/plotly.min.js" in paths
    attempts = [
        {},
        {"headers": {"Authorization": "Bearer wrong-token-0123456789"}},
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
        {"cookies": {COOKIE: "wrong-token-0123456789"}},
    ]
    for path in paths:
        for kwargs in attempts:
            with httpx.Client(base_url=live.server.url, timeout=10, **kwargs) as anon:
                response = anon.get(path)
            assert response.status_code == 401, (path, kwargs, response.status_code)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in response.text
    with httpx.Client(base_url=live.server.url, headers=AUTH, timeout=10) as ok:
        for path in paths:
            if path not in ("/docs", "/api/runs?token=wrong"):
                assert ok.get(path).status_code == 200, path


def test_the_token_in_the_url_becomes_a_cookie_and_leaves_the_url(live: LiveRun) -> None:
    with httpx.Client(base_url=live.server.url, timeout=10) as browser:
        first = browser.get(f"/runs/{live.run_id}", params={"token": TOKEN})
        assert first.status_code == 303 and first.headers["location"] == f"/runs/{live.run_id}"
        cookie = first.headers["set-cookie"]
        assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert browser.get(f"/runs/{live.run_id}").status_code == 200  # the cookie now opens the page
        assert browser.get("/api/runs").status_code == 200


def test_the_default_bind_address_is_loopback(live: LiveRun) -> None:
    assert DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(dashboard_command).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(BackgroundServer).parameters["host"].default == "127.0.0.1"
    assert live.server.socket.getsockname()[0] == "127.0.0.1"


def test_medfed_dashboard_serves_the_simulated_run_on_loopback_with_a_generated_token(live: LiveRun) -> None:
    """The README's second command, on the store the first one (medfed simulate) wrote."""
    port = free_port()
    out = live.runs_dir.parent / "dashboard.out"
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    with out.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medfed.cli", "dashboard", "--run-dir", str(live.runs_dir), "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
        )
    try:
        url = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and url is None:
            assert proc.poll() is None, out.read_text()
            match = re.search(r"open: (http://\S+)", out.read_text())
            url = match.group(1) if match else None
            time.sleep(0.2)
        assert url is not None, out.read_text()
        assert url == f"http://127.0.0.1:{port}/"  # stdout is a file: the URL without the token
        token_file = live.runs_dir / "dashboard.token"
        token = token_file.read_text().strip()
        assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token not in out.read_text() and str(token_file) in "".join(out.read_text().split())
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                refused = httpx.get(f"{base}/api/runs", timeout=5)
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
        assert refused.status_code == 401
        runs = httpx.get(f"{base}/api/runs", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        assert [r["id"] for r in runs] == [live.run_id] and runs[0]["status"] == "finished"
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_simulate_and_dashboard_default_to_the_same_store() -> None:
    """README: `medfed simulate` then `medfed dashboard`, with no flags, meet in runs/medfed.db."""
    from medfed.simulations.cli import build_config

    simulate_default = build_config(None, {}, []).store_url
    dashboard_default = inspect.signature(dashboard_command).parameters["run_dir"].default
    assert simulate_default == "sqlite:///runs/medfed.db"
    assert RunConfig(run_dir=dashboard_default).store_url == simulate_default


def test_a_pooled_baseline_is_recorded_too(tmp_path: Path) -> None:
    from medfed.simulations.pooled import run_pooled

    cfg = small_config(tmp_path / "runs", rounds=1)
    result = run_pooled(cfg)
    with RunStore(cfg.store_url, create=False) as store:
        (run,) = RunReader(store).list_runs()
        assert (run["id"], run["mode"], run["status"], run["rounds_done"]) == (result.run_dir.name, "pooled", "finished", 1)
        rounds = RunReader(store).rounds(run["id"])
        assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["selected"] == 1
        assert rounds[1]["global_metrics"] == pytest.approx(result.rounds[1].global_metrics)
