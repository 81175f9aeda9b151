"""The end-of-simulation report: each site's global, personalized and local-only model on its local
test split (run here without Ray: the report is computed from the final weights)."""

from __future__ import annotations

import pytest

from medfed.client.site_data import simulated_class_counts, simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.data.loading import load_dataset
from medfed.shared.task import model_for
from medfed.shared.weights import get_weights
from medfed.simulations.personalization import personalization_report
from medfed.simulations.progress import summary_lines

SMALL = dict(dataset="synthetic", synthetic_samples=240, model="simplecnn", image_size=16, batch_size=16,
             num_sites=2, num_server_rounds=2, local_epochs=1, partition="dirichlet", dirichlet_alpha=0.5,
             local_test_fraction=0.3, store="off")  # fmt: skip


@pytest.fixture(scope="module")
def report() -> tuple[RunConfig, dict]:
    cfg = RunConfig(**SMALL, local_only_baseline=True, personalize="bn+head", personalize_epochs=1)
    weights = get_weights(model_for(cfg, load_dataset(cfg).train))
    return cfg, personalization_report(cfg, weights)["personalization"]


def test_every_site_reports_all_three_models_on_its_local_test_split(report) -> None:
    cfg, got = report
    assert got["mode"] == "bn+head" and got["local_only"] is True
    assert set(got["sites"]) == {"site-0", "site-1"}
    for k, (name, row) in enumerate(sorted(got["sites"].items())):
        site = simulated_site_data(cfg, site_index=k, num_sites=2)
        assert site.test is not None and row["local-test-examples"] == len(site.test)
        assert got["kept"][name] in {"off", "bn", "bn+head"}
        for model in ("global", "personalized", "adapted", "local-only"):
            assert 0.0 <= row[f"local-test-balanced-accuracy-{model}"] <= 1.0
            assert (f"local-test-auc-{model}" in row) == (len(set(site.test.targets.tolist())) == 2)
    for key, value in got["mean"].items():
        rows = [r[key] for r in got["sites"].values() if key in r]
        assert value == pytest.approx(sum(rows) / len(rows)) and got["mean_over_sites"][key] == len(rows)


def test_the_printed_summary_has_a_line_per_site(report) -> None:
    _, got = report
    lines = dict(summary_lines({"personalization": got}))
    for site in got["sites"]:
        assert "global" in lines[f"{site} local test"] and "local-only" in lines[f"{site} local test"]


def test_no_local_test_splits_no_report() -> None:
    cfg = RunConfig(**{**SMALL, "local_test_fraction": 0.0})
    weights = get_weights(model_for(cfg, load_dataset(cfg).train))
    assert personalization_report(cfg, weights) == {}


def test_class_counts_printed_before_training_are_the_sites_own() -> None:
    cfg = RunConfig(**SMALL)
    counts = simulated_class_counts(cfg)
    for k, (name, splits) in enumerate(counts):
        site = simulated_site_data(cfg, site_index=k, num_sites=2)
        assert name == f"site-{k}"
        for split, data in (("train", site.train), ("val", site.val), ("test", site.test)):
            assert splits[split] == [int((data.targets == c).sum()) for c in range(2)]
