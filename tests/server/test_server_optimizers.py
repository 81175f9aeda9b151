"""Server optimizers (``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``): one aggregation step
on hand-made updates equals the optimizer's update formula on the trainable entries, while the
buffers (a BatchNorm statistic, a batch counter) take FedAvg's example-weighted mean."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from medfed.server.resume import chain_state, restore_chain_state
from medfed.server.strategies import build_strategy
from medfed.shared.config import RunConfig

X = [np.array([1.0, -2.0], dtype=np.float32), np.array([0.5], dtype=np.float32), np.array(7, dtype=np.int64)]
TRAINABLE = [True, False, False]
SITE_1 = [np.array([1.2, -2.4], dtype=np.float32), np.array([0.9], dtype=np.float32), np.array(9, dtype=np.int64)]
SITE_2 = [np.array([0.8, -1.0], dtype=np.float32), np.array([0.1], dtype=np.float32), np.array(13, dtype=np.int64)]
EXAMPLES = (1, 3)


def _results(sites: list[list[np.ndarray]]) -> list:
    return [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), n, {}))
        for w, n in zip(sites, EXAMPLES, strict=True)
    ]


def _mean(sites: list[list[np.ndarray]], i: int) -> np.ndarray:
    total = sum(EXAMPLES)
    return sum(n * s[i].astype(np.float64) for s, n in zip(sites, EXAMPLES, strict=True)) / total


def _step(cfg: RunConfig, rounds: list[list[list[np.ndarray]]]) -> list[list[np.ndarray]]:
    strategy = build_strategy(cfg, initial_weights=X, evaluate_fn=None, min_available_clients=2, trainable=TRAINABLE)
    out = []
    for r, sites in enumerate(rounds, start=1):
        params, _ = strategy.aggregate_fit(r, _results(sites), [])
        out.append(parameters_to_ndarrays(params))
    return out


def _expected(name: str, eta: float, beta_1: float, beta_2: float, tau: float, momentum: float) -> np.ndarray:
    """The first entry after one round, by the optimizer's formula (Reddi et al. 2021, Alg. 2)."""
    x = X[0].astype(np.float64)
    delta = _mean([SITE_1, SITE_2], 0) - x
    if name == "fedavgm":  # Hsu et al. 2019: v = x - mean (momentum buffer starts at the first one)
        return x - eta * (x - _mean([SITE_1, SITE_2], 0))
    if name == "fedadagrad":  # m = delta (beta_1 = 0), v = delta^2
        return x + eta * delta / (np.abs(delta) + tau)
    m = (1 - beta_1) * delta
    v = (1 - beta_2) * delta**2  # Adam from v = 0; Yogi: v - (1 - b2) d^2 sign(v - d^2) = (1 - b2) d^2
    if name == "fedadam":  # Flower's bias-corrected step (its exponent is server_round + 1)
        eta = eta * np.sqrt(1 - beta_2**2) / (1 - beta_1**2)
    return x + eta * m / (np.sqrt(v) + tau)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("eta", [0.0, 0.3])  # 0: the strategy's default step
def test_one_step_matches_the_update_formula_and_buffers_are_averaged(name: str, eta: float) -> None:
    cfg = RunConfig(strategy=name, num_sites=2, server_learning_rate=eta, server_tau=0.01, server_beta_1=0.8,
                    server_beta_2=0.95, server_momentum=0.7)
    (new,) = _step(cfg, [[SITE_1, SITE_2]])
    expected = _expected(name, cfg.server_step, 0.8, 0.95, 0.01, 0.7)
    np.testing.assert_allclose(new[0], expected, rtol=1e-5)
    if cfg.server_step != 1.0 or name != "fedavgm":  # FedAvgM's first step of size 1 is the mean
        assert not np.allclose(new[0], _mean([SITE_1, SITE_2], 0))  # a server step, not the mean
    np.testing.assert_allclose(new[1], _mean([SITE_1, SITE_2], 1), rtol=1e-6)  # the statistic is averaged
    assert new[2].dtype == np.int64 and int(new[2]) == round(float(_mean([SITE_1, SITE_2], 2)))


def test_the_default_server_steps_are_the_papers() -> None:
    assert RunConfig(strategy="fedavgm").server_step == 1.0
    assert RunConfig(strategy="fedadam").server_step == 0.01
    assert RunConfig(strategy="fedadam", server_learning_rate=0.1).server_step == 0.1


def test_fedavgm_momentum_carries_into_the_second_round_and_survives_a_resume() -> None:
    cfg = RunConfig(strategy="fedavgm", num_sites=2, server_learning_rate=0.5, server_momentum=0.7)
    first, second = _step(cfg, [[SITE_1, SITE_2], [SITE_2, SITE_1]])
    x0, x1 = X[0].astype(np.float64), first[0].astype(np.float64)
    v1 = x0 - _mean([SITE_1, SITE_2], 0)
    v2 = 0.7 * v1 + (x1 - _mean([SITE_2, SITE_1], 0))
    np.testing.assert_allclose(second[0], x1 - 0.5 * v2, rtol=1e-5)
    # the same second round from a strategy restored from the first one's resume state
    strategy = build_strategy(cfg, initial_weights=X, evaluate_fn=None, min_available_clients=2, trainable=TRAINABLE)
    strategy.aggregate_fit(1, _results([SITE_1, SITE_2]), [])
    saved = chain_state(strategy)
    fresh = build_strategy(cfg, initial_weights=[np.zeros_like(w) for w in X], evaluate_fn=None,
                           min_available_clients=2, trainable=TRAINABLE)
    restore_chain_state(fresh, saved, source="test")
    params, _ = fresh.aggregate_fit(2, _results([SITE_2, SITE_1]), [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], second[0], rtol=1e-6)
