"""Run directories: naming (runs started in the same second never share a folder); files written
in the run's writer thread (resume state, checkpoints) in order, waited for, errors raised."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg
from torch import nn

from medfed.server.recording import RecordingStrategy
from medfed.server.resume import read_resume_state, state_tensors
from medfed.server.run_dir import RunDirectory, new_run_path, read_metrics


def test_runs_started_together_get_their_own_folders(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(lambda _: new_run_path(tmp_path / "runs", name="fedavg-s0"), range(16)))
    assert len(set(paths)) == 16
    assert all(p.is_dir() and not any(p.iterdir()) for p in paths)  # created, empty, claimed
    assert {p.name.split("-fedavg-s0")[1] for p in paths} >= {""}  # the first one has no suffix


# ---------------------------------------------------------------- the run's writer thread
def _run_dir(tmp_path: Path) -> RunDirectory:
    return RunDirectory(tmp_path / "run", config={"model": "tiny"}, mode="federated")


def test_writes_asked_for_later_run_in_order_in_another_thread_and_the_summary_waits_for_them(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    release = threading.Event()
    done: list[tuple[int, int]] = []

    def slow_write(n: int) -> None:
        release.wait(10)
        (run_dir.path / "checkpoints" / f"{n}.txt").write_text(str(n))
        done.append((n, threading.get_ident()))

    for n in range(3):
        run_dir.write_later(lambda n=n: slow_write(n))
    assert done == []  # the caller went on
    threading.Timer(0.2, release.set).start()
    run_dir.write_summary({"status": "finished", "rounds": 1})  # waits for the three writes first
    assert [n for n, _ in done] == [0, 1, 2]
    assert {thread for _, thread in done} != {threading.get_ident()}
    assert all((run_dir.path / "checkpoints" / f"{n}.txt").exists() for n in range(3))
    assert json.loads((run_dir.path / "summary.json").read_text())["status"] == "finished"


def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    run_dir.write_later(full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_dir.wait_for_writes()
    run_dir.write_later(full_disk)
    deadline = time.monotonic() + 10
    while not all(write.done() for write in run_dir._writes) and time.monotonic() < deadline:
        time.sleep(0.01)  # until it has failed: the next write_later raises it
    with pytest.raises(OSError, match="No space left on device"):
        run_dir.write_later(lambda: None)
    run_dir.wait_for_writes()  # nothing left
    run_dir.write_later(full_disk)  # a failing run: logged, its own error kept
    run_dir.fail(RuntimeError("every site failed"))


def test_a_later_checkpoint_holds_the_weights_of_when_it_was_asked_for(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    gate = threading.Event()
    run_dir.write_later(lambda: gate.wait(10))  # the writer is busy
    path = run_dir.save_checkpoint("best", model, server_round=2, metrics={"auc": 0.9}, later=True)
    with torch.no_grad():
        model.weight.fill_(7.0)  # the next round changes the model before the file is written
    assert not path.exists()
    gate.set()
    run_dir.wait_for_writes()
    saved = torch.load(path, weights_only=True)
    assert saved["round"] == 2 and torch.equal(saved["state_dict"]["weight"], torch.ones(1, 2))


def test_the_resume_state_is_written_after_the_round_record_with_the_state_of_that_round(tmp_path: Path) -> None:
    """The strategy's state is copied when the round closes: a change in the next round is not in the file."""
    run_dir = _run_dir(tmp_path)
    momentum = [np.ones(3, np.float32)]

    class Stateful(FedAvg):
        def resume_state(self) -> dict[str, object]:
            return {"momentum": state_tensors(momentum)}  # shares the array, as medfed's strategies do

    strategy = RecordingStrategy(Stateful(), run_dir=run_dir, model=nn.Linear(2, 1), primary_metric="auc")
    gate = threading.Event()
    run_dir.write_later(lambda: gate.wait(10))  # the writer is busy when round 1 closes
    strategy.aggregate_fit(1, [_fit_res(0, 1.0), _fit_res(1, 3.0)], [])
    strategy.aggregate_fit(2, [_fit_res(0, 1.0), _fit_res(1, 3.0)], [])  # closes round 1
    momentum[0] *= 5  # round 2 changes the strategy's arrays in place
    assert [r["round"] for r in read_metrics(run_dir.path)] == [1]  # the record is there at once
    gate.set()
    run_dir.wait_for_writes()
    state = read_resume_state(run_dir.path)
    assert state.round == 1
    np.testing.assert_array_equal(state.weights[0], np.full((1, 2), 2.0, np.float32))
    saved = [entry for entry in state.strategies if entry["class"] == "Stateful"][0]["state"]
    np.testing.assert_array_equal(np.asarray(saved["momentum"][0]), np.ones(3, np.float32))


def _fit_res(site: int, value: float) -> tuple[None, FitRes]:
    arrays = [np.full((1, 2), value, np.float32), np.full((1,), value, np.float32)]
    return None, FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(arrays), 10, {"site-index": site})  # type: ignore[return-value]
