"""Flower strategies by name (the legacy ``flwr.server.strategy`` family, which SecAgg+ needs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.common import Metrics, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server.strategy import FedAdam, FedAvg, FedProx, Strategy

from shared.config import STRATEGIES, RunConfig
from shared.training import cosine_lr

__all__ = ["build_strategy", "weighted_average", "STRATEGIES"]

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


def weighted_average(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean of every numeric metric the sites report.

    Also adds ``<name>-min`` and ``<name>-max`` across sites, so a spread between the best and
    the worst site is visible; ``site-index`` is dropped.
    """
    names = sorted({k for _, m in results for k in m if k != "site-index"})
    out: dict[str, Scalar] = {}
    for name in names:
        pairs = [(n, float(m[name])) for n, m in results if name in m]
        total = sum(n for n, _ in pairs)
        if total > 0:
            out[name] = sum(n * v for n, v in pairs) / total
        out[f"{name}-min"] = min(v for _, v in pairs)
        out[f"{name}-max"] = max(v for _, v in pairs)
    return out


def build_strategy(
    cfg: RunConfig,
    *,
    initial_weights: NDArrays,
    evaluate_fn: EvaluateFn | None,
    min_available_clients: int,
) -> Strategy:
    """The strategy ``cfg.strategy`` with medfed's round configs and metric aggregation.

    Parameters
    ----------
    cfg
        Uses ``strategy``, ``fraction_*``, ``min_fit_clients``, ``proximal_mu``,
        ``server_learning_rate`` and the learning-rate schedule.
    initial_weights
        The global model at round 0 (built by the server from the run's seed).
    evaluate_fn
        Server-side evaluation on held-out data (``None`` where the server has none).
    min_available_clients
        How many sites must be connected before a round starts.
    """

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {
            "server-round": server_round,
            "learning-rate": cosine_lr(
                cfg.learning_rate, step=server_round, total=cfg.num_server_rounds
            ),
        }

    def evaluate_config(server_round: int) -> dict[str, Scalar]:
        return {"server-round": server_round}

    min_fit = min(cfg.min_fit_clients, min_available_clients)
    common: dict[str, Any] = {
        "fraction_fit": cfg.fraction_fit,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_fit_clients": min_fit,
        "min_evaluate_clients": min_fit if cfg.fraction_evaluate > 0 else 0,
        "min_available_clients": min_available_clients,
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": evaluate_config,
        "initial_parameters": ndarrays_to_parameters(initial_weights),
        "fit_metrics_aggregation_fn": weighted_average,
        "evaluate_metrics_aggregation_fn": weighted_average,
    }
    if cfg.strategy == "fedavg":
        return FedAvg(**common)
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        return FedAdam(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, tau=1e-3, **common)
    valid = ", ".join(STRATEGIES)
    raise ValueError(f"strategy = {cfg.strategy!r} is invalid. Valid choices: {valid}.")

