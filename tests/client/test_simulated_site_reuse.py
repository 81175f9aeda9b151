"""A simulation's site keeps its SiteClient between messages, and that changes no result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.client import client_app
from medfed.client.client_app import SIMULATED_SITES_KEPT, simulated_site
from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.seeding import seed_everything
from medfed.shared.task import model_for
from medfed.shared.weights import get_weights


def _cfg(tmp_path: Path, **kw) -> RunConfig:
    base = dict(dataset="synthetic", synthetic_samples=64, model="simplecnn", image_size=16, batch_size=16,
                num_sites=2, local_epochs=1, run_dir=str(tmp_path / "runs"))
    return RunConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _empty_cache():
    client_app._simulated_sites.clear()
    yield
    client_app._simulated_sites.clear()


def test_one_client_per_site_and_config_and_the_least_recently_used_goes_first(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    first = simulated_site(cfg, site_index=0, num_sites=2)
    assert simulated_site(cfg, site_index=0, num_sites=2) is first
    assert simulated_site(cfg, site_index=1, num_sites=2) is not first
    assert simulated_site(cfg.replace(seed=1), site_index=0, num_sites=2) is not first  # another run
    for seed in range(2, 2 + SIMULATED_SITES_KEPT):  # fill the cache with other runs' sites...
        simulated_site(cfg.replace(seed=seed), site_index=0, num_sites=2)
    assert len(client_app._simulated_sites) == SIMULATED_SITES_KEPT
    assert simulated_site(cfg, site_index=0, num_sites=2) is not first  # ...so the oldest was dropped


@pytest.mark.parametrize("extra", [{}, {"bn_mode": "fedbn"}, {"strategy": "scaffold"}], ids=["global", "fedbn", "scaffold"])
def test_a_reused_site_trains_and_evaluates_exactly_as_a_fresh_one(tmp_path: Path, extra: dict) -> None:
    # Two rounds of fit + evaluate per site, once through the kept clients and once with a new
    # SiteClient for every message (what Flower's client_fn did before); the site state files of
    # fedbn / scaffold live in separate run folders.
    def rounds(cfg: RunConfig, fresh: bool) -> list:
        seed_everything(cfg.seed)  # the same initial global model for both
        weights = get_weights(model_for(cfg, simulated_site_data(cfg, site_index=0, num_sites=2).train))
        out = []
        for server_round in (1, 2):
            config = {"server-round": server_round}
            trained = []
            for site in (0, 1):
                client = (SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=site, num_sites=2), site_index=site)
                          if fresh else simulated_site(cfg, site_index=site, num_sites=2))
                sent = weights + ([np.zeros_like(w, dtype=np.float32) for w in weights] if cfg.strategy == "scaffold" else [])
                new, n, metrics = client.fit(sent, config)
                trained.append((new, n))
                out.append({k: v for k, v in metrics.items() if "seconds" not in k})
            total = sum(n for _, n in trained)
            weights = [sum(w[k] * n for w, n in trained) / total for k in range(len(weights))]
            weights = [w.astype(g.dtype) for w, g in zip(weights, trained[0][0], strict=True)]
            for site in (0, 1):
                client = (SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=site, num_sites=2), site_index=site)
                          if fresh else simulated_site(cfg, site_index=site, num_sites=2))
                out.append(client.evaluate(weights, config))
        return out + [weights]

    kept = rounds(_cfg(tmp_path / "kept", **extra), fresh=False)
    fresh = rounds(_cfg(tmp_path / "fresh", **extra), fresh=True)
    *kept_metrics, kept_weights = kept
    *fresh_metrics, fresh_weights = fresh
    assert kept_metrics == fresh_metrics
    for a, b in zip(kept_weights, fresh_weights, strict=True):
        np.testing.assert_array_equal(a, b)
