"""Segmentation on real data (issue 17): federated vs pooled vs local-only, one command per data set.

::

    python -m medfed.simulations.bench.segmentation --recipe isbi2012   # ISBI 2012 EM membranes
    python -m medfed.simulations.bench.segmentation --recipe kvasir     # Kvasir-SEG polyps (RGB)
    python -m medfed.simulations.bench.segmentation --recipe brats      # BraTS 2015 subset (6 patients)
    python -m medfed.simulations.bench.segmentation --recipe all

Each recipe (:data:`RECIPES`) writes the data set's datalist (:mod:`medfed.shared.data.layouts`,
files read in place from ``--data-dir``), then trains one MONAI UNet three ways with the same
model, schedule and epochs:

* ``federated``: the sites (``partition = "source"``: one site per source) train locally and
  FedAvg averages them each round (:func:`~medfed.simulations.bench.quality.federate_in_process`,
  no Ray);
* ``pooled``: the same model on all sites' training data together
  (:func:`~medfed.simulations.pooled.run_pooled`);
* ``local-only``: each site alone (its row holds the mean over sites, per site in ``sites``).

Training takes random patches of ``patch-size`` (half centred on foreground); every evaluation
scores whole (resized) images by sliding-window inference with that window. Each method's
figures are those of its validation-selected round (the best mean Dice on the validation
images its sites hold; the test split never chooses), on the test split: Dice per foreground
class (MONAI ``DiceMetric``, ``mean_batch``) and their mean. Rows go to ``docs/bench/results.json``
(section ``"segmentation"``, one row per data set and method, replaced on rerun).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfed.shared.config import RunConfig
from medfed.shared.config_sources import mapping_layer, resolve_config, set_layer
from medfed.simulations.bench.support import read_results_section, write_results_section

__all__ = ["RECIPES", "PUBLISHED", "run_recipe", "merge_rows", "main"]

logger = logging.getLogger(__name__)

SECTION = "segmentation"
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "bench" / "results.json"
DEFAULT_DATA_DIR = Path("../shared/data/segmentation")

_COMMON: dict[str, Any] = {
    "model": "unet", "norm": "instance", "optimizer": "adam", "learning-rate": 0.001, "partition": "source",
    "local-test-fraction": 0.0, "personalize": "off", "augment": True, "store": "off", "seed": 0,
}  # fmt: skip

RECIPES: dict[str, dict[str, Any]] = {
    "isbi2012": {
        "folder": "isbi2012-em", "layout": "isbi2012", "limit": 0,
        "config": {**_COMMON, "image-size": 256, "patch-size": 128, "num-sites": 3, "num-server-rounds": 12,
                   "local-epochs": 2, "batch-size": 4, "strategy": "fedavgm"},
    },
    "kvasir": {
        "folder": "kvasir-seg", "layout": "kvasir", "limit": 300,
        "config": {**_COMMON, "image-size": 96, "patch-size": 64, "num-sites": 3, "num-server-rounds": 8,
                   "local-epochs": 1, "batch-size": 8},
    },
    "brats": {
        "folder": "brats2015-subset", "layout": "brats", "limit": 0,
        "config": {**_COMMON, "image-size": 64, "patch-size": 48, "num-sites": 2, "num-server-rounds": 8,
                   "local-epochs": 4, "batch-size": 2},
    },
}  # fmt: skip
"""Per data set: its folder under ``--data-dir``, datalist layout and image limit, and the run
config every method shares. ISBI's federated run uses FedAvgM (server momentum 0.9): its sites
hold 6 slices each, and plain FedAvg stayed about 0.05 below pooled (BENCHMARKS.md). Sized so
that the three recipes take about 10 minutes on an idle 2-core CPU (``OMP_NUM_THREADS=1``) and
about half an hour each on a busy one (BENCHMARKS.md)."""

PUBLISHED: dict[str, dict[str, Any]] = {
    "isbi2012": {
        "figure": None,
        "note": "The ISBI 2012 challenge scores Rand, warping and pixel errors against its hidden test labels "
        "(Ciresan et al., NIPS 2012; U-Net, Ronneberger et al., MICCAI 2015); no published membrane Dice on "
        "a split of the 30 training slices at half resolution is comparable.",
    },
    "kvasir": {
        "figure": 0.8133,
        "note": "ResUNet++ (Jha et al., IEEE ISM 2019): Dice 0.8133, mIoU 0.7927 on Kvasir-SEG (its own "
        "train/test split of the 1000 images at 256x256, trained on a GPU); centralized.",
    },
    "brats": {
        "figure": None,
        "note": "BraTS 2015 results (e.g. DeepMedic, Kamnitsas et al. 2017, whole-tumour Dice 0.85-0.90) use "
        "hundreds of patients and the whole-tumour / core / enhancing regions; a 2-patient training set is "
        "a functional check only.",
    },
}
"""Published figures beside which the rows are shown (``None`` where none is comparable)."""

METHODS: tuple[str, ...] = ("federated", "pooled", "local-only")


def recipe_config(name: str, *, datalist: Path, run_dir: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of recipe ``name`` on ``datalist`` (``overrides``: ``KEY=VALUE`` items that win)."""
    recipe = mapping_layer({**RECIPES[name]["config"], "dataset": str(datalist), "run-dir": str(run_dir)},
                           source=f"recipe {name}")  # fmt: skip
    return resolve_config(recipe, set_layer(list(overrides))).config


