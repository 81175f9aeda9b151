"""Runs that cannot train end as failed (in process, on the LocalGrid): every site failing a round
stops the run with one error, no round completing fails it, and such a run resumes once fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.client import ClientApp

from medfed.client.client_app import make_client_app, privacy_mods, site_client_fn
from medfed.client.egress import egress_guard
from medfed.server.dashboard.read_models import RunReader
from medfed.server.failures import RunFailedError
from medfed.server.resume import ResumeError, resume_point
from medfed.server.run_dir import read_metrics
from medfed.server.server_app import ServerHooks, run_server
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from medfed.shared.preflight import PreflightError
from tests.support.failing_sites import all_sites_crash_client_app, import_error_client_app
from tests.support.fault_sites import crash_mod
from tests.support.local_grid import LocalGrid, server_identity

SMALL = dict(dataset="synthetic", synthetic_samples=64, model="simplecnn", image_size=12, batch_size=8,
             num_sites=3, local_epochs=1, num_server_rounds=3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # sites train in this process


def _run(cfg: RunConfig, app: ClientApp, path: Path) -> LocalGrid:
    grid = LocalGrid(app, num_nodes=cfg.num_sites)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(path))
    return grid


def _sent(grid: LocalGrid, kind: str) -> int:
    return sum(1 for m in grid.sent if m.metadata.message_type == kind)


def _saved_round(path: Path) -> int:
    return int(torch.load(path / "checkpoints" / "resume.pt", weights_only=True)["round"])


def test_every_site_failing_round_1_stops_the_run_with_one_error(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), **SMALL)
    grid = LocalGrid(import_error_client_app(cfg), num_nodes=cfg.num_sites)
    with server_identity(), pytest.raises(RunFailedError) as caught:
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp_path / "run"))
    message = str(caught.value)
    assert message.startswith("round 1: every site failed to train (3 of 3: 3 x ImportError"), message
    assert caught.value.run_dir == tmp_path / "run" and caught.value.last_round == 0
    # The run stopped: rounds 2 and 3 were never sent, nor any evaluation of round 1.
    assert _sent(grid, "train") == 3 and _sent(grid, "evaluate") == 0
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1]
    assert records[1]["fit_results"] == 0 and records[1]["fit_failures"] == 3
    assert records[1]["skipped"] == "every site failed"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failure"] == message
    assert summary["failed_round"] == 1 and summary["rounds"] == 0
    assert _saved_round(tmp_path / "run") == 0  # the failed round is trained again on resume
    with RunStore(cfg.store_url) as store:
        [run] = RunReader(store).list_runs()
        assert run["status"] == "failed" and "every site failed" in run["error"]


def test_a_run_whose_sites_all_fail_later_resumes_after_its_last_completed_round(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), store="off", **SMALL)
    path = tmp_path / "run"
    with pytest.raises(RunFailedError, match="round 2: every site failed") as caught:
        _run(cfg, all_sites_crash_client_app(cfg, server_round=2), path)
    assert caught.value.last_round == 1 and _saved_round(path) == 1
    assert [r["round"] for r in read_metrics(path)] == [0, 1, 2]

    resumed = cfg.replace(resume=str(path))
    assert resume_point(resumed).state.round == 1  # a failed run's summary does not block the resume
    grid = _run(resumed, make_client_app(resumed), path)
    assert _sent(grid, "train") == 2 * cfg.num_sites  # rounds 2 and 3, trained this time
    records = read_metrics(path)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["fit_results"] == cfg.num_sites for r in records[1:])
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds"] == 3 and "failure" not in summary
    with pytest.raises(ResumeError, match="already finished"):
        resume_point(resumed)


def test_a_run_in_which_no_round_completes_fails_naming_why(tmp_path: Path) -> None:
    # Every round has one training result but min-fit-clients = 3: nothing is ever aggregated.
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), store="off", min_fit_clients=3,
                    **{**SMALL, "num_server_rounds": 2})
    app = ClientApp(client_fn=site_client_fn(cfg),  # sites 0 and 1 crash in every round
                    mods=[egress_guard, *(crash_mod(site=s, server_round=r) for s in (0, 1) for r in (1, 2)),
                          *privacy_mods(cfg)])
    with pytest.raises(RunFailedError) as caught:
        _run(cfg, app, tmp_path / "run")
    message = str(caught.value)
    assert message.startswith("no round completed in rounds 1-2, so the model is untrained"), message
    assert "sites that trained per round: 1, 1 (min-fit-clients = 3)" in message
    assert "4 failed site replies" in message
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == 0


def test_dp_with_batchnorm_is_refused_before_any_site_is_asked(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), store="off", dp=True, norm="batch", **SMALL)
    grid = LocalGrid(make_client_app(cfg), num_nodes=cfg.num_sites)
    with server_identity(), pytest.raises(PreflightError, match="--norm group"):
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp_path / "run"))
    assert grid.sent == [] and not (tmp_path / "run").exists()


def test_an_interrupted_run_directory_stops_recording_and_resumes(tmp_path: Path) -> None:
    """What ``medfed simulate`` does on Ctrl-C, here after round 1 while the server thread goes on."""
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), **SMALL)
    path = tmp_path / "run"
    started = []

    def on_round(record) -> None:
        if record.round == 1:
            started[0].mark_interrupted(last_round=1, planned_rounds=3, reason="interrupted (SIGINT) after round 1 of 3")

    grid = LocalGrid(make_client_app(cfg), num_nodes=cfg.num_sites)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(on_start=started.append, on_round=on_round), str(path))
    # Rounds 2 and 3 ran on but nothing of them was written: the directory is as at the signal.
    assert [r["round"] for r in read_metrics(path)] == [0, 1] and _saved_round(path) == 1
    summary = json.loads((path / "summary.json").read_text())
    assert summary == {**summary, "status": "interrupted", "last_completed_round": 1, "num_server_rounds": 3,
                       "resumable": True}
    with RunStore(cfg.store_url) as store:
        [run] = RunReader(store).list_runs()
        assert run["status"] == "failed" and "interrupted (SIGINT) after round 1 of 3" in run["error"]

    resumed = cfg.replace(resume=str(path))
    _run(resumed, make_client_app(resumed), path)
    assert [r["round"] for r in read_metrics(path)] == [0, 1, 2, 3]
    assert json.loads((path / "summary.json").read_text())["status"] == "finished"
    with RunStore(cfg.store_url) as store:
        [run] = RunReader(store).list_runs()
        assert run["status"] == "finished"
