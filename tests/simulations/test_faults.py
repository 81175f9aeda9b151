"""Faulty and malicious sites in whole federated runs (issue 6, acceptance 3 and 4).

The runs use medfed's real ServerApp code (``run_server``) and ClientApp (egress guard, mods,
:class:`~medfed.client.site_client.SiteClient` training) on the in-process Grid of
``tests/support/local_grid.py`` (every message serialised, no Ray: a run takes seconds), with
test-only attacking sites from :mod:`medfed.simulations.faults`. The task is the poisoning benchmark's
(:func:`medfed.simulations.bench.robust.task_config`: 5 sites, synthetic blobs, simplecnn, 3 rounds x 2
local epochs, seed 0, 90 test images); every run is deterministic, so each faulty run is
compared with the clean FedAvg run of the same seed.

Figures seen (seed 0, 2-core CPU; run with ``-s`` to print them): clean FedAvg 0.867 test
accuracy. Acceptance 3 (sites 1-3 send NaN, a wrong shape, a 1e6-scaled update; all three
rejected every round): 0.856. Acceptance 4 (site 0 sends global - 10 (local - global) every
round): FedAvg 0.500 (chance), FedMedian 0.856, FedTrimmedAvg 0.856, MultiKrum 0.867, Krum
0.856; ``python -m medfed.simulations.bench.robust`` gave the same figures on Flower's Ray engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from medfed.client.client_app import make_client_app
from medfed.server.dashboard.read_models import RunReader
from medfed.server.failures import RunFailedError
from medfed.server.run_dir import read_metrics
from medfed.server.server_app import ServerHooks, run_server
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from medfed.simulations.bench.robust import poisoning_attacks, task_config
from medfed.simulations.faults import Attack, attack_client_fn
from tests.support.local_grid import LocalGrid, server_identity

FAULT_MARGIN = 0.10
"""Acceptance 3: faulty run >= clean - 0.10 test accuracy. With three of five sites rejected in
every round the model learns from 40 % of the data, so some loss is expected even with perfect
rejection; 0.10 is 9 of the 90 test images, room for that and for numerical differences between
machines, while a NaN, a wrong shape or a 1e6-scaled update let through would leave a NaN or
chance-level (0.5) model."""

ROBUST_MARGIN = 0.10
"""Acceptance 4: a robust rule with the poisoning site >= clean FedAvg - 0.10 (9 test images).
The robust rules discard or outvote one site's update per round (and ignore example counts), so
they cost a little even when every site is honest."""

FEDAVG_DROP = 0.25
"""Acceptance 4: FedAvg with the poisoning site <= clean FedAvg - 0.25. One site at -10x its
update outweighs the four honest ones (mean update about -1.2x the honest direction): the
model is pushed away from the optimum every round and ends near chance (0.5)."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # sites train in this process


def run_local(cfg: RunConfig, attacks: dict[int, Attack], path: Path) -> list[dict]:
    """One federated run of ``cfg`` with ``attacks`` on the in-process Grid; its ``metrics.jsonl``."""
    app = make_client_app(cfg, client_fn=attack_client_fn(cfg, attacks))
    grid = LocalGrid(app, num_nodes=cfg.num_sites)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(path))
    return read_metrics(path)


def accuracy(records: list[dict]) -> float:
    """The global model's test accuracy after the last round."""
    return float(records[-1]["global"]["accuracy"])


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("clean")
    return run_local(task_config(run_dir=str(tmp), store="off"), {}, tmp / "run")


# --------------------------------------------------------------------------- acceptance 3
FAULTS = {1: Attack("nan"), 2: Attack("shape"), 3: Attack("scale", factor=1e6)}
MAX_NORM = 1000.0
"""max-update-norm for the faulty run: honest updates measured <= 10 (round 1, when the BatchNorm
statistics move from their initial values) and < 3 later; a 1e6-scaled one is >= 7e5."""


