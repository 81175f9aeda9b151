"""The sites of a simulation run in processes that skip MLflow, matplotlib and MONAI's scipy.signal (medfed.shared.site_process)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medfed.shared.config import RunConfig
from medfed.shared.site_process import SITE_PROCESS_ENV, SKIPPED_IN_SITE_PROCESSES
from medfed.simulations.simulate import run_federated
from tests.support.probe_sites import probed_client_app


def test_the_sites_of_a_simulation_run_without_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SITE_PROCESS_ENV, raising=False)
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = RunConfig(dataset="synthetic", synthetic_samples=48, model="simplecnn", image_size=16, batch_size=16,
                    num_sites=2, num_server_rounds=1, local_epochs=1, personalize="off", cross_site=False,
                    run_dir=str(tmp_path / "runs"), sim_backend="ray")  # site processes: Ray's workers
    client_app = probed_client_app(cfg, out=probes, modules=("monai", "opacus", "scipy.signal", *SKIPPED_IN_SITE_PROCESSES),
                                   env=(SITE_PROCESS_ENV,))
    result = run_federated(cfg, run_path=tmp_path / "run", client_app=client_app)
    assert result.rounds[1].global_metrics  # the round trained and was evaluated
    facts = [json.loads(p.read_text()) for p in probes.glob("*.json")]
    assert facts, "no site process wrote its probe"
    for fact in facts:
        assert fact["env"] == {SITE_PROCESS_ENV: "1"}
        # Opacus too: it loads where DP-SGD runs (medfed.shared.opacus_registration), and this run has no DP.
        # scipy.signal: refused to MONAI's ultrasound and 1D-signal modules, and nothing a site runs needs it.
        assert fact["modules"] == {"monai": True, "opacus": False, "scipy.signal": False, "mlflow": False,
                                   "matplotlib": False}
    assert SITE_PROCESS_ENV not in os.environ  # the coordinator's own process is unchanged
