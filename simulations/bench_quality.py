"""Benchmark: federated vs pooled test metrics for one recipe, measured in one run.

Runs the federated simulation and the pooled baseline (same model, loop, total epochs, test split)
and prints one JSON object with both: the final round's test figures, and the test figures of the round
the sites' validation split chose (the test split never chooses).

Usage (BreastMNIST, the recipe recorded in BENCHMARKS.md)::

    python -m simulations.bench_quality --recipe breastmnist
    python -m simulations.bench_quality --recipe adrenalmnist3d

``--data-dir`` points at the MedMNIST folder (default ``../shared/data/medmnist`` from the
repository root, or ``$MEDFED_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from simulations.pooled import run_pooled
from simulations.simulate import SimulationResult, run_federated

__all__ = ["RECIPES", "compare"]

RECIPES: dict[str, dict[str, Any]] = {
    "breastmnist": {
        "dataset": "breastmnist.npz",
        "model": "resnet18",
        "num-sites": 4,
        "partition": "dirichlet",
        "dirichlet-alpha": 0.5,
        "num-server-rounds": 30,
        "local-epochs": 1,
        "optimizer": "adam",
        "learning-rate": 0.001,
        "batch-size": 32,
    },
    "adrenalmnist3d": {
        "dataset": "adrenalmnist3d.npz",
        "model": "simplecnn",
        "num-sites": 4,
        "partition": "iid",
        "num-server-rounds": 10,
        "local-epochs": 2,
        "learning-rate": 0.05,
        "batch-size": 32,
    },
}
"""Named recipes; ``dataset`` is a file name inside the data folder."""


def _figures(result: SimulationResult, metric: str) -> dict[str, float]:
    best = dict(result.summary.get("best_metrics") or {})  # type: ignore[call-overload]
    return {
        f"final_{metric}": result.final_metrics.get(metric, float("nan")),
        # the test figure of the round the validation split chose (never the test split's best)
        f"selected_{metric}": best.get(metric, float("nan")),
        "selected_round": result.summary.get("best_round"),
        "final_accuracy": result.final_metrics.get("accuracy", float("nan")),
        "wall_s": result.wall_seconds,
    }


def compare(cfg: RunConfig, *, metric: str = "auc") -> dict[str, Any]:
    """Run ``cfg`` federated and pooled; return both sets of figures."""
    federated = run_federated(cfg)
    pooled = run_pooled(cfg)
    return {
        "federated": {**_figures(federated, metric), "run_dir": str(federated.run_dir)},
        "pooled": {**_figures(pooled, metric), "run_dir": str(pooled.run_dir)},
    }


def main() -> None:
    """Command-line entry point."""
    default_dir = os.environ.get("MEDFED_DATA_DIR", str(Path("..") / "shared" / "data" / "medmnist"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    parser.add_argument("--data-dir", default=default_dir)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="runs/bench-quality")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raw = dict(RECIPES[args.recipe])
    raw["dataset"] = str(Path(args.data_dir) / raw["dataset"])
    raw.update({"seed": args.seed, "run-dir": args.run_dir})
    for item in args.set:
        key, _, value = item.partition("=")
        raw[key] = value
    cfg = RunConfig.from_mapping(raw, source=f"recipe {args.recipe}")
    print(json.dumps({"recipe": args.recipe, "config": cfg.to_run_config(), **compare(cfg)}, indent=2))


if __name__ == "__main__":
    main()
