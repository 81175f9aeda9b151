"""The SCAFFOLD strategy: sites receive the weights followed by the server control variate; one
round moves the model by the mean update and ``c`` by ``(1 / N) sum_i (c_i+ - c_i)`` (Option II,
from each site's weights and steps); ``c`` is part of the resume state; SecAgg+, DP and Adam are
refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from medfed.server.resume import chain_state, restore_chain_state
from medfed.server.strategies import TRAIN_STEPS, Scaffold, build_strategy
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.training import cosine_lr

X = [np.array([1.0, -2.0], dtype=np.float32), np.array(4, dtype=np.int64)]
CFG = RunConfig(strategy="scaffold", num_sites=4, learning_rate=0.05, num_server_rounds=10)


def _round(strategy: Scaffold, server_round: int, sites: list[tuple[list[np.ndarray], int, int]]) -> list[np.ndarray]:
    sent = strategy.fit_parameters(server_round, X)
    assert len(sent) == 2 * len(X)  # weights, then the control variate
    results = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), n, {TRAIN_STEPS: k})) for w, n, k in sites
    ]
    params, _ = strategy.aggregate_fit(server_round, results, [])
    return parameters_to_ndarrays(params)


def test_one_round_moves_model_and_control_by_option_two() -> None:
    strategy = build_strategy(CFG, initial_weights=X, evaluate_fn=None, min_available_clients=4)
    assert isinstance(strategy, Scaffold)
    strategy.control = [np.array([0.1, 0.2], dtype=np.float32), np.zeros((), dtype=np.float32)]
    c0 = [c.copy() for c in strategy.control]
    y1, y2 = np.array([0.9, -1.8], dtype=np.float32), np.array([1.3, -2.6], dtype=np.float32)
    new = _round(strategy, 3, [([y1, np.array(9)], 10, 5), ([y2, np.array(11)], 30, 2)])
    np.testing.assert_allclose(new[0], (10 * y1 + 30 * y2) / 40, rtol=1e-6)  # global step 1
    lr = cosine_lr(0.05, step=3, total=10)
    # K local steps of momentum SGD (0.9, buffer from zero) move lr * sum_k (1 - 0.9^k) / 0.1 per unit gradient
    length = {k: lr * sum((1 - 0.9**j) / 0.1 for j in range(1, k + 1)) for k in (5, 2)}
    d1 = (X[0] - y1) / length[5] - c0[0]
    d2 = (X[0] - y2) / length[2] - c0[0]
    np.testing.assert_allclose(strategy.control[0], c0[0] + (d1 + d2) / 4, rtol=1e-5)
    assert float(strategy.control[1]) == 0.0  # the integer counter has no control variate


def test_the_server_control_survives_a_resume() -> None:
    strategy = build_strategy(CFG, initial_weights=X, evaluate_fn=None, min_available_clients=4)
    _round(strategy, 1, [([np.array([0.5, -1.0], dtype=np.float32), np.array(5)], 8, 3)])
    assert np.any(strategy.control[0] != 0)
    fresh = build_strategy(CFG, initial_weights=X, evaluate_fn=None, min_available_clients=4)
    restore_chain_state(fresh, chain_state(strategy), source="test")
    np.testing.assert_array_equal(fresh.control[0], strategy.control[0])


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"secagg": True}, "secagg"),
        ({"dp": True, "norm": "group"}, "dp"),
        ({"client_dp": "fixed"}, "client-dp"),
        ({"optimizer": "adam"}, "optimizer = 'sgd'"),
    ],
)
def test_scaffold_refuses_what_it_cannot_honour(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match="scaffold") as err:
        RunConfig(strategy="scaffold", **changes)
    assert fragment in str(err.value)


def test_a_label_skew_loss_is_refused_under_dp_and_auto_falls_back_to_ce() -> None:
    with pytest.raises(ConfigError, match="loss = 'fedlc' cannot run with dp"):
        RunConfig(loss="fedlc", dp=True, norm="group")
    assert RunConfig(dp=True, norm="group").loss_for("classification") == "ce"
    assert RunConfig().loss_for("segmentation") == "ce"
    assert RunConfig().loss_for("classification") == "balanced-softmax"


def test_a_local_bn_mode_without_batchnorm_is_refused() -> None:
    with pytest.raises(ConfigError, match="norm = 'group' has no BatchNorm"):
        RunConfig(bn_mode="fedbn", norm="group")
