"""Resume after the server died (in process, on the in-process LocalGrid: no Ray).

The SIGKILL of a real ``medfed simulate`` process is in ``tests/simulations/test_resume_kill.py``
(slow); here the server "dies" by an exception after a round, which leaves the run directory and
the run store as a crash would (the resume state of the last completed round, the store's run
not finished), and the checks run in seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.server.strategy import FedAdam

from medfed.client.client_app import make_client_app
from medfed.server.dashboard.read_models import RunReader
from medfed.server.resume import (
    RESUME_FILE,
    ResumeError,
    capture_rng,
    chain_state,
    read_resume_state,
    restore_chain_state,
    restore_rng,
    resume_point,
)
from medfed.server.run_dir import RoundRecord, read_metrics
from medfed.server.server_app import ServerHooks, run_server
from medfed.server.store import RunStore
from medfed.server.strategies import build_strategy
from medfed.shared.config import RunConfig
from medfed.shared.privacy import PrivacyLedger, site_ledger_path
from tests.support.fault_sites import fit_round
from tests.support.local_grid import LocalGrid, server_identity

SMALL = dict(dataset="synthetic", synthetic_samples=48, model="simplecnn", image_size=12, batch_size=8,
             num_sites=2, local_epochs=1, augment=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # sites train in this process


class ServerDied(Exception):
    """Stands in for the server process dying right after a round was recorded."""


def _run(
    cfg: RunConfig, path: Path | None, *, die_after: int | None = None, also: Callable[[RoundRecord], None] | None = None
) -> LocalGrid:
    def on_round(record: RoundRecord) -> None:
        if also is not None:
            also(record)
        if record.round == die_after:
            raise ServerDied(f"after round {record.round}")

    grid = LocalGrid(make_client_app(cfg), num_nodes=cfg.num_sites)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(on_round=on_round), str(path) if path else None)
    return grid


def _timeless(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)["state_dict"]


def _interrupted_and_resumed(cfg: RunConfig, tmp_path: Path, *, die_after: int) -> tuple[Path, Path, LocalGrid]:
    _run(cfg, tmp_path / "straight")
    with pytest.raises(ServerDied):
        _run(cfg, tmp_path / "cut", die_after=die_after)
    assert not (tmp_path / "cut" / "summary.json").exists()
    grid = _run(cfg.replace(resume=str(tmp_path / "cut")), None)
    return tmp_path / "straight", tmp_path / "cut", grid


def test_fedadam_run_resumed_after_round_2_ends_with_identical_weights_and_records(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), num_server_rounds=3, strategy="fedadam", **SMALL)
    straight, cut, grid = _interrupted_and_resumed(cfg, tmp_path, die_after=2)

    # The resumed process trained round 3 only, and told the sites the true round number.
    assert sorted({fit_round(m) for m in grid.sent if m.metadata.message_type == "train"}) == [3]
    assert {m.metadata.group_id for m in grid.sent} == {"3", "cross-site"}  # then the final model's cross-site evaluation
    a, b = _final_state(straight), _final_state(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    records = read_metrics(cut)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for mine, theirs in zip(records, read_metrics(straight), strict=True):
        assert mine["global"] == theirs["global"]
        assert _timeless(mine["fit"]) == _timeless(theirs["fit"]) and (mine["fit"] or mine["round"] == 0)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["rounds"] == 3 and [r["after_round"] for r in summary["resumed"]] == [2]
    assert len(summary["round_seconds"]) == 3

    with RunStore(cfg.store_url) as store:  # one run, same id, every round once
        runs = {r["id"]: r for r in RunReader(store).list_runs()}
        assert set(runs) == {"straight", "cut"}
        assert runs["cut"]["status"] == "finished" and runs["cut"]["rounds_done"] == 3
        assert [r["round"] for r in RunReader(store).rounds("cut")] == [0, 1, 2, 3]
        assert all(r["status"] == "finished" for r in RunReader(store).rounds("cut"))
        kinds = [(e["kind"], e["round"]) for e in RunReader(store).events("cut")]
        assert ("run-resumed", 2) in kinds and kinds.index(("run-failed", None)) < kinds.index(("run-resumed", 2))
        assert kinds[-1] == ("run-finished", None)


def test_fedavgm_run_resumed_after_round_2_ends_with_identical_weights(tmp_path: Path) -> None:
    # FedAvgM's server momentum lives only in the server process: without it in the resume state,
    # round 3 would step from a zero momentum and end elsewhere.
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), num_server_rounds=3, strategy="fedavgm", **SMALL)
    straight, cut, _ = _interrupted_and_resumed(cfg, tmp_path, die_after=2)
    a, b = _final_state(straight), _final_state(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    saved = chain_state(build_strategy(cfg, initial_weights=[np.ones(3, dtype=np.float32)], evaluate_fn=None,
                                       min_available_clients=2))
    assert "momentum" in json.dumps(saved, default=str)  # the state that carries it


def test_dp_run_resumed_keeps_the_sites_privacy_ledgers(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), num_server_rounds=3, norm="group", dp=True,
                    dp_noise_multiplier=1.2, dp_secure_noise=False, **SMALL)
    ledgers = {site: site_ledger_path(cfg, site_index=site) for site in range(cfg.num_sites)}
    straight_cfg = cfg.replace(ledger_dir=str(tmp_path / "ledgers-straight"))
    _run(straight_cfg, tmp_path / "straight")
    with pytest.raises(ServerDied):
        _run(cfg, tmp_path / "cut", die_after=1)
    _run(cfg.replace(resume=str(tmp_path / "cut")), None)

    for site, path in ledgers.items():
        resumed = PrivacyLedger.load(path)
        straight = PrivacyLedger.load(site_ledger_path(straight_cfg, site_index=site))
        assert [e.round for e in resumed.entries] == [1, 2, 3]  # the same file, continued
        assert resumed.epsilon(cfg.dp_delta) == straight.epsilon(cfg.dp_delta) > 0
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    fits = [r["sites"]["site-0"]["fit"]["dp-epsilon"] for r in read_metrics(tmp_path / "cut")[1:]]
    assert fits == sorted(fits) and len(fits) == 3


def test_resume_state_restores_fedadam_moments_and_random_state(tmp_path: Path) -> None:
    cfg = RunConfig(strategy="fedadam", num_sites=2)
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(7, dtype=np.int64)]
    strategy = build_strategy(cfg, initial_weights=weights, evaluate_fn=None, min_available_clients=2)
    assert isinstance(strategy, FedAdam)
    strategy.m_t = [w.astype(np.float32) * 0.5 for w in weights]
    strategy.v_t = [w.astype(np.float32) * 0.25 for w in weights]
    saved = chain_state(strategy)
    rng = capture_rng()
    expected = (np.random.rand(3), torch.rand(3), __import__("random").random())

    fresh = build_strategy(cfg, initial_weights=[np.zeros_like(w) for w in weights], evaluate_fn=None, min_available_clients=2)
    restore_chain_state(fresh, saved, source="test")
    for got, want in zip(fresh.m_t + fresh.v_t + fresh.current_weights, strategy.m_t + strategy.v_t + weights, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    restore_rng(rng)
    assert np.array_equal(np.random.rand(3), expected[0]) and torch.equal(torch.rand(3), expected[1])
    assert __import__("random").random() == expected[2]
    with pytest.raises(ResumeError, match="FedAdam"):
        restore_chain_state(build_strategy(cfg.replace(strategy="fedavg"), initial_weights=weights,
                                           evaluate_fn=None, min_available_clients=2), saved, source="test")


def test_resume_refuses_other_config_finished_runs_and_missing_state(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), num_server_rounds=2, store="off", **SMALL)
    with pytest.raises(ResumeError, match="no such run directory"):
        resume_point(cfg.replace(resume=str(tmp_path / "nowhere")))
    with pytest.raises(ServerDied):
        _run(cfg, tmp_path / "cut", die_after=1)
    assert read_resume_state(tmp_path / "cut").round == 1
    with pytest.raises(ResumeError, match=r"learning-rate = 0\.5 \(the run has 0\.05\)"):
        resume_point(cfg.replace(resume=str(tmp_path / "cut"), learning_rate=0.5))
    (tmp_path / "cut" / RESUME_FILE).unlink()
    with pytest.raises(ResumeError, match="resume.pt does not exist"):
        resume_point(cfg.replace(resume=str(tmp_path / "cut")))
    _run(cfg, tmp_path / "done")
    with pytest.raises(ResumeError, match="already finished"):
        resume_point(cfg.replace(resume=str(tmp_path / "done")))


def test_a_round_recorded_after_the_saved_state_is_recorded_once(tmp_path: Path) -> None:
    """A crash between a round's metrics line and its resume state: the round runs again, once."""
    cfg = RunConfig(run_dir=str(tmp_path / "runs"), num_server_rounds=2, **SMALL)
    cut, kept = tmp_path / "cut", tmp_path / "resume-after-round-1.pt"

    def keep_round_1_state(record: RoundRecord) -> None:
        if record.round == 1:
            shutil.copy(cut / RESUME_FILE, kept)

    with pytest.raises(ServerDied):
        _run(cfg, cut, die_after=2, also=keep_round_1_state)
    kept.replace(cut / RESUME_FILE)  # round 2 recorded, its state not saved: a crash in between
    with (cut / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 3, "glob')  # and a line the crash cut short
    _run(cfg.replace(resume=str(cut)), None)
    assert [r["round"] for r in read_metrics(cut)] == [0, 1, 2]
    with RunStore(cfg.store_url) as store:
        assert [(r["round"], r["status"]) for r in RunReader(store).rounds("cut")] == [(0, "finished"), (1, "finished"), (2, "finished")]


def test_medfed_simulate_resume_takes_the_runs_own_config_only(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--resume", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such run directory" in " ".join(result.output.split())
    result = runner.invoke(app, ["simulate", "--resume", str(tmp_path), "--rounds", "5", "--set", "seed=1"])
    assert result.exit_code == 2
    assert "leave out the other options (given: --rounds, --set)" in " ".join(result.output.split())


def test_state_tensors_share_writable_arrays_copy_others_and_round_trip() -> None:
    from medfed.server.resume import state_arrays, state_tensors

    writable = np.arange(6, dtype=np.float32).reshape(2, 3)
    read_only = np.arange(4, dtype=np.int64)
    read_only.setflags(write=False)
    strided = np.arange(10, dtype=np.float64)[::2]
    tensors = state_tensors([writable, read_only, strided])
    assert np.shares_memory(tensors[0].numpy(), writable)  # no whole-model copy before torch.save
    assert not np.shares_memory(tensors[1].numpy(), read_only) and not np.shares_memory(tensors[2].numpy(), strided)
    for back, original in zip(state_arrays(tensors), [writable, read_only, strided], strict=True):
        assert back.dtype == original.dtype
        np.testing.assert_array_equal(back, original)
