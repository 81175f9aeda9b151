"""Benchmark: federated vs pooled test metrics for one recipe, measured in one run.

Runs the federated simulation and the pooled baseline (same model, loop, total epochs, test split)
and prints one JSON object with both: the final round's test figures, and the test figures of the round
the sites' validation split chose (the test split never chooses).

Usage (BreastMNIST, the recipe recorded in BENCHMARKS.md)::

    python -m medfed.simulations.bench.quality --recipe breastmnist
    python -m medfed.simulations.bench.quality --recipe adrenalmnist3d

Over several seeds (each seed is another Dirichlet split and another initialisation), federated
in one process (:func:`federate_in_process`, no Ray) with the pooled baseline of the same seed,
printing each site's training class counts beside the test AUC::

    python -m medfed.simulations.bench.quality --recipe breastmnist --seeds 0 1 2 3 4
    python -m medfed.simulations.bench.quality --recipe breastmnist --seeds 2 3 --federated-only

The quality study of issue 14 (four datasets, IID and Dirichlet splits, five seeds, federated vs
pooled vs local-only, rows into ``docs/bench/results.json``; :mod:`.quality_study`)::

    python -m medfed.simulations.bench.quality --study

``--data-dir`` points at the MedMNIST folder (default ``../shared/data/medmnist`` from the
repository root, or ``$MEDFED_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.server.evaluation import make_evaluate_fn
from medfed.server.strategies import build_strategy
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.config_sources import flag_layer, mapping_layer, resolve_config, set_layer
from medfed.shared.data.loading import load_dataset
from medfed.shared.precision import eval_dtype
from medfed.shared.round_config import fit_config
from medfed.shared.seeding import seed_everything
from medfed.shared.task import initial_model, model_for
from medfed.shared.training import select_device
from medfed.shared.weights import get_weights, trainable_mask
from medfed.simulations.bench.support import line_plot, mean_spread, medmnist_file, ratio
from medfed.simulations.pooled import run_pooled
from medfed.simulations.simulate import SimulationResult, run_federated

if TYPE_CHECKING:
    from medfed.simulations.bench import BenchContext, SectionResult

__all__ = [
    "RECIPES", "PUBLISHED", "compare", "Curve", "federate_in_process", "local_models", "local_only", "quality_section",
    "seed_study",
]

logger = logging.getLogger(__name__)

RECIPES: dict[str, dict[str, Any]] = {
    "breastmnist": {
        "dataset": "breastmnist.npz",
        "model": "resnet18",
        "num-sites": 4,
        "partition": "dirichlet",
        "dirichlet-alpha": 0.5,
        "num-server-rounds": 50,
        "local-epochs": 1,
        "optimizer": "adam",
        "learning-rate": 0.001,
        "batch-size": 32,
        "augment": False,
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

PUBLISHED: dict[str, str] = {
    "breastmnist": "0.901 (ResNet-18, 28 px, pooled; MedMNIST v2 Table 3)",
    "adrenalmnist3d": "about 0.83 (3D ResNet-18, 28^3, pooled; not verified)",
}
"""Published centralized test AUC (``../shared/BENCHMARKS.md``), quoted beside the measured figures."""

TARGETS: dict[str, float] = {"breastmnist": 0.88, "adrenalmnist3d": 0.80}
"""Issue 2's federated test AUC targets (4 sites)."""

SUITE_RECIPES: dict[str, dict[str, Any]] = {
    "breastmnist": {"dataset": "breastmnist.npz", "model": "simplecnn", "learning-rate": 0.05, "batch-size": 32},
    "adrenalmnist3d": {"dataset": "adrenalmnist3d.npz", "model": "simplecnn", "learning-rate": 0.05, "batch-size": 32},
}
"""What the benchmark suite (``medfed bench``, section ``quality``) trains: the small model, so that
the whole grid of splits, sites, strategies and seeds fits in the full profile's hour."""


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


