"""Site failures (in process, on the LocalGrid): a round completes with the sites that answer,
the failed site is recorded by name and rejoins the next round, the minimum is enforced, and a
site that never answers times out after ``round-timeout``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.client import ClientApp

from medfed.server.dashboard.read_models import RunReader
from medfed.server.rounds import error_class
from medfed.server.run_dir import read_metrics
from medfed.server.server_app import ServerHooks, run_server
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from tests.support.fault_sites import crashing_client_app, fit_round
from tests.support.local_grid import LocalGrid, server_identity

SMALL = dict(dataset="synthetic", synthetic_samples=64, model="simplecnn", image_size=12, batch_size=8,
             num_sites=4, local_epochs=1, num_server_rounds=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # sites train in this process


def _run(cfg: RunConfig, app: ClientApp, path: Path, silent=None) -> LocalGrid:
    grid = LocalGrid(app, num_nodes=cfg.num_sites, silent=silent)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(path))
    return grid


def test_a_site_that_crashes_in_round_2_is_recorded_and_rejoins_round_3(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), **SMALL)
    _run(cfg, crashing_client_app(cfg, site=3, server_round=2), tmp_path / "run")

    records = {r["round"]: r for r in read_metrics(tmp_path / "run")}
    assert [records[r]["fit_results"] for r in (1, 2, 3)] == [4, 3, 4]
    assert [records[r]["fit_failures"] for r in (1, 2, 3)] == [0, 1, 0]
    assert records[2]["failed_sites"] == [
        {"site": "site-3", "node": 104, "code": "internal-error", "error": "RuntimeError"}
    ]  # the site's egress guard turned the exception into its category and code (never the text)
    assert set(records[2]["sites"]["site-3"]) == {"eval"} and "fit" in records[3]["sites"]["site-3"]
    assert records[2]["fit"]["train-loss"] > 0  # the round was aggregated from the three others

    with RunStore(cfg.store_url) as store:
        [run] = RunReader(store).list_runs()
        rounds = {r["round"]: r for r in RunReader(store).rounds(run["id"])}
        assert [(rounds[r]["responded"], rounds[r]["failures"]) for r in (1, 2, 3)] == [(4, 0), (3, 1), (4, 0)]
        failed = [e for e in RunReader(store).events(run["id"]) if e["kind"] == "site-failed"]
        assert [(e["round"], e["level"]) for e in failed] == [(2, "warning")]
        assert failed[0]["message"] == "round 2: site-3 failed to train: RuntimeError (internal-error)"
        assert run["status"] == "finished"
        site3 = next(s for s in RunReader(store).sites(run["id"]) if s["site"] == "site-3")
        assert site3["rounds_participated"] == 2 and site3["rounds_missed"] == 1


def test_a_round_below_min_fit_clients_leaves_the_model_unchanged(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), min_fit_clients=4, store="off", **SMALL)
    _run(cfg, crashing_client_app(cfg, site=0, server_round=2), tmp_path / "run")
    records = {r["round"]: r for r in read_metrics(tmp_path / "run")}
    assert records[2]["fit_results"] == 3 and records[2]["fit"] == {}  # not aggregated
    assert records[2]["global"] == records[1]["global"]  # the round-1 model, evaluated again
    assert records[3]["fit_results"] == 4 and records[3]["global"] != records[1]["global"]


def test_a_site_that_does_not_answer_times_out_and_is_recorded(tmp_path: Path) -> None:
    timeout = 0.3
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), round_timeout=timeout, store="off",
                    **{**SMALL, "num_server_rounds": 2})

    def silent(msg: Message, partition: int) -> bool:  # site 1 never answers its round-2 training
        return partition == 1 and msg.metadata.message_type == "train" and fit_round(msg) == 2

    start = time.perf_counter()
    grid = _run(cfg, crashing_client_app(cfg, site=-1, server_round=0), tmp_path / "run", silent=silent)
    assert time.perf_counter() - start < 60
    records = {r["round"]: r for r in read_metrics(tmp_path / "run")}
    assert records[2]["fit_results"] == 3 and records[2]["fit_failures"] == 1
    assert records[2]["failed_sites"] == [{"site": "site-1", "node": 102, "code": "TIMEOUT", "error": ""}]
    assert records[2]["seconds"] >= timeout
    assert len([m for m in grid.sent if m.metadata.message_type == "train"]) == 8


@pytest.mark.parametrize(("reason", "expected"), [
    ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred.'>", "ClientAppException"),
    ("<class 'ZeroDivisionError'>:<'division by zero'>", "ZeroDivisionError"),
    ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() /home/x'>", "ClientAppException"),
    ("DataError: /data/patient-17/scan.nii.gz is unreadable", "DataError"),
    ("FileNotFoundError: data-error (site error 4103; the details are in the site's log)", "FileNotFoundError"),
    ("An exception was raised when attempting to load `ClientApp`", "unknown"),
])
def test_error_class_keeps_the_class_never_the_message(reason: str, expected: str) -> None:
    assert error_class(reason) == expected
