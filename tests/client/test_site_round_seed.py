"""A site's round r depends only on (seed, site, r) and the weights it receives, not on what the
process ran before: what makes a resumed run train exactly like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.shared.config import RunConfig


@pytest.mark.parametrize("dp", [False, True])
def test_round_2_from_the_same_weights_is_identical_in_a_fresh_site(tmp_path: Path, dp: bool) -> None:
    cfg = RunConfig(dataset="synthetic", synthetic_samples=48, model="simplecnn", image_size=12, batch_size=8,
                    num_sites=2, local_epochs=1, norm="group" if dp else "batch", dp=dp, dp_secure_noise=False)
    data = simulated_site_data(cfg, site_index=1, num_sites=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        veteran = SiteClient(cfg=cfg.replace(ledger_dir=str(tmp_path / "a")), data=data, site_index=1)
        after_1, _, _ = veteran.fit(veteran.get_parameters({}), {"server-round": 1})
        torch.rand(5), np.random.rand(5)  # the process's random state moves on
        again, _, metrics = veteran.fit([w.copy() for w in after_1], {"server-round": 2})
        fresh = SiteClient(cfg=cfg.replace(ledger_dir=str(tmp_path / "b")), data=data, site_index=1)
        first, _, fresh_metrics = fresh.fit([w.copy() for w in after_1], {"server-round": 2})
        other_round, _, _ = fresh.fit([w.copy() for w in after_1], {"server-round": 3})
    finally:
        torch.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))
    assert metrics.get("train-loss") == fresh_metrics.get("train-loss")
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_round, strict=True))