def test_broken_updates_are_rejected_recorded_and_do_not_hurt(clean, tmp_path: Path) -> None:
    cfg = task_config(run_dir=str(tmp_path), max_update_norm=MAX_NORM)  # store: tmp_path/medfed.db
    records = run_local(cfg, FAULTS, tmp_path / "run")
    expected = [("site-1", "nan"), ("site-2", "shape"), ("site-3", "norm")]
    for record in records[1:]:
        assert [(r["site"], r["reason"]) for r in record["rejected"]] == expected, record["round"]
        assert record["skipped"] is None and record["fit_results"] == 5
        assert record["sites"]["site-3"]["fit"]["update-norm"] > 1e5  # recorded with the rejection
        assert max(record["sites"][s]["fit"]["update-norm"] for s in ("site-0", "site-4")) < 20
        assert np.isfinite(record["global"]["loss"])
    final = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=False)
    assert final["round"] == cfg.num_server_rounds
    assert all(torch.isfinite(t.float()).all() for t in final["state_dict"].values())
    print(f"\nacceptance 3: clean FedAvg accuracy {accuracy(clean):.3f}, with NaN/shape/1e6 sites "
          f"{accuracy(records):.3f} (margin {FAULT_MARGIN})")
    assert accuracy(records) >= accuracy(clean) - FAULT_MARGIN
    assert accuracy(clean) >= 0.8  # the comparison is against a model that learned something
    with RunStore(f"sqlite:///{tmp_path / 'medfed.db'}", create=False) as store:
        (run,) = RunReader(store).list_runs()
        events = [e for e in RunReader(store).events(run["id"]) if e["kind"] == "update-rejected"]
    assert len(events) == 3 * cfg.num_server_rounds
    assert {e["message"].split("(")[1].split(":")[0] for e in events} == {"nan", "shape", "norm"}
    assert not any("/" in e["message"] for e in events)  # no paths in the events


def test_when_every_update_is_rejected_the_model_stays(tmp_path: Path) -> None:
    cfg = task_config(run_dir=str(tmp_path), sites=2, rounds=1, samples=96, store="off")
    with pytest.raises(RunFailedError, match="no round completed in round 1.*2 rejected updates"):
        run_local(cfg, {0: Attack("nan"), 1: Attack("inf")}, tmp_path / "run")  # the run fails, saying why
    records = read_metrics(tmp_path / "run")
    assert [r["reason"] for r in records[1]["rejected"]] == ["nan", "inf"]
    assert "all 2 updates were rejected" in records[1]["skipped"]
    assert records[1]["global"] == records[0]["global"]  # the initial model, evaluated again
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 0  # the final checkpoint is the initial model
    assert summary["status"] == "failed"


# --------------------------------------------------------------------------- acceptance 4
def _poisoned(strategy: str, tmp_path: Path) -> float:
    cfg = task_config(strategy=strategy, run_dir=str(tmp_path), store="off")
    records = run_local(cfg, poisoning_attacks(factor=10.0), tmp_path / strategy)
    assert all(not r["rejected"] and r["skipped"] is None for r in records)  # no bound set: poisoning passes validation
    return accuracy(records)


def test_poisoning_fedavg_degrades_fedmedian_holds(clean, tmp_path: Path) -> None:
    """Default-suite variant of acceptance 4: FedAvg and FedMedian (the full table is ``slow``)."""
    fedavg, median = _poisoned("fedavg", tmp_path), _poisoned("fedmedian", tmp_path)
    print(f"\nacceptance 4 (1 of 5 sites sign-flipped x10): clean FedAvg {accuracy(clean):.3f}, "
          f"poisoned FedAvg {fedavg:.3f}, FedMedian {median:.3f}")
    assert fedavg <= accuracy(clean) - FEDAVG_DROP
    assert median >= accuracy(clean) - ROBUST_MARGIN


@pytest.mark.slow
def test_poisoning_table_every_robust_rule(clean, tmp_path: Path) -> None:
    """Acceptance 4: FedAvg vs FedMedian vs FedTrimmedAvg vs (Multi)Krum, one poisoning site of five."""
    figures = {name: _poisoned(name, tmp_path) for name in ("fedavg", "fedmedian", "fedtrimmedavg", "multikrum", "krum")}
    print(f"\nacceptance 4: clean FedAvg {accuracy(clean):.3f}; poisoned: "
          + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    assert figures.pop("fedavg") <= accuracy(clean) - FEDAVG_DROP
    for name, value in figures.items():
        assert value >= accuracy(clean) - ROBUST_MARGIN, name
