"""Declined rounds (privacy budget spent) are recorded, left out of FedAvg, and stop a run cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def _refused(site: int, keys: list[str]) -> tuple[None, FitRes]:
    arrays = [np.full((1, 2), 5.0, np.float32), np.full((1,), 5.0, np.float32)]
    metrics = {"site-index": site, "policy-refused": 1, **{f"policy-refused-{k}": 1 for k in keys}}
    return None, FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(arrays), 0, metrics)  # type: ignore[return-value]


def test_a_site_that_refuses_the_run_is_recorded_and_left_out(tmp_path: Path) -> None:
    from flwr.common import EvaluateRes

    strategy = _strategy(tmp_path)
    hostile = {"site-index": 2, "policy-refused": 1, "policy-refused-DOE JOHN MRN 123": 1}  # not a run-config key
    results = [_res(0, 1.0, 10, 0), _refused(1, ["dp-delta", "dp-secure-noise"]),
               (None, FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters([]), 0, hostile))]
    params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert params is not None and all(np.allclose(a, 1.0) for a in parameters_to_ndarrays(params))
    assert strategy.stopped_round is None  # site 0 trained: the run goes on
    evaluated = [(None, EvaluateRes(Status(Code.OK, "Success"), 0.4, 8, {"site-index": 0, "auc": 0.7})),
                 (None, EvaluateRes(Status(Code.OK, "Success"), 0.0, 0, {"site-index": 1, "policy-refused": 1}))]
    loss, _ = strategy.aggregate_evaluate(1, evaluated, [])  # type: ignore[arg-type]
    assert loss == pytest.approx(0.4)  # the refusal's placeholder loss is not averaged in
    summary = strategy.finish()
    assert summary["policy_refused"] == {
        "site-1": {"round": 1, "keys": ["dp-delta", "dp-secure-noise"]},
        "site-2": {"round": 1, "keys": []},  # text in a metric name never reaches the summary
    }
    sites = read_metrics(tmp_path / "run")[0]["sites"]
    assert sites["site-1"]["fit"]["policy-refused-dp-delta"] == 1.0 and sites["site-1"]["eval"]["num_examples"] == 0.0
    assert "DOE" not in json.dumps(summary)
