"""Default-suite variant of the deployment test: SuperLink + 2 SuperNodes, one signed round.

Same machinery as ``test_deploy_federation.py`` (TLS, SuperNode authentication, process
isolation with the signature check, NIfTI datalists), smaller so it fits the default suite.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from medfed.server.model_card import gather_model_card
from medfed.server.provision import provision
from medfed.server.run_dir import read_metrics
from tests.support.deploy_support import MEDFED, LiveFederation, free_port


@pytest.fixture
def two_sites(tmp_path: Path):
    fed = provision(tmp_path / "fed", sites=["north", "south"], superlink_address=f"127.0.0.1:{free_port()}").federation
    live = LiveFederation(root=tmp_path, fed=fed)
    try:
        live.start_server()
        for index, site in enumerate(fed.sites):
            live.start_site(site.name, index)
        for name, proc in live.sites.items():
            assert proc.wait_for("connected to the SuperLink", 90), f"{name}:\n{proc.text()}"
        yield live
    finally:
        live.stop()


def test_two_sites_one_signed_round(two_sites: LiveFederation) -> None:
    # One plain training round and no evaluation round: Flower starts one ClientApp process per
    # message and SecAgg+ (the deployment default, covered by test_deploy_federation.py) sends
    # four messages per round, so this keeps the default suite to one process per site.
    config = two_sites.run_config("smoke", **{"num-server-rounds": 1, "fraction-evaluate": 0.0, "secagg": False})
    start = time.perf_counter()
    proc = subprocess.run([MEDFED, "run", "-f", str(two_sites.fed.root), "--config", str(config), "--timeout", "600"],
                          capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\n2 sites x 1 round on the deployment engine: {time.perf_counter() - start:.1f} s")
    (run_dir,) = [p for p in (two_sites.root / "runs" / "smoke").iterdir() if p.is_dir()]
    (record,) = read_metrics(run_dir)
    assert record["round"] == 1 and record["fit_results"] == 2 and record["fit_failures"] == 0
    assert set(record["sites"]) == {"north", "south"}  # the enrolled names (medfed.server.identity)
    for site in record["sites"].values():
        assert site["fit"]["num_examples"] == 12 and "train-loss" in site["fit"]
    # The server records the bundle every site verified; the model card shows its hash.
    bundle = json.loads((run_dir / "app_bundle.json").read_text())
    assert bundle["signed"] is True and f"app bundle {bundle['fab_sha256'][:12]}..." in proc.stdout
    assert gather_model_card(run_dir, calibrate=False).app_bundle["fab_sha256"] == bundle["fab_sha256"]
    for name, site in two_sites.sites.items():
        assert "verified app bundle" in site.text(), name
        # ... and the ClientApp that trained is the bundle's code (docs/deploy.md, "Which code a site runs").
        assert "loaded from the verified bundle at" in site.text(), name
        assert "REFUSED" not in site.text(), name