def _dice(metrics: dict[str, Any]) -> dict[str, Any]:
    per_class = {k.removeprefix("dice-class-"): float(v) for k, v in metrics.items() if k.startswith("dice-class-")}
    return {"dice": dict(sorted(per_class.items(), key=lambda kv: int(kv[0]))), "dice_mean": float(metrics["dice"])}


def _scored(
    cfg: RunConfig, test: Any, val: Any, model: Any
) -> tuple[Callable[[list[np.ndarray]], float], Callable[[list[np.ndarray]], dict[str, Any]]]:
    """(validation mean Dice of weights, test Dice of weights) for ``model``'s shape."""
    from medfed.shared.training import evaluate, select_device
    from medfed.shared.weights import set_weights

    device = select_device()

    def on(data: Any, weights: list[np.ndarray]) -> dict[str, Any]:
        set_weights(model, weights)
        return evaluate(model, data, device=device, roi_size=cfg.patch_size, batch_size=8)

    return (lambda w: float(on(val, w)["dice"])), (lambda w: on(test, w))


def _federated(cfg: RunConfig) -> dict[str, Any]:
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.task import model_for
    from medfed.simulations.bench.quality import federate_in_process

    splits = load_dataset(cfg)
    val_dice, test_dice = _scored(cfg, splits.test, splits.val, model_for(cfg, splits.train))
    best: dict[str, Any] = {"score": -math.inf}
    history: list[float] = []

    def on_round(server_round: int, weights: list[np.ndarray]) -> None:
        score = val_dice(weights)
        history.append(score)
        if score > best["score"]:
            best.update(score=score, round=server_round, weights=weights)

    curve = federate_in_process(cfg, on_round=on_round)
    return {
        **_dice(test_dice(best["weights"])),
        "selected_round": best["round"],
        "val_dice_per_round": history,
        "final_round": _dice(curve.global_metrics[-1]),
    }


def _pooled(cfg: RunConfig) -> dict[str, Any]:
    from medfed.simulations.pooled import run_pooled

    result = run_pooled(cfg)
    summary = result.summary
    return {
        **_dice(dict(summary["best_metrics"])),  # type: ignore[arg-type]
        "selected_round": summary.get("best_round"),
        "val_dice_per_round": [float(r.eval_metrics.get("dice", float("nan"))) for r in result.rounds[1:]],
        "final_round": _dice(dict(summary["final_metrics"])),  # type: ignore[arg-type]
    }


def _local_only(cfg: RunConfig) -> dict[str, Any]:
    from medfed.client.site_client import SiteClient
    from medfed.client.site_data import simulated_site_data
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.round_config import fit_config
    from medfed.shared.seeding import seed_everything
    from medfed.shared.task import initial_model, model_for
    from medfed.shared.weights import get_weights

    splits = load_dataset(cfg)
    sites = []
    for i in range(cfg.num_sites):
        seed_everything(cfg.seed)
        data = simulated_site_data(cfg, site_index=i, num_sites=cfg.num_sites)
        site = SiteClient(cfg=cfg, data=data, site_index=i)
        val_dice, test_dice = _scored(cfg, splits.test, data.val, model_for(cfg, splits.train))
        seed_everything(cfg.seed)
        weights = get_weights(initial_model(cfg, splits.train))  # the federation's start (init-weights)
        best_score, best_round, best_weights = -math.inf, 0, weights
        for server_round in range(1, cfg.num_server_rounds + 1):
            weights, _, _ = site.fit(weights, fit_config(server_round))
            score = val_dice(weights)  # the site alone chooses on its own validation images
            if score > best_score:
                best_score, best_round, best_weights = score, server_round, weights
        sites.append({**_dice(test_dice(best_weights)), "selected_round": best_round, "train_images": len(data.train)})
    classes = sorted({k for s in sites for k in s["dice"]}, key=int)
    return {
        "dice": {k: float(np.mean([s["dice"][k] for s in sites if k in s["dice"]])) for k in classes},
        "dice_mean": float(np.mean([s["dice_mean"] for s in sites])),
        "sites": sites,
    }


