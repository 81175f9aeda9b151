"""Run the quickstart peer on Flower's simulation engine and time it.

``python -m medfed.simulations.peers.flower_quickstart.run --data breastmnist.npz --sites 4 --rounds 5``
prints one JSON object: wall seconds, seconds per round, final test AUC and accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

from flwr.simulation import run_simulation

from medfed.simulations.peers.flower_quickstart.client_app import make_client_app
from medfed.simulations.peers.flower_quickstart.server_app import make_server_app
from medfed.simulations.peers.flower_quickstart.task import Settings

__all__ = ["PeerResult", "run"]


@dataclass
class PeerResult:
    """What one run of a peer measured."""

    wall_seconds: float
    round_seconds: list[float] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)


def run(settings: Settings) -> PeerResult:
    """Simulate ``settings.num_sites`` sites (one CPU each, as medfed's simulation) and time the rounds.

    A round's time is the time between two centralized evaluations (its fit, the federated
    evaluation of the previous round, and its own centralized evaluation).
    """
    stamps: dict[int, float] = {}
    metrics: dict[int, dict[str, float]] = {}

    def on_round(server_round: int, now: float, test_metrics: dict[str, float]) -> None:
        stamps[server_round] = now
        metrics[server_round] = test_metrics

    # the same Ray conditions as medfed's simulation (simulations.simulate.ray_environment): sites at
    # the caller's priority, not Ray's default nice 15, so the two are timed alike on a busy machine
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(settings, on_round=on_round),
        client_app=make_client_app(settings),
        num_supernodes=settings.num_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )
    wall = time.perf_counter() - start
    if settings.rounds not in metrics:
        raise RuntimeError(f"the quickstart peer finished {max(metrics, default=0)} of {settings.rounds} rounds.")
    rounds = [stamps[r] - stamps[r - 1] for r in range(1, settings.rounds + 1)]
    return PeerResult(wall_seconds=wall, round_seconds=rounds, final_metrics=metrics[settings.rounds])


def main() -> None:
    """Command-line entry point (prints JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MedMNIST-style .npz file (2D)")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = Settings(data=args.data, num_sites=args.sites, rounds=args.rounds, local_epochs=args.local_epochs,
                        seed=args.seed)
    print(json.dumps(asdict(run(settings)), indent=2))


if __name__ == "__main__":
    main()
