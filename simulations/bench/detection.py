"""Benchmark: federated vs pooled vs local-only object detection (RetinaNet) on BCCD.

BCCD (blood-cell detection, 3 classes, Pascal VOC) is converted into a box datalist
(:func:`medfed.shared.data.boxes.voc_to_datalist`, images referenced in place) and trained with
the official ``train`` / ``val`` / ``test`` image sets:

* ``federated``: ``--sites`` sites, an IID split of the training images (BCCD records no image
  source, so there is no natural split by site), FedAvg, one local epoch per round, in one
  process (:func:`medfed.simulations.bench.quality.federate_in_process`: the sites' own
  ``SiteClient`` and Flower's strategy, without Ray's transport);
* ``pooled``: the same model and loop on all training images, one epoch per round
  (:func:`medfed.simulations.pooled.run_pooled`);
* ``local-only``: each site trains alone for the same rounds (its own data only); the mean
  over the sites is reported.

Every method is scored on the official test split after the last round (mAP at IoU 0.5 and
0.5:0.95, per class). Each method can run in its own process (``--methods federated``), so the
three can run side by side; each writes ``<work>/<method>.json`` and, once all three are there,
the ``"detection"`` section of ``docs/bench/results.json`` is rewritten from them::

    python -m medfed.simulations.bench.detection                      # all three, one after another
    python -m medfed.simulations.bench.detection --methods pooled     # one; rerun --collect after
    python -m medfed.simulations.bench.detection --collect            # write results.json from <work>
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from medfed.shared.config import RunConfig
from medfed.shared.data.boxes import voc_to_datalist

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("federated", "pooled", "local-only")
SECTION = "detection"
DEFAULT_VOC = Path("../shared/data/detection/bccd")
RESULTS = Path("docs/bench/results.json")


def bench_config(args: argparse.Namespace, dataset: Path) -> RunConfig:
    """The run config every method shares."""
    return RunConfig(
        dataset=str(dataset),
        image_size=args.image_size,
        model="retinanet",
        norm=args.norm,
        num_sites=args.sites,
        partition="iid",
        strategy=args.strategy,
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer="adam",
        augment=True,
        local_test_fraction=0.0,
        personalize="off",
        seed=args.seed,
        run_dir=str(args.work / "runs"),
    )


def _figures(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items() if k.startswith("map50")}


def run_method(method: str, cfg: RunConfig) -> dict[str, Any]:
    """Train and score one method; its test figures after the last round."""
    start = time.perf_counter()
    if method == "federated":
        from medfed.simulations.bench.quality import federate_in_process

        curve = federate_in_process(cfg)
        figures = _figures(curve.global_metrics[-1])
        extra: dict[str, Any] = {"map50_by_round": [round(v, 4) for v in curve.series("map50")]}
    elif method == "pooled":
        from medfed.simulations.pooled import run_pooled

        result = run_pooled(cfg)
        figures = _figures(result.final_metrics)
        best = dict(result.summary.get("best_metrics") or {})  # type: ignore[call-overload]
        extra = {
            "selected_round": result.summary.get("best_round"),
            "selected_map50": best.get("map50"),
            "map50_by_round": [round(float(r.global_metrics.get("map50", float("nan"))), 4) for r in result.rounds],
        }
    elif method == "local-only":
        from medfed.simulations.bench.quality import local_only

        sites = [_figures(m) for m in local_only(cfg)]
        keys = sorted(set.intersection(*(set(s) for s in sites)))
        figures = {k: round(statistics.mean(s[k] for s in sites), 4) for k in keys}
        extra = {"per_site_map50": [s.get("map50") for s in sites]}
    else:
        raise ValueError(f"method {method!r} is invalid. Valid: {', '.join(METHODS)}.")
    return {
        "dataset": "bccd",
        "method": method,
        "map50": figures.get("map50"),
        "map50_95": figures.get("map50-95"),
        "per_class": {k: v for k, v in figures.items() if k not in ("map50", "map50-95")},
        "sites": cfg.num_sites if method != "pooled" else 1,
        "rounds": cfg.num_server_rounds,
        "epochs_per_round": cfg.local_epochs,
        "image_size": cfg.image_size,
        "wall_s": round(time.perf_counter() - start, 1),
        **extra,
    }


def collect(work: Path, results: Path) -> list[dict[str, Any]] | None:
    """Write the ``detection`` section of ``results``: the rows already there, replaced or joined
    by ``work/<method>.json`` and the variants ``work/<method>-<label>.json``.

    The section is written only once the three methods (batch-8 rows) are in it, from either place.
    """
    data = json.loads(results.read_text()) if results.exists() else {}
    rows: dict[str, dict[str, Any]] = {row["method"]: row for row in data.get(SECTION, []) if "method" in row}
    parts = [work / f"{m}.json" for m in METHODS] + sorted(work.glob("*-*.json"))
    for part in parts:
        if not part.exists():
            continue
        row = json.loads(part.read_text())
        if isinstance(row, dict) and "method" in row:
            rows[row["method"]] = row
    missing = [m for m in METHODS if m not in rows]
    if missing:
        logger.warning("no %s row yet (run --methods %s): results.json is not updated", ", ".join(missing), " ".join(missing))
        return None
    ordered = [rows.pop(m) for m in METHODS] + list(rows.values())  # the three methods first, then variants
    data[SECTION] = ordered
    results.write_text(json.dumps(data, indent=2) + "\n")
    return ordered


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    lines = ["| method | mAP50 | mAP50:95 | per class mAP50 | wall s |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        per_class = ", ".join(
            f"{k.removeprefix('map50-')} {v:.3f}" for k, v in row["per_class"].items() if not k.startswith("map50-95")
        )
        lines.append(f"| {row['method']} | {row['map50']:.3f} | {row['map50_95']:.3f} | {per_class} | {row['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=Path, default=DEFAULT_VOC, help="the BCCD Pascal VOC folder")
    parser.add_argument("--work", type=Path, default=Path("runs/detection-bench"), help="datalist, runs, partial results")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--collect", action="store_true", help="only write results.json from the partial results")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--local-epochs", type=int, default=1,
                        help="epochs trained per round (each site; the pooled model too)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--norm", default="group")
    parser.add_argument("--strategy", default="fedavg", help="federated strategy (default fedavg)")
    parser.add_argument("--label", default="", help="suffix of the method name in the rows (a variant's name)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("medfed").setLevel(logging.INFO)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        dataset = args.work / "bccd-datalist.json"
        voc_to_datalist(args.voc, dataset)
        cfg = bench_config(args, dataset)
        for method in args.methods:
            row = run_method(method, cfg)
            row["batch_size"], row["strategy"] = cfg.batch_size, cfg.strategy if method == "federated" else None
            name = f"{method}-{args.label}" if args.label else method
            row["method"] = name
            (args.work / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    rows = collect(args.work, args.results)
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main()
