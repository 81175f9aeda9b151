"""A run being interrupted (its run directory stopped recording) starts and records no further round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from torch import nn

from medfed.server.recording import RecordingStrategy
from medfed.server.run_dir import RunDirectory, read_metrics


def _res(site: int, value: float) -> tuple[None, FitRes]:
    arrays = [np.full((1, 2), value, np.float32), np.full((1,), value, np.float32)]
    return None, FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(arrays), 10, {"site-index": site})  # type: ignore[return-value]


class _NoSites(SimpleClientManager):
    def sample(self, *args: object, **kwargs: object) -> list:  # type: ignore[override]
        raise AssertionError("a site was sampled for a round after the run stopped recording")


def test_after_stop_recording_no_round_is_started_recorded_or_reported(tmp_path: Path) -> None:
    reported: list[int] = []
    run_dir = RunDirectory(tmp_path / "run", config={}, mode="federated")
    strategy = RecordingStrategy(
        FedAvg(), run_dir=run_dir, model=nn.Linear(2, 1), primary_metric="auc",
        on_round=lambda record: reported.append(record.round),
    )
    manager = _NoSites()
    strategy.aggregate_fit(1, [_res(0, 1.0), _res(1, 3.0)], [])
    strategy.aggregate_fit(2, [_res(0, 1.0), _res(1, 3.0)], [])  # round 2's record closes round 1
    assert reported == [1]
    run_dir.stop_recording()  # the signal handler's first act: round 2 is still open
    assert strategy.configure_fit(3, ndarrays_to_parameters([]), manager) == []  # no site is sampled
    assert reported == [1], "a round closed after the signal was reported"
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1]