_RUNNERS: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    "federated": _federated, "pooled": _pooled, "local-only": _local_only,
}  # fmt: skip


def run_recipe(
    name: str,
    *,
    data_dir: Path,
    workdir: Path,
    methods: Sequence[str] = METHODS,
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run recipe ``name``'s methods; one row per method (``dataset``, ``method``, ``dice``, ``dice_mean``...)."""
    from medfed.shared.data.layouts import write_segmentation_datalist
    from medfed.shared.data.loading import load_dataset

    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is unknown. Valid recipes: {', '.join(RECIPES)}, all.")
    recipe = RECIPES[name]
    datalist = workdir / f"{name}.json"
    write_segmentation_datalist(recipe["layout"], root=data_dir / recipe["folder"], out=datalist,
                                limit=recipe["limit"])  # fmt: skip
    cfg = recipe_config(name, datalist=datalist, run_dir=workdir / "runs", overrides=overrides)
    start = time.perf_counter()
    splits = load_dataset(cfg)
    load_seconds = time.perf_counter() - start
    sizes = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    rows = []
    for method in methods:
        if method not in _RUNNERS:
            raise ValueError(f"method {method!r} is unknown. Valid methods: {', '.join(_RUNNERS)}.")
        start = time.perf_counter()
        figures = _RUNNERS[method](cfg)
        seconds = time.perf_counter() - start
        row = {
            "dataset": name, "method": method, **figures, "seconds": round(seconds, 1),
            "load_seconds": round(load_seconds, 1), "images": sizes, "num_classes": splits.num_classes,
            "sources": sorted({str(s) for s in splits.train.sources}) if splits.train.sources is not None else [],
            "settings": {k: v for k, v in cfg.to_run_config().items() if k in recipe["config"] and k != "store"},
            "published": PUBLISHED[name],
        }  # fmt: skip
        logger.info("%s %s: mean Dice %.3f %s (%.0f s)", name, method, row["dice_mean"], row["dice"], seconds)
        print(f"{name:9s} {method:10s} mean Dice {row['dice_mean']:.3f}  per class {_fmt(row['dice'])}  "
              f"{seconds:.0f} s", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def _fmt(dice: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:.3f}" for k, v in dice.items())


def merge_rows(old: Sequence[dict[str, Any]] | None, new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows with those of the same (dataset, method) replaced by ``new``; sorted."""
    keyed = {(r["dataset"], r["method"]): r for r in (old or [])}
    keyed.update({(r["dataset"], r["method"]): r for r in new})
    order = {name: i for i, name in enumerate(RECIPES)}
    return sorted(keyed.values(), key=lambda r: (order.get(r["dataset"], 99), METHODS.index(r["method"])))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--recipe NAME`` (or ``all``), ``--data-dir``, ``--methods``, ``--no-write``."""
    parser = argparse.ArgumentParser(prog="python -m medfed.simulations.bench.segmentation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--recipe", required=True, choices=[*RECIPES, "all"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder holding isbi2012-em/, kvasir-seg/, brats2015-subset/ (default %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key of the recipe (a quick check: --set num-server-rounds=1)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print the rows; leave the results file alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    names = list(RECIPES) if args.recipe == "all" else [args.recipe]
    missing = [n for n in names if not (args.data_dir / RECIPES[n]["folder"]).is_dir()]
    if missing:
        parser.error(f"--data-dir {args.data_dir} lacks {', '.join(RECIPES[n]['folder'] for n in missing)}/ "
                     "(see ../shared/data/README.md)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medfed-seg-") as tmp:
        for name in names:
            rows = run_recipe(name, data_dir=args.data_dir, workdir=Path(tmp), methods=args.methods,
                              overrides=args.overrides)  # fmt: skip
            if not args.no_write:
                write_results_section(args.results, SECTION, merge_rows(read_results_section(args.results, SECTION), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
