"""Federated detection end to end on a tiny synthetic box datalist: sites, server evaluation,
checkpoint selection by validation mAP50, the pooled baseline, DP-SGD with the ledger, SecAgg+."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.round_config import fit_config
from medfed.simulations.bench.quality import federate_in_process
from medfed.simulations.pooled import run_pooled
from tests.support.boxes import write_box_datalist


def _cfg(tmp_path: Path, **overrides: object) -> RunConfig:
    dataset = write_box_datalist(tmp_path / "data", train=12, val=4, test=4, size=64)
    values: dict[str, object] = {
        "dataset": str(dataset),
        "image_size": 64,
        "model": "retinanet",
        "norm": "group",
        "num_sites": 2,
        "num_server_rounds": 1,
        "local_epochs": 1,
        "batch_size": 4,
        "learning_rate": 0.001,
        "optimizer": "adam",
        "personalize": "off",
        "run_dir": str(tmp_path / "runs"),
        "ledger_dir": str(tmp_path / "ledgers"),
    }
    values.update(overrides)
    return RunConfig(**values)  # type: ignore[arg-type]


def test_one_federated_round_in_process(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    curve = federate_in_process(cfg)
    assert len(curve.global_metrics) == 2  # the initial model and round 1, scored on the test split
    final = curve.global_metrics[-1]
    assert {"map50", "map50-95", "loss", "num_examples"} <= set(final) and final["num_examples"] == 4
    assert 0.0 <= final["map50"] <= 1.0 and final["loss"] != curve.global_metrics[0]["loss"]
    initial = SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=0, num_sites=2), site_index=0)
    changed = [(a != b).any() for a, b in zip(curve.final_weights, initial.get_parameters({}), strict=True)]
    assert sum(changed) > len(changed) // 2  # the sites' averaged updates moved the global model


def test_site_fit_and_evaluate(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    site = SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=0, num_sites=2), site_index=0)
    weights = site.get_parameters({})
    trained, examples, metrics = site.fit(weights, fit_config(1))
    assert examples == len(site.data.train) and metrics["train-loss"] > 0
    assert [w.shape for w in trained] == [w.shape for w in weights]
    loss, count, scores = site.evaluate(trained, {})
    assert count == len(site.data.val) and loss > 0 and "map50" in scores


def test_dp_sgd_round_is_charged_to_the_ledger(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, dp=True, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, dp_secure_noise=False)
    site = SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=0, num_sites=2), site_index=0)
    weights = site.get_parameters({})
    trained, _, metrics = site.fit(weights, fit_config(1))
    assert metrics["dp-declined"] == 0 and metrics["dp-steps"] >= 1 and metrics["dp-epsilon"] > 0
    assert "train-loss" not in metrics  # not private: never sent under DP
    assert any((a != b).any() for a, b in zip(trained, weights, strict=True))
    assert site.open_ledger().epsilon(cfg.dp_delta) == pytest.approx(metrics["dp-epsilon"])


def test_pooled_selects_by_validation_map50(tmp_path: Path) -> None:
    result = run_pooled(_cfg(tmp_path))
    assert result.summary["best_selected_by"] == "validation map50"
    assert "map50" in result.final_metrics and (result.run_dir / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_simulate_with_ray(tmp_path: Path, secagg: bool) -> None:
    """``medfed simulate``'s engine (Flower on Ray), with SecAgg+ summing the detector's updates."""
    from medfed.simulations.simulate import run_federated

    cfg = _cfg(tmp_path, num_server_rounds=2, secagg=secagg, min_fit_clients=2)
    if secagg:
        cfg = cfg.replace(num_sites=3, min_fit_clients=3, secagg_num_shares=3, secagg_reconstruction_threshold=2)
    result = run_federated(cfg)
    assert result.summary["status"] == "finished"
    assert result.summary["best_selected_by"].endswith("map50")
    assert all("map50" in r.global_metrics for r in result.rounds)
