"""Declined rounds (privacy budget spent) are recorded, left out of FedAvg, and stop a run cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from torch import nn

from medfed.server.recording import RecordingStrategy
from medfed.server.run_dir import RunDirectory, read_metrics


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)


def _res(site: int, value: float, n: int, declined: int) -> tuple[None, FitRes]:
    arrays = [np.full((1, 2), value, np.float32), np.full((1,), value, np.float32)]
    metrics = {"site-index": site, "dp-declined": declined, "dp-epsilon": 0.5 + site}
    return None, FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(arrays), n, metrics)  # type: ignore[return-value]


def _strategy(tmp_path: Path) -> RecordingStrategy:
    run_dir = RunDirectory(tmp_path / "run", config={"dp": True}, mode="federated")
    return RecordingStrategy(FedAvg(), run_dir=run_dir, model=_Model(), primary_metric="auc")


def test_declined_sites_are_recorded_but_not_averaged(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    params, _ = strategy.aggregate_fit(1, [_res(0, 1.0, 10, 0), _res(1, 9.0, 0, 1)], [])
    assert params is not None
    assert all(np.allclose(a, 1.0) for a in parameters_to_ndarrays(params))  # site 1's weights ignored
    assert strategy.stopped_round is None
    summary = strategy.finish()
    sites = read_metrics(tmp_path / "run")[0]["sites"]
    assert sites["site-1"]["fit"]["dp-declined"] == 1.0 and sites["site-1"]["fit"]["num_examples"] == 0.0
    assert sites["site-0"]["fit"]["dp-epsilon"] == 0.5
    assert "stopped_early" not in summary


def test_when_every_site_declines_the_run_stops_cleanly(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    strategy.aggregate_fit(1, [_res(0, 1.0, 10, 0), _res(1, 3.0, 10, 0)], [])
    params, metrics = strategy.aggregate_fit(2, [_res(0, 1.0, 0, 1), _res(1, 3.0, 0, 1)], [])
    assert params is None and metrics == {}  # no division by zero in FedAvg
    assert strategy.stopped_round == 2
    manager = SimpleClientManager()
    assert strategy.configure_fit(3, ndarrays_to_parameters([]), manager) == []
    assert strategy.configure_evaluate(3, ndarrays_to_parameters([]), manager) == []
    assert strategy.evaluate(3, ndarrays_to_parameters([])) is None
    summary = strategy.finish()
    assert summary["rounds"] == 1 and summary["stopped_early"]["round"] == 2
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["stopped_early"]["round"] == 2
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2]
    assert {s["fit"]["dp-declined"] for s in records[1]["sites"].values()} == {1.0}
