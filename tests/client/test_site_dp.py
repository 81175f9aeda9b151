"""A site trains with DP-SGD, keeps its privacy ledger across restarts and declines past its budget."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from medfed.client.site_client import DP_DECLINED, SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.privacy import PrivacyLedger, poisson_schedule, site_ledger_path
from medfed.shared.task import round_settings
from medfed.shared.training import make_train_loader
from medfed.shared.weights import get_weights

SIGMA = 1.3


def _cfg(tmp_path: Path, **changes: object) -> RunConfig:
    base = dict(
        dataset="synthetic", synthetic_samples=64, image_size=12, model="simplecnn", norm="group",
        num_sites=2, num_server_rounds=3, batch_size=8, local_epochs=1, augment=False,
        dp=True, dp_noise_multiplier=SIGMA, dp_budget_epsilon=1000.0, dp_secure_noise=False,
        run_dir=str(tmp_path / "runs"),
    )
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]


def _client(cfg: RunConfig, site: int = 0) -> SiteClient:
    return SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=site, num_sites=cfg.num_sites),
                      site_index=site, device="cpu")


def _reference_epsilons(cfg: RunConfig, rounds: int, *, sigma: float = SIGMA, site: int = 0) -> list[float]:
    """Epsilon after each round from Opacus's accountant, stepped once per DP-SGD step."""
    data = simulated_site_data(cfg, site_index=site, num_sites=cfg.num_sites)
    schedule = poisson_schedule(make_train_loader(data.train, round_settings(cfg, server_round=1, site_index=site)))
    accountant, out = RDPAccountant(), []
    for _ in range(rounds):
        for _ in range(schedule.steps_per_epoch * cfg.local_epochs):
            accountant.step(noise_multiplier=sigma, sample_rate=schedule.sample_rate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(float(accountant.get_epsilon(delta=cfg.dp_delta)))
    return out


def test_fit_reports_dp_metrics_and_writes_the_ledger(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    client = _client(cfg)
    weights, n, metrics = client.fit(get_weights(client.model), {"server-round": 1})
    expected = _reference_epsilons(cfg, 1)[0]
    assert n == len(client.data.train) > 0
    assert metrics[DP_DECLINED] == 0
    assert metrics["dp-epsilon"] == pytest.approx(expected, rel=1e-6)
    assert metrics["dp-delta"] == cfg.dp_delta and metrics["dp-budget-epsilon"] == cfg.dp_budget_epsilon
    assert metrics["dp-noise-multiplier"] == SIGMA and metrics["dp-steps"] > 0
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # nothing path-like leaves
    path = site_ledger_path(cfg, site_index=0)
    assert path == tmp_path / "runs" / "ledgers" / path.parent.name / "site-0.json"
    assert path.parent.name.startswith("data-")
    assert PrivacyLedger.load(path).epsilon(cfg.dp_delta) == pytest.approx(expected, rel=1e-9)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, get_weights(_client(cfg).model), strict=True))
    assert site_ledger_path(cfg.replace(ledger_dir=str(tmp_path / "mine")), site_index=3) == tmp_path / "mine" / "site-3.json"


