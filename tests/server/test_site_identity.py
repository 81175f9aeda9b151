"""Site identity: records are keyed by who the server knows a node to be, never by its report.

In-process twins of the deployment attack (issue 15, acceptance 3): a node that claims another
site's ``site-index`` is refused, the honest site's records are unchanged, and the run store
gets an ``identity-refused`` event.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.proto.node_pb2 import NodeInfo
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from torch import nn

from medfed.server.dashboard.read_models import RunReader
from medfed.server.identity import EnrolledSite, SiteIdentities, enrolled_sites, enrolment_from_env, flower_public_key
from medfed.server.provision import provision
from medfed.server.recording import RecordingStrategy
from medfed.server.run_dir import RunDirectory, read_metrics
from medfed.server.store import RunStore
from medfed.server.store.sink import StoreSink
from medfed.server.validation import ValidatingStrategy
from medfed.shared.auth_keys import generate_auth_key_pair


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)


def _fit(node: int | None, claim: int, value: float, epsilon: float, n: int = 10) -> tuple[object, FitRes]:
    arrays = [np.full((1, 2), value, np.float32), np.full((1,), value, np.float32)]
    metrics = {"site-index": claim, "dp-epsilon": epsilon, "train-loss": value}
    proxy = SimpleNamespace(node_id=node, cid=str(node))
    return proxy, FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(arrays), n, metrics)


def _eval(node: int, claim: int, loss: float) -> tuple[object, EvaluateRes]:
    proxy = SimpleNamespace(node_id=node, cid=str(node))
    return proxy, EvaluateRes(Status(Code.OK, "Success"), loss, 4, {"site-index": claim, "auc": 1.0 - loss})


def _keys(n: int) -> list[bytes]:
    return [flower_public_key(generate_auth_key_pair().public) for _ in range(n)]


ALPHA, BETA = _keys(2)
ENROLLED = [EnrolledSite("alpha", 0, ALPHA), EnrolledSite("beta", 1, BETA)]
NODES = [NodeInfo(node_id=11, public_key=ALPHA, name="alpha"), NodeInfo(node_id=22, public_key=BETA, name="beta")]


def _strategy(tmp_path: Path, identities: SiteIdentities, *, store: RunStore | None = None,
              validate: bool = False) -> RecordingStrategy:
    run_dir = RunDirectory(tmp_path / "run", config={"num-server-rounds": 2}, mode="federated",
                           sink=StoreSink(store) if store is not None else None)
    inner = ValidatingStrategy(FedAvg(min_fit_clients=0, min_available_clients=0)) if validate else FedAvg()
    strategy = RecordingStrategy(inner, run_dir=run_dir, model=_Model(), primary_metric="auc", identities=identities)
    if validate:
        inner.on_report, inner.site_of = strategy.record_validation, strategy.site_of  # as server_app wires it
    return strategy


def test_a_node_claiming_another_sites_index_is_refused_and_recorded(tmp_path: Path, caplog) -> None:
    url = f"sqlite:///{tmp_path / 'medfed.db'}"
    strategy = _strategy(tmp_path, SiteIdentities(nodes=lambda: NODES, enrolled=ENROLLED), store=RunStore(url))
    honest, spoof = _fit(22, 1, 3.0, 7.9), _fit(11, 1, 100.0, 0.1)  # alpha's node claims beta's index
    with caplog.at_level(logging.ERROR, logger="medfed.server.recording"):
        params, _ = strategy.aggregate_fit(1, [honest, spoof], [])
        strategy.aggregate_evaluate(1, [_eval(22, 1, 0.2), _eval(11, 1, 0.9)], [])
    assert params is not None
    assert all(np.allclose(a, 3.0) for a in parameters_to_ndarrays(params))  # the spoofed update is not averaged
    run_id = strategy.run_dir.run_id
    strategy.finish()

    (record,) = read_metrics(tmp_path / "run")
    assert set(record["sites"]) == {"beta"}  # keyed by the enrolled name; the spoofer added nothing
    assert record["sites"]["beta"]["fit"]["dp-epsilon"] == 7.9 and record["sites"]["beta"]["eval"]["loss"] == 0.2
    assert record["fit_results"] == 1
    (rejection,) = record["rejected"]  # once per node and round, though it also sent an evaluation
    assert rejection["reason"] == "identity" and rejection["node"] == "11" and rejection["site"] == "alpha"
    assert "authenticated as alpha (site-index 0) but reports site-index 1" in rejection["detail"]
    assert "result refused: node 11 authenticated as alpha" in caplog.text
    with RunStore(url) as store:
        events = [e for e in RunReader(store).events(run_id) if e["kind"] == "identity-refused"]
    assert len(events) == 1 and events[0]["level"] == "error" and events[0]["round"] == 1
    assert "alpha's update rejected (identity: node 11 authenticated as alpha" in events[0]["message"]


def test_enrolled_nodes_are_keyed_by_name_and_ordered_by_enrolled_index(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, SiteIdentities(nodes=lambda: NODES, enrolled=ENROLLED), validate=True)
    nan = _fit(11, 0, float("nan"), 1.0)
    zeros = ndarrays_to_parameters([np.zeros((1, 2), np.float32), np.zeros((1,), np.float32)])
    strategy.configure_fit(1, zeros, SimpleClientManager())  # validation needs the round's global model
    strategy.aggregate_fit(1, [_fit(22, 1, 2.0, 1.0), nan], [])
    strategy.finish()
    (record,) = read_metrics(tmp_path / "run")
    assert list(record["sites"]) == ["alpha", "beta"]  # enrolled order, not arrival order
    (rejection,) = record["rejected"]
    assert rejection["site"] == "alpha" and rejection["reason"] == "nan"  # validation names the enrolled site


def test_a_key_that_no_enrolled_site_has_is_refused(tmp_path: Path) -> None:
    (stranger,) = _keys(1)
    nodes = [*NODES, NodeInfo(node_id=33, public_key=stranger, name="hand-registered")]
    strategy = _strategy(tmp_path, SiteIdentities(nodes=lambda: nodes, enrolled=ENROLLED))
    strategy.aggregate_fit(1, [_fit(11, 0, 1.0, 1.0), _fit(33, 2, 5.0, 1.0)], [])
    strategy.finish()
    (record,) = read_metrics(tmp_path / "run")
    assert set(record["sites"]) == {"alpha"}
    assert record["rejected"][0]["node"] == "33" and "no enrolled site has" in record["rejected"][0]["detail"]


def test_simulation_nodes_are_sites_in_registration_order(tmp_path: Path) -> None:
    # Flower's simulation registers partition K as the K-th node; node ids are random.
    nodes = [NodeInfo(node_id=901, registered_at="2026-12-01T10:00:00.000001+00:00"),
             NodeInfo(node_id=500, registered_at="2026-12-01T10:00:00.000009+00:00")]
    identities = SiteIdentities(nodes=lambda: nodes)
    strategy = _strategy(tmp_path, identities)
    strategy.aggregate_fit(1, [_fit(901, 0, 1.0, 7.9), _fit(500, 0, 9.0, 0.1)], [])  # 500 is site-1
    strategy.finish()
    assert identities.mode == "simulation"
    (record,) = read_metrics(tmp_path / "run")
    assert set(record["sites"]) == {"site-0"} and record["sites"]["site-0"]["fit"]["dp-epsilon"] == 7.9
    assert record["rejected"][0]["node"] == "500"
    assert "authenticated as site-1 (site-index 1) but reports site-index 0" in record["rejected"][0]["detail"]


@pytest.mark.parametrize(
    ("rounds", "refused_round", "detail"),
    [
        # Both claim index 1 in one round: the first to claim it keeps it.
        ([[(7, 1, 3.0, 7.9), (8, 1, 9.0, 0.1)]], 1, "which node 7 holds in this run"),
        # Node 8 held index 0, then claims node 7's index 1.
        ([[(7, 1, 3.0, 7.9), (8, 0, 2.0, 1.0)], [(7, 1, 3.0, 7.9), (8, 1, 9.0, 0.1)]], 2, "which node 7 holds"),
    ],
)
def test_without_node_information_the_first_claim_owns_an_index(
    tmp_path: Path, rounds: list[list[tuple[int, int, float, float]]], refused_round: int, detail: str
) -> None:
    identities = SiteIdentities(nodes=lambda: [NodeInfo(node_id=7), NodeInfo(node_id=8)])  # no times: as LocalGrid
    strategy = _strategy(tmp_path, identities)
    for server_round, results in enumerate(rounds, start=1):
        strategy.aggregate_fit(server_round, [_fit(*r) for r in results], [])
    strategy.finish()
    assert identities.mode == "first-claim"
    records = read_metrics(tmp_path / "run")
    refused = records[refused_round - 1]
    assert refused["sites"]["site-1"]["fit"]["dp-epsilon"] == 7.9  # the honest node's record stands
    assert refused["rejected"][0]["node"] == "8" and detail in refused["rejected"][0]["detail"]
    assert all(not r["rejected"] for r in records if r["round"] != refused_round)


def test_the_enrolment_reaches_the_server_app_from_the_federation_folder(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", sites=["north", "south"], superlink_address="127.0.0.1:9000").federation
    assert enrolment_from_env({}) is None
    enrolled = enrolment_from_env({"MEDFED_FEDERATION": str(fed.root)})
    assert enrolled == enrolled_sites(fed.sites)
    assert [(s.name, s.index) for s in enrolled] == [("north", 0), ("south", 1)]
    assert enrolled[1].public_key == flower_public_key(fed.site("south").public_key.read_text())


def test_when_the_grid_cannot_list_nodes_an_enrolled_federation_refuses_rather_than_guesses() -> None:
    def broken() -> list[NodeInfo]:
        raise ConnectionError("runtime API down")

    identities = SiteIdentities(nodes=broken, enrolled=ENROLLED)
    identity = identities.identify(11, {"site-index": 0}, position=0)
    assert identity.refused is not None and "cannot be checked" in identity.refused and "ConnectionError" in identity.refused