# --------------------------------------------------------------------------- in-process federation
@dataclass
class Curve:
    """What one in-process run produced.

    Attributes
    ----------
    global_metrics
        Test-split metrics of the global model per round; index 0 is the initial model.
    final_weights
        The global model's state after the last round (arrays in ``get_weights`` order).
    seconds
        Wall time of the run.
    """

    global_metrics: list[dict[str, float]] = field(default_factory=list)
    final_weights: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0

    def final(self, metric: str) -> float:
        """``metric`` after the last round (``nan`` when absent)."""
        return float(self.global_metrics[-1].get(metric, float("nan"))) if self.global_metrics else float("nan")

    def series(self, metric: str) -> list[float]:
        """``metric`` per round, round 0 first (``nan`` where absent)."""
        return [float(m.get(metric, float("nan"))) for m in self.global_metrics]


def federate_in_process(
    cfg: RunConfig,
    *,
    sites: list[SiteClient] | None = None,
    on_round: Callable[[int, list[np.ndarray]], None] | None = None,
    on_update: Callable[[int, int, list[np.ndarray], list[np.ndarray]], None] | None = None,
) -> Curve:
    """Federated training of ``cfg`` with medfed's sites and Flower's strategy, in this process.

    The same pieces as a simulation, without the transport: every site is a
    :class:`~medfed.client.site_client.SiteClient` (local training, FedProx term, BatchNorm
    re-estimation, DP-SGD with its ledger and budget when ``cfg.dp``), the strategy is
    :func:`medfed.server.strategies.build_strategy`'s Flower ``FedAvg`` / ``FedProx`` / ``FedAdam``, whose
    own ``aggregate_fit`` combines the sites' results and whose ``evaluate`` scores the global
    model on the test split after each round. Sites run one after the other; no Ray, no
    messages, so hundreds of runs fit in a benchmark (the transport's cost is measured by the
    ``overhead`` and ``peers`` sections).

    Parameters
    ----------
    sites
        The sites (default: ``cfg``'s simulated sites, :func:`medfed.client.site_data.simulated_site_data`);
        tests pass sites cut their own way.
    on_round
        Called after each round's aggregation with the round number and the global weights
        (``get_weights`` order), e.g. to score them on validation data.
    on_update
        Called with ``(round, site_index, received, returned)`` for every site's result, as a
        server without SecAgg+ sees it: the weights the site received and those it sent back
        (:class:`medfed.simulations.membership.UpdateAttack` observes them).

    Returns
    -------
    Curve
        Global test metrics per round and the final weights.
    """
    start = time.perf_counter()
    seed_everything(cfg.seed)
    splits = load_dataset(cfg)
    model = initial_model(cfg, splits.train)  # with init-weights loaded
    initial = get_weights(model)
    strategy = build_strategy(
        cfg,
        initial_weights=initial,
        evaluate_fn=make_evaluate_fn(
            model_for(cfg, splits.train),
            splits.test,
            val=splits.val,
            bn_data=splits.train if cfg.bn_mode != "global" else None,
            roi_size=cfg.patch_size,
            dtype=eval_dtype(cfg.eval_precision, device=select_device("auto"), task=splits.task),
            threshold_rule=cfg.decision_threshold,
        ),
        min_available_clients=cfg.num_sites,
        trainable=trainable_mask(model),
    )
    if sites is None:
        sites = [
            SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=i, num_sites=cfg.num_sites), site_index=i)
            for i in range(cfg.num_sites)
        ]
    parameters: Parameters = ndarrays_to_parameters(initial)
    curve = Curve()
    curve.global_metrics.append(_server_evaluate(strategy, 0, parameters))
    no_proxy = cast(ClientProxy, None)  # Flower's aggregation reads only the FitRes
    for server_round in range(1, cfg.num_server_rounds + 1):
        weights = parameters_to_ndarrays(parameters)
        sent = strategy.fit_parameters(server_round, weights) if hasattr(strategy, "fit_parameters") else weights
        results = []
        for site_index, site in enumerate(sites):
            new, num_examples, metrics = site.fit(sent, fit_config(server_round))
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(new), num_examples, metrics)
            results.append((no_proxy, res))
            if on_update is not None:
                on_update(server_round, site_index, sent, new)
        aggregated, _ = strategy.aggregate_fit(server_round, results, [])
        if aggregated is not None:  # None: every site declined (DP budget); the model stays
            parameters = aggregated
        curve.global_metrics.append(_server_evaluate(strategy, server_round, parameters))
        if on_round is not None:
            on_round(server_round, parameters_to_ndarrays(parameters))
    curve.final_weights = parameters_to_ndarrays(parameters)
    curve.seconds = time.perf_counter() - start
    return curve


