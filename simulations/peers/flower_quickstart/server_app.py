"""The quickstart peer's ServerApp: FedAvg with a centralized evaluation on the test split."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Context
from flwr.common import Metrics, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from medfed.simulations.peers.flower_quickstart.task import (
    Settings,
    get_weights,
    load_model,
    load_test,
    set_weights,
    test,
)

__all__ = ["make_server_app"]

RoundLog = Callable[[int, float, dict[str, float]], None]


def weighted_average(metrics: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean accuracy of the sites' evaluations (as in the quickstart)."""
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * float(m["accuracy"]) for n, m in metrics) / max(total, 1)}


def make_server_app(settings: Settings, *, on_round: RoundLog | None = None) -> ServerApp:
    """``ServerApp(server_fn=...)`` running FedAvg for ``settings.rounds`` rounds.

    ``on_round(round, time.perf_counter(), test metrics)`` is called by the centralized
    evaluation after every round (round 0 = the initial model).
    """
    net = load_model(settings)
    testloader = load_test(settings)

    def evaluate(server_round: int, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        set_weights(net, parameters)
        loss, metrics = test(net, testloader)
        if on_round is not None:
            on_round(server_round, time.perf_counter(), metrics)
        return loss, dict(metrics)

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_available_clients=settings.num_sites,
            initial_parameters=ndarrays_to_parameters(get_weights(load_model(settings))),
            evaluate_fn=evaluate,
            evaluate_metrics_aggregation_fn=weighted_average,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=settings.rounds))

    return ServerApp(server_fn=server_fn)
