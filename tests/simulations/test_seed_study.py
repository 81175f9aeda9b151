"""``medfed.simulations.bench.quality.seed_study``: federated and pooled figures per seed, with each seed's split."""

from __future__ import annotations

import math
from pathlib import Path

from medfed.shared.config import RunConfig
from medfed.simulations.bench.quality import seed_study


def test_each_seed_is_another_split_with_both_figures(tmp_path: Path) -> None:
    cfg = RunConfig(
        dataset="synthetic", synthetic_samples=96, model="simplecnn", image_size=16, batch_size=16,
        num_sites=3, num_server_rounds=1, partition="dirichlet", dirichlet_alpha=0.3,
        run_dir=str(tmp_path / "runs"), store="off",
    )
    study = seed_study(cfg, seeds=[0, 1])
    runs = study["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        counts = run["site_class_counts"]
        assert len(counts) == 3 and all(len(c) == 2 for c in counts)
        assert 0.0 <= run["federated_auc"] <= 1.0 and 0.0 <= run["pooled_auc"] <= 1.0
        assert math.isfinite(run["federated_s"])
    # the seed changes the Dirichlet split (and every site's class counts add up to the same total)
    assert runs[0]["site_class_counts"] != runs[1]["site_class_counts"]
    assert sum(map(sum, runs[0]["site_class_counts"])) == sum(map(sum, runs[1]["site_class_counts"]))
    assert study["federated"].endswith("(n=2)") and study["pooled"].endswith("(n=2)")
    assert len(list(tmp_path.glob("runs/*-pooled-*"))) == 2  # one pooled run directory per seed


def test_federated_only_skips_the_pooled_baseline(tmp_path: Path) -> None:
    cfg = RunConfig(
        dataset="synthetic", synthetic_samples=64, model="simplecnn", image_size=16, batch_size=16,
        num_sites=2, num_server_rounds=1, run_dir=str(tmp_path / "runs"), store="off",
    )
    study = seed_study(cfg, seeds=[3], pooled=False)
    assert "pooled" not in study and "pooled_auc" not in study["runs"][0]
    assert 0.0 <= study["runs"][0]["federated_auc"] <= 1.0
    assert not list(tmp_path.glob("runs/*-pooled-*"))  # no pooled run directory was made