def _server_evaluate(strategy: Any, server_round: int, parameters: Parameters) -> dict[str, float]:
    evaluated = strategy.evaluate(server_round, parameters)
    if evaluated is None:
        return {}
    loss, metrics = evaluated
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}


def local_models(cfg: RunConfig) -> list[list[np.ndarray]]:
    """Each site trains alone on its own data (the same rounds, epochs and schedule, no averaging).

    Returns
    -------
    list
        Per site (in site order), its own model's weights after the last round (``get_weights`` order).
    """
    seed_everything(cfg.seed)
    start = get_weights(initial_model(cfg, load_dataset(cfg).train))  # the federation's initial model
    out: list[list[np.ndarray]] = []
    for i in range(cfg.num_sites):
        site = SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=i, num_sites=cfg.num_sites), site_index=i)
        weights = start
        for server_round in range(1, cfg.num_server_rounds + 1):
            weights, _, _ = site.fit(weights, fit_config(server_round))
        out.append(weights)
    return out


def local_only(cfg: RunConfig) -> list[dict[str, float]]:
    """The test-split metrics of each site's own model (:func:`local_models`), in site order."""
    splits = load_dataset(cfg)
    evaluate_fn = make_evaluate_fn(model_for(cfg, splits.train), splits.test, roi_size=cfg.patch_size,
                                   dtype=eval_dtype(cfg.eval_precision, device=select_device("auto"), task=splits.task))
    out: list[dict[str, float]] = []
    for weights in local_models(cfg):
        loss, metrics = evaluate_fn(cfg.num_server_rounds, weights, {})
        out.append({"loss": loss, **{k: float(v) for k, v in metrics.items()}})
    return out


def seed_study(cfg: RunConfig, *, seeds: list[int], metric: str = "auc", pooled: bool = True) -> dict[str, Any]:
    """Federated (in process) and pooled ``metric`` for ``cfg`` under each of ``seeds``.

    Parameters
    ----------
    pooled
        Also train the pooled baseline of each seed (as long again as the federated run on a
        CPU); without it the pooled figures are absent.

    Returns
    -------
    dict
        ``runs``: per seed, the sites' training class counts, the federated and (with ``pooled``)
        pooled final ``metric``; ``federated`` and ``pooled``: mean ± sd over the seeds.
    """
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        seeded = cfg.replace(seed=seed)
        sites = [simulated_site_data(seeded, site_index=i, num_sites=seeded.num_sites) for i in range(seeded.num_sites)]
        counts = [
            np.bincount(site.train.targets, minlength=site.train.num_classes).tolist()
            if site.train.task == "classification"
            else []
            for site in sites
        ]
        federated = federate_in_process(seeded)
        run: dict[str, Any] = {
            "seed": seed,
            "site_class_counts": counts,
            f"federated_{metric}": round(federated.final(metric), 4),
            "federated_s": round(federated.seconds, 1),
        }
        if pooled:
            run[f"pooled_{metric}"] = round(run_pooled(seeded).final_metrics.get(metric, float("nan")), 4)
        runs.append(run)
        logger.warning("seed %d: %s", seed, json.dumps(run))
    study: dict[str, Any] = {"runs": runs, "federated": mean_spread([r[f"federated_{metric}"] for r in runs])}
    if pooled:
        study["pooled"] = mean_spread([r[f"pooled_{metric}"] for r in runs])
    return study


# --------------------------------------------------------------------------- benchmark section
_STRATEGY_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam"}


