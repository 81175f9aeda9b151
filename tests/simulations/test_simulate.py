"""End to end: a real Flower simulation (Ray) of medfed's ServerApp and ClientApp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medfed.client.egress import AUDIT_ENV
from medfed.server.run_dir import read_metrics
from medfed.shared.config import RunConfig
from medfed.shared.data.loading import load_dataset
from medfed.shared.task import model_for
from medfed.simulations.simulate import run_federated

SMALL = dict(dataset="synthetic", synthetic_samples=96, model="simplecnn", num_sites=2,
             num_server_rounds=1, local_epochs=1, batch_size=16, image_size=16)


@pytest.fixture(scope="module")
def two_site_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path, Path]:
    tmp = tmp_path_factory.mktemp("sim")
    audit = tmp / "egress.jsonl"
    cfg = RunConfig(run_dir=str(tmp / "runs"), **SMALL)
    mp = pytest.MonkeyPatch()
    mp.setenv(AUDIT_ENV, str(audit))  # inherited by the Ray workers that run the sites
    try:
        result = run_federated(cfg, run_path=tmp / "run")
    finally:
        mp.undo()
    return cfg, result.run_dir, audit


def test_run_directory_has_rounds_checkpoints_and_config(two_site_run) -> None:
    cfg, run_dir, _ = two_site_run
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1]
    assert {"auc", "accuracy", "loss"} <= set(records[1]["global"])
    assert set(records[1]["sites"]) == {"site-0", "site-1"}
    for site in records[1]["sites"].values():
        assert site["fit"]["num_examples"] > 0 and "train-loss" in site["fit"]
        assert "loss" in site["eval"]
    assert records[1]["fit_results"] == 2 and records[1]["fit_failures"] == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["mode"] == "federated" and config["config"]["num-sites"] == 2
    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    model = model_for(cfg, load_dataset(cfg).train)
    model.load_state_dict(final["state_dict"])  # loads into the same architecture
    assert final["round"] == 1 and final["config"]["model"] == "simplecnn"
    assert (run_dir / "checkpoints" / "best.pt").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and "auc" in summary["final_metrics"]


def test_sites_send_only_model_shaped_arrays_and_scalar_metrics(two_site_run) -> None:
    """Every message a site sent was recorded by the egress audit at the site."""
    cfg, _, audit = two_site_run
    reports = [json.loads(line) for line in audit.read_text().splitlines()]
    model = model_for(cfg, load_dataset(cfg).train)
    state_shapes = [list(t.shape) for t in model.state_dict().values()]
    kinds = {r["message_type"] for r in reports}
    assert {"train", "evaluate"} <= kinds, kinds
    for report in reports:
        if report["arrays"]:
            assert report["message_type"] in {"train", "get_parameters"}
            assert [a["shape"] for a in report["arrays"]] == state_shapes
            assert all(a["dtype"] in {"float32", "int64"} for a in report["arrays"])
        for name, kind in report["scalars"].items():
            if kind == "status-text":
                assert name.endswith(".status/message")
            else:
                assert kind in {"int", "float", "bool"}, (name, kind)
        assert report["protocol_records"] == []


def test_the_clinicians_figures_the_single_class_flag_and_the_sites_local_tests_are_recorded(two_site_run) -> None:
    cfg, run_dir, _ = two_site_run
    records = read_metrics(run_dir)
    test = records[1]["global"]
    assert {"balanced-accuracy", "sensitivity", "specificity", "threshold", "majority-rate", "single-class"} <= set(test)
    assert 0.0 < test["threshold"] < 1.0  # chosen on the validation split
    for site in records[1]["sites"].values():
        assert {"balanced-accuracy", "predicted-classes"} <= set(site["eval"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["single_class"]["final"] == (test["single-class"] == 1.0)
    report = summary["personalization"]
    assert report["mode"] == cfg.personalize == "bn+head"
    assert set(report["sites"]) == {"site-0", "site-1"}
    for row in report["sites"].values():
        assert row["local-test-examples"] > 0
        assert {"local-test-balanced-accuracy-global", "local-test-balanced-accuracy-personalized"} <= set(row)
