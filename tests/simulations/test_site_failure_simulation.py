"""End to end on Flower's simulation engine (Ray): one of 4 sites raises while training in round 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.server.dashboard.read_models import RunReader
from medfed.server.run_dir import read_metrics
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from medfed.simulations.simulate import run_federated
from tests.support.fault_sites import crashing_client_app

pytestmark = pytest.mark.slow


def test_round_completes_with_three_sites_and_the_fourth_rejoins(tmp_path: Path) -> None:
    cfg = RunConfig(dataset="synthetic", synthetic_samples=96, model="simplecnn", image_size=16, batch_size=16,
                    num_sites=4, num_server_rounds=3, local_epochs=1, run_dir=str(tmp_path / "runs"))
    result = run_federated(cfg, run_path=tmp_path / "run", client_app=crashing_client_app(cfg, site=3, server_round=2))

    records = {r["round"]: r for r in read_metrics(result.run_dir)}
    assert [records[r]["fit_results"] for r in (1, 2, 3)] == [4, 3, 4]
    [failure] = records[2]["failed_sites"]
    # The site's egress guard sends the category and the class, never the text (so Flower's
    # simulation engine sees an error reply, not an exception to wrap in its ClientAppException).
    assert (failure["site"], failure["code"], failure["error"]) == ("site-3", "internal-error", "RuntimeError")
    with RunStore(cfg.store_url) as store:
        rounds = {r["round"]: r for r in RunReader(store).rounds("run")}
        assert [rounds[r]["responded"] for r in (1, 2, 3)] == [4, 3, 4]
        events = [e for e in RunReader(store).events("run") if e["kind"] == "site-failed"]
        assert [(e["round"], e["message"]) for e in events] == [
            (2, "round 2: site-3 failed to train: RuntimeError (internal-error)")
        ]