def test_a_restarted_site_continues_its_cumulative_epsilon(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    first = _client(cfg)
    weights = get_weights(first.model)
    for r in (1, 2):
        weights, _, metrics = first.fit(weights, {"server-round": r})
    restarted = _client(cfg)  # a new site process: same config, same ledger folder
    weights, _, metrics = restarted.fit(weights, {"server-round": 3})
    expected = _reference_epsilons(cfg, 3)
    assert metrics["dp-epsilon"] == pytest.approx(expected[2], rel=1e-6)
    ledger = restarted.open_ledger()
    assert [e.round for e in ledger.entries] == [1, 2, 3]
    assert [e.epsilon for e in ledger.entries] == pytest.approx(expected, rel=1e-6)


def test_a_site_declines_the_round_that_would_exceed_its_budget(tmp_path: Path, caplog) -> None:
    probe = _cfg(tmp_path)
    eps = _reference_epsilons(probe, 3)
    cfg = _cfg(tmp_path, dp_budget_epsilon=(eps[1] + eps[2]) / 2)  # room for two rounds, not three
    client = _client(cfg)
    weights = get_weights(client.model)
    for r in (1, 2):
        weights, n, metrics = client.fit(weights, {"server-round": r})
        assert n > 0 and metrics[DP_DECLINED] == 0
    with caplog.at_level(logging.WARNING, logger="medfed.client.site_client"):
        returned, n, metrics = client.fit(weights, {"server-round": 3})
    assert n == 0 and metrics[DP_DECLINED] == 1
    assert all(np.array_equal(a, b) for a, b in zip(returned, weights, strict=True))
    assert metrics["dp-epsilon"] == pytest.approx(eps[1], rel=1e-6) and metrics["dp-steps"] == 0
    assert "declines round 3" in caplog.text and "dp-budget-epsilon" in caplog.text
    assert len(client.open_ledger().entries) == 2  # declining costs nothing


def test_target_epsilon_is_spent_over_the_planned_rounds(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_server_rounds=2, dp_target_epsilon=4.0, dp_budget_epsilon=4.0)
    client = _client(cfg)
    weights = get_weights(client.model)
    for r in (1, 2):
        weights, n, metrics = client.fit(weights, {"server-round": r})
        assert n > 0
    assert 3.9 <= metrics["dp-epsilon"] <= 4.0
    sigma = float(metrics["dp-noise-multiplier"])
    assert metrics["dp-epsilon"] == pytest.approx(_reference_epsilons(cfg, 2, sigma=sigma)[1], rel=1e-6)
    _, n, metrics = client.fit(weights, {"server-round": 3})  # beyond the plan: over budget
    assert n == 0 and metrics[DP_DECLINED] == 1


def test_secure_noise_is_not_reproducible_and_seeded_noise_is(tmp_path: Path, caplog, monkeypatch) -> None:
    import medfed.client.site_client as site_client

    monkeypatch.setattr(site_client, "_WARNED", set())  # the warning is said once per process
    def one_round(folder: str, secure: bool) -> list[np.ndarray]:
        cfg = _cfg(tmp_path / folder, dp_secure_noise=secure)
        client = _client(cfg)
        return client.fit(get_weights(client.model), {"server-round": 1})[0]

    with caplog.at_level(logging.WARNING, logger="medfed.client.site_client"):
        seeded = [one_round("a", False), one_round("b", False)]
    assert caplog.text.count("dp-secure-noise = false") == 1  # once, not once per client
    assert all(np.array_equal(x, y) for x, y in zip(*seeded, strict=True))
    secure = [one_round("c", True), one_round("d", True)]
    assert any(not np.array_equal(x, y) for x, y in zip(*secure, strict=True))


def test_dp_with_batchnorm_or_without_noise_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"norm = 'group'.*--norm group"):
        _client(_cfg(tmp_path, norm="batch"))
    with pytest.raises(ValueError, match="no privacy"):
        _client(_cfg(tmp_path, dp_noise_multiplier=0.0))


def test_ghost_clipping_sites_account_the_same_as_hooks(tmp_path: Path) -> None:
    from medfed.shared.config import ConfigError

    cfg = _cfg(tmp_path, dp_grad_sample_mode="ghost")
    client = _client(cfg)
    assert client.grad_sample_mode == "ghost"
    weights, n, metrics = client.fit(get_weights(client.model), {"server-round": 1})
    assert n > 0 and metrics["dp-epsilon"] == pytest.approx(_reference_epsilons(cfg, 1)[0], rel=1e-6)
    with pytest.raises(ConfigError, match="dp-grad-sample-mode"):
        _cfg(tmp_path, dp_grad_sample_mode="vmap")
    seg = _cfg(tmp_path, synthetic_task="segmentation", model="unet", image_size=16, dp_grad_sample_mode="ghost")
    with pytest.raises(ValueError, match="per-example loss"):
        _client(seg)
