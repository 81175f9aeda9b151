"""A small, real run directory for the report and tracking tests, written by medfed's own writer.

:func:`make_run` writes ``config.json``, ``metrics.jsonl``, the checkpoints and ``summary.json``
through :class:`medfed.server.run_dir.RunDirectory` (optionally into a run store), with a real,
untrained ``simplecnn`` on synthetic data, so the report can recompute the class mix and the
calibration. The rounds' figures are fixed (:data:`ROUNDS`), so tests can compare what the report
or an export shows with them. :func:`write_cross_site` and :func:`write_explanations` add the
other helpers' files in exactly their documented shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medfed.server.run_dir import RoundRecord, RunDirectory, new_run_path
from medfed.shared.config import RunConfig

SITES = ("site-0", "site-1")
GLOBAL_AUC = {0: 0.5, 1: 0.71, 2: 0.83}
SITE_AUC = {"site-0": {1: 0.66, 2: 0.9}, "site-1": {1: 0.61, 2: 0.74}}
EPSILON = {1: 1.25, 2: 1.9}
FAB_SHA256 = "ab12" * 16


def small_config(run_dir: Path, **overrides: Any) -> RunConfig:
    """The run config of :func:`make_run`: 2 sites, synthetic 16x16 images, simplecnn, DP-SGD."""
    values: dict[str, Any] = {
        "dataset": "synthetic", "synthetic_samples": 64, "model": "simplecnn", "norm": "group", "image_size": 16,
        "num_sites": 2, "num_server_rounds": 2, "augment": False, "dp": True, "dp_secure_noise": False,
        "dp_budget_epsilon": 8.0, "run_dir": str(run_dir), "store": "off",
    }
    values.update(overrides)
    return RunConfig(**values)


def _record(n: int) -> RoundRecord:
    record = RoundRecord(round=n, seconds=0.0 if n == 0 else 1.5 + n)
    record.global_metrics = {"auc": GLOBAL_AUC[n], "accuracy": 0.6 + n / 20, "balanced-accuracy": 0.6,
                             "sensitivity": 0.7, "specificity": 0.55, "threshold": 0.42, "loss": 0.7 - n / 20,
                             "num_examples": 16.0}
    if n == 0:
        return record
    record.num_fit_results = 2
    record.eval_metrics = {"auc": sum(SITE_AUC[s][n] for s in SITES) / 2, "loss": 0.6}
    record.fit_metrics = {"dp-epsilon": EPSILON[n]}
    record.sites = {
        site: {
            "fit": {"num_examples": 20.0 + i, "dp-epsilon": EPSILON[n] + i / 10, "dp-delta": 1e-5,
                    "dp-budget-epsilon": 8.0, "dp-noise-multiplier": 1.1, "dp-sample-rate": 0.25,
                    "dp-steps": 4.0, "dp-declined": 0.0},
            "eval": {"num_examples": 6.0, "auc": SITE_AUC[site][n], "accuracy": 0.5, "balanced-accuracy": 0.5,
                     "sensitivity": 0.5, "specificity": 0.5, "threshold": 0.5, "loss": 0.6},
        }
        for i, site in enumerate(SITES)
    }
    return record


def make_run(root: Path, *, sink: Any = None, rounds: int = 2, finish: bool = True, **overrides: Any) -> Path:
    """Write a run directory under ``root`` (rounds 0..``rounds``, both checkpoints, the summary)."""
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.task import model_for

    cfg = small_config(root, **overrides)
    model = model_for(cfg, load_dataset(cfg).train)
    run = RunDirectory(new_run_path(root, name="fedavg-s0"), config=cfg.to_run_config(), mode="federated", sink=sink)
    for n in range(rounds + 1):
        run.write_round(_record(n))
    if finish:
        run.save_checkpoint("best", model, server_round=rounds, metrics=_record(rounds).global_metrics)
        run.save_checkpoint("final", model, server_round=rounds, metrics=_record(rounds).global_metrics)
        run.write_summary({"status": "finished", "rounds": rounds, "primary_metric": "auc", "best_round": rounds,
                           "best_selected_by": "validation auc", "final_metrics": _record(rounds).global_metrics,
                           "single_class": {"final": False, "selected": False}})
    return run.path


CROSS_SITE = {
    "checkpoint": "final", "round": 2, "task": "classification", "min_count": 5,
    "sites": [
        {"site": "site-0", "n": 40, "suppressed": 1,
         "metrics": {"auc": 0.812, "accuracy": 0.75, "balanced-accuracy": 0.74, "sensitivity": 0.7,
                     "specificity": 0.78, "threshold": 0.44},
         "subgroups": [
             {"key": "sex", "value": "F", "n": 22, "metrics": {"auc": 0.851, "accuracy": 0.8}},
             {"key": "sex", "value": "M", "n": 18, "metrics": {"auc": 0.764, "accuracy": 0.7}},
         ]},
        {"site": "site-1", "n": 35, "suppressed": 0,
         "metrics": {"auc": 0.733, "accuracy": 0.69, "balanced-accuracy": 0.68, "sensitivity": 0.66,
                     "specificity": 0.7, "threshold": 0.51},
         "subgroups": []},
    ],
    "gaps": [{"key": "sex", "metric": "auc", "best_value": "F", "best": 0.851, "worst_value": "M", "worst": 0.764,
              "gap": 0.087}],
}


def write_cross_site(run: Path) -> None:
    """``<run>/cross_site.json`` in the cross-site evaluation's shape (:data:`CROSS_SITE`)."""
    (run / "cross_site.json").write_text(json.dumps(CROSS_SITE))


def write_explanations(folder: Path, *, count: int = 3) -> list[dict[str, Any]]:
    """A ``medfed explain --out`` folder: ``count`` small PNG maps and ``index.json`` (docs/explain.md's shape)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        ramp = (np.linspace(0, 255, 32 * 32).reshape(32, 32) * (i + 1) % 256).astype(np.uint8)
        Image.fromarray(ramp).convert("RGB").save(folder / f"map-{i}.png")
        rows.append({"index": i, "predicted": i % 2, "probability": 0.6 + i / 10, "explained": i % 2, "label": 1,
                     "method": "gradcam", "png": f"map-{i}.png", "nifti": None})
    index = {"method": "gradcam", "target_layer": "features.conv2", "count": count, "split": "test",
             "model": "simplecnn", "checkpoint_round": 2, "rows": rows}  # as medfed.shared.explain writes it
    (folder / "index.json").write_text(json.dumps(index))
    return rows
