"""End to end (Flower simulation on Ray): DP-SGD sites report their epsilon, and a run whose sites
have all spent their budget stops cleanly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from medfed.client.site_data import simulated_site_data
from medfed.server.run_dir import read_metrics
from medfed.shared.config import RunConfig
from medfed.shared.privacy import poisson_schedule, site_ledger_path
from medfed.shared.task import round_settings
from medfed.shared.training import make_train_loader
from medfed.simulations.simulate import run_federated

SIGMA = 1.3


def _epsilons(cfg: RunConfig, site: int, rounds: int) -> list[float]:
    data = simulated_site_data(cfg, site_index=site, num_sites=cfg.num_sites)
    schedule = poisson_schedule(make_train_loader(data.train, round_settings(cfg, server_round=1, site_index=site)))
    accountant, out = RDPAccountant(), []
    for _ in range(rounds):
        for _ in range(schedule.steps_per_epoch * cfg.local_epochs):
            accountant.step(noise_multiplier=SIGMA, sample_rate=schedule.sample_rate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(float(accountant.get_epsilon(delta=cfg.dp_delta)))
    return out


def test_sites_that_spent_their_budget_stop_the_run_cleanly(tmp_path: Path) -> None:
    cfg = RunConfig(
        dataset="synthetic", synthetic_samples=64, image_size=12, model="simplecnn", norm="group",
        num_sites=2, num_server_rounds=3, batch_size=8, augment=False, dp=True,
        dp_noise_multiplier=SIGMA, dp_secure_noise=False, run_dir=str(tmp_path / "runs"),
    )
    eps = {site: _epsilons(cfg, site, 2) for site in (0, 1)}
    low, high = max(e[0] for e in eps.values()), min(e[1] for e in eps.values())
    assert low < high  # a budget exists that allows round 1 at both sites and round 2 at neither
    cfg = cfg.replace(dp_budget_epsilon=(low + high) / 2)

    result = run_federated(cfg, run_path=tmp_path / "run")  # must not raise

    records = read_metrics(result.run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]  # round 3 was skipped
    for site in (0, 1):
        fit1 = records[1]["sites"][f"site-{site}"]["fit"]
        assert fit1["dp-declined"] == 0 and fit1["num_examples"] > 0
        assert fit1["dp-epsilon"] == pytest.approx(eps[site][0], rel=1e-6)
        assert fit1["dp-budget-epsilon"] == cfg.dp_budget_epsilon and fit1["dp-delta"] == cfg.dp_delta
        fit2 = records[2]["sites"][f"site-{site}"]["fit"]
        assert fit2["dp-declined"] == 1 and fit2["num_examples"] == 0
        assert fit2["dp-epsilon"] == pytest.approx(eps[site][0], rel=1e-6)
        assert site_ledger_path(cfg, site_index=site).exists()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["stopped_early"]["round"] == 2 and summary["rounds"] == 1
    assert (result.run_dir / "checkpoints" / "final.pt").exists()