def quality_section(ctx: BenchContext) -> SectionResult:
    """Section ``quality`` of ``medfed bench``: pooled, local-only and federated test AUC.

    For every recipe of ``ctx.profile.quality_recipes`` (BreastMNIST, AdrenalMNIST3D with the
    small model of :data:`SUITE_RECIPES`), every number of sites and every split: the pooled
    baseline (:func:`~medfed.simulations.pooled.run_pooled`, the same epochs on all the data), each
    site alone (:func:`local_only`; best and worst site) and each strategy
    (:func:`federate_in_process`); test AUC after the last round, mean ± standard deviation over
    the profile's seeds. Plots: global test AUC per round (mean over seeds), one per recipe.
    """
    from medfed.simulations.bench import SectionResult, Table, Target

    p = ctx.profile
    strategies = [_STRATEGY_NAMES[s] for s in p.quality_strategies]
    columns = ["dataset", "sites", "split", "pooled AUC", "local-only best", "local-only worst", *strategies]
    columns += [f"{s} / pooled" for s in strategies] + ["published (centralized)"]
    table = Table(title="Test AUC after the last round (mean ± sd over seeds)", columns=columns)
    result = SectionResult(tables=[table])
    for recipe in p.quality_recipes:
        spec = SUITE_RECIPES[recipe]
        is_3d = recipe.endswith("3d")
        try:
            path = medmnist_file(ctx.data_dir, spec["dataset"], workdir=ctx.workdir, train=p.slice_train,
                                 val=p.slice_val, test=p.slice_test)
        except FileNotFoundError as err:
            table.add_unavailable(f"not available: {err}", recipe)
            result.targets.append(Target(f"{recipe}: federated test AUC", "issue 2", f">= {TARGETS[recipe]:g}",
                                         "n/a: data not available", None))
            continue
        rounds = p.quality_rounds_3d if is_3d else p.quality_rounds
        base = RunConfig(
            dataset=str(path), model=spec["model"], learning_rate=spec["learning-rate"], batch_size=spec["batch-size"],
            num_server_rounds=rounds, local_epochs=p.quality_local_epochs, store="off",
            run_dir=str(ctx.workdir / "runs" / "quality"), image_size=p.image_size_3d if is_3d else 0,
        )
        pooled = {seed: run_pooled(base.replace(seed=seed)) for seed in p.seeds}
        pooled_auc = [pooled[s].final_metrics.get("auc", float("nan")) for s in p.seeds]
        curves: dict[str, list[list[float]]] = {
            "pooled": [[r.global_metrics.get("auc", float("nan")) for r in pooled[s].rounds] for s in p.seeds]
        }
        for sites in p.quality_sites:
            for split in p.quality_splits:
                cfg = base.replace(num_sites=sites, partition=split, dirichlet_alpha=0.5)
                best, worst = [], []
                fed: dict[str, list[float]] = {s: [] for s in p.quality_strategies}
                for seed in p.seeds:
                    alone = [m.get("auc", float("nan")) for m in local_only(cfg.replace(seed=seed))]
                    best.append(max(alone))
                    worst.append(min(alone))
                    for strategy in p.quality_strategies:
                        curve = federate_in_process(cfg.replace(seed=seed, strategy=strategy))
                        fed[strategy].append(curve.final("auc"))
                        if sites == max(p.quality_sites) and split == p.quality_splits[-1]:
                            curves.setdefault(_STRATEGY_NAMES[strategy], []).append(curve.series("auc"))
                pooled_mean = _mean(pooled_auc)
                if sites == p.quality_sites[0] and split == p.quality_splits[-1]:
                    best_fl = max(p.quality_strategies, key=lambda s: _mean(fed[s]) if fed[s] else float("-inf"))
                    result.targets.append(Target.check(
                        f"{recipe}: federated test AUC ({_STRATEGY_NAMES[best_fl]}, {sites} sites, "
                        f"{'IID' if split == 'iid' else 'Dirichlet 0.5'}, mean over seeds)", "issue 2",
                        value=_mean(fed[best_fl]), at_least=TARGETS[recipe], digits=3,
                        limits=f"the suite's small model (simplecnn) and schedule ({rounds} rounds x "
                        f"{p.quality_local_epochs} epoch(s)), chosen so the grid fits the hour; pooled AUC of the same "
                        f"model {pooled_mean:.3f}, so the model and schedule, not federation alone, limit it",
                    ))
                table.add(
                    recipe, sites, "IID" if split == "iid" else "Dirichlet 0.5", mean_spread(pooled_auc),
                    mean_spread(best), mean_spread(worst), *[mean_spread(fed[s]) for s in p.quality_strategies],
                    *[ratio(_mean(fed[s]), pooled_mean) for s in p.quality_strategies], PUBLISHED[recipe],
                )
        split_label = "IID" if p.quality_splits[-1] == "iid" else "Dirichlet 0.5"
        series = {label: (list(range(rounds + 1)), [_mean(list(col)) for col in zip(*runs, strict=True)]) for label, runs in curves.items()}
        result.plots.append(
            line_plot(
                ctx.plot_path(f"quality-{recipe}.png"), series=series,
                title=f"{recipe}: global test AUC per round ({max(p.quality_sites)} sites, {split_label}; mean of "
                f"{len(p.seeds)} seed(s))",
                xlabel="round (pooled: epochs / local epochs)", ylabel="test AUC",
            )
        )
    size_3d = f"{p.image_size_3d}^3" if p.image_size_3d else "28^3"
    slices = (
        f"class-stratified slices of {p.slice_train}/{p.slice_val}/{p.slice_test} train/val/test images"
        if p.slice_train else "the whole files (official train/val/test splits)"
    )
    table.notes.append(
        f"Conditions: simplecnn (MONAI-style 3-block CNN, BatchNorm), SGD 0.05 with a cosine schedule, batch 32, "
        f"flips and shifts; {p.quality_rounds} rounds (AdrenalMNIST3D: {p.quality_rounds_3d}) x {p.quality_local_epochs} "
        "local epoch(s); pooled: the same number of epochs on all training data; local-only: each site alone for "
        f"the same epochs, best and worst site's test AUC; AdrenalMNIST3D resized to {size_3d}; data: {slices}; "
        f"seeds {', '.join(str(s) for s in p.seeds)}. Federated runs drive medfed's SiteClient and Flower's "
        "strategies in one process (`federate_in_process`): the same training and aggregation as a simulation, "
        "without Ray. The published figures are for ResNet-18 at full resolution: an anchor, not the same model."
    )
    result.commands.append(ctx.reproduce("quality"))
    return result


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.mean(finite) if finite else float("nan")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``--study``: the quality study, :mod:`.quality_study`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--study" in argv:
        from medfed.simulations.bench.quality_study import main as study_main

        raise SystemExit(study_main([a for a in argv if a != "--study"]))
    default_dir = os.environ.get("MEDFED_DATA_DIR", str(Path("..") / "shared" / "data" / "medmnist"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--study", action="store_true",
        help="run the quality study instead (four datasets, splits, seeds, methods; see --study --help)",
    )
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    parser.add_argument("--data-dir", default=default_dir)
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: the run config's, 0)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None,
        help="run these seeds federated in one process (no Ray) with the pooled baseline of each",
    )
    parser.add_argument(
        "--federated-only", action="store_true",
        help="with --seeds: skip the pooled baselines (they take as long again as the federated runs)",
    )
    parser.add_argument("--run-dir", default="runs/bench-quality")
    parser.add_argument("--set", action="append", default=[], help="any run-config key: --set key=value (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    recipe = dict(RECIPES[args.recipe])
    recipe["dataset"] = str(Path(args.data_dir) / recipe["dataset"])
    try:
        cfg = resolve_config(
            mapping_layer(recipe, source=f"recipe {args.recipe}"),
            flag_layer({"seed": args.seed, "run-dir": args.run_dir}, flags={}),
            set_layer(args.set),
        ).config
    except ConfigError as err:
        parser.error(str(err))
    if args.federated_only and not args.seeds:
        parser.error("--federated-only goes with --seeds (the single-seed run always compares with pooled)")
    figures = seed_study(cfg, seeds=args.seeds, pooled=not args.federated_only) if args.seeds else compare(cfg)
    print(json.dumps({"recipe": args.recipe, "config": cfg.to_run_config(), **figures}, indent=2))


if __name__ == "__main__":
    main()
