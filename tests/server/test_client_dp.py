"""Client-level DP at the server: wrapper order, Flower's accountant per round, noise calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import DifferentialPrivacyClientSideAdaptiveClipping, FedAvg, Strategy
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from torch import nn

from medfed.client.client_app import make_client_app
from medfed.server.recording import RecordingStrategy
from medfed.server.run_dir import RunDirectory, read_metrics
from medfed.server.secure import MedfedSecAggPlusWorkflow, SecAggUpdateStrategy
from medfed.server.server_app import ServerHooks, build_workflow, run_server
from medfed.server.strategies import (
    AccountedAdaptiveClipping,
    AccountedFixedClipping,
    ClientLevelLedger,
    build_strategy,
)
from medfed.shared.config import RunConfig
from medfed.simulations.bench.secagg import NoiseClient, noise_client_fn
from tests.support.local_grid import LocalGrid, server_identity

OK = Status(code=Code.OK, message="Success")


def _results(sizes: list[int], metrics: dict | None = None) -> list:
    params = ndarrays_to_parameters([np.zeros(3)])
    return [(None, FitRes(OK, params, n, dict(metrics or {}))) for n in sizes]


@pytest.mark.parametrize(("secagg", "client_dp", "wrapper"), [
    (True, "fixed", AccountedFixedClipping), (True, "adaptive", AccountedAdaptiveClipping), (False, "fixed", AccountedFixedClipping),
])
def test_wrappers_nest_recording_then_dp_then_fedavg(tmp_path: Path, secagg: bool, client_dp: str, wrapper: type) -> None:
    cfg = RunConfig(secagg=secagg, client_dp=client_dp, num_sites=5, client_dp_noise_multiplier=0.2)
    base = build_strategy(cfg, initial_weights=[np.zeros(2)], evaluate_fn=None, min_available_clients=5)
    recording = RecordingStrategy(base, run_dir=RunDirectory(tmp_path, config={}, mode="federated"),
                                  model=nn.Linear(1, 1), primary_metric="auc")
    workflow, outer = build_workflow(cfg, recording, num_sites=5)
    inner = outer.strategy if secagg else outer
    assert inner is recording and isinstance(recording.strategy, wrapper)
    assert type(recording.strategy.strategy) is FedAvg and recording.strategy.num_sampled_clients == 5
    assert isinstance(outer, SecAggUpdateStrategy) == secagg
    assert isinstance(workflow.fit_workflow, MedfedSecAggPlusWorkflow) == secagg
    assert isinstance(workflow, DefaultWorkflow)


def _flower_epsilon(z: float, rounds: int, population: int, delta: float = 1e-5) -> float:
    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=population, population_size=population), rounds)
    return accountant.get_epsilon(delta)


def test_ledger_equals_flowers_accountant_for_equal_sites_and_charges_weighting() -> None:
    equal = ClientLevelLedger(delta=1e-5, population=5)
    for _ in range(3):
        metrics = equal.release(results=_results([40] * 5), update_noise_multiplier=1.0, num_sampled=5)
    assert metrics["client-dp-noise-multiplier"] == pytest.approx(1.0)
    assert metrics["client-dp-epsilon"] == pytest.approx(_flower_epsilon(1.0, 3, 5), rel=1e-9)
    assert metrics["client-dp-releases"] == 3
    skewed = ClientLevelLedger(delta=1e-5, population=5)
    metrics = skewed.release(results=_results([10, 20, 30, 40, 50]), update_noise_multiplier=1.0, num_sampled=5)
    # the largest site holds 1/3 of the weight, not 1/5: its clipped update moves the mean 5/3 times more
    assert metrics["client-dp-noise-multiplier"] == pytest.approx(0.6)
    assert metrics["client-dp-epsilon"] == pytest.approx(_flower_epsilon(0.6, 1, 5), rel=1e-9)
    assert metrics["client-dp-epsilon"] > _flower_epsilon(1.0, 1, 5)


class _Zeros(Strategy):
    """Aggregates to zeros, so the returned parameters are the DP noise alone."""

    def __init__(self, size: int) -> None:
        self.size = size

    def aggregate_fit(self, server_round, results, failures):
        return ndarrays_to_parameters([np.zeros(self.size)]), {}

    def initialize_parameters(self, client_manager):  # pragma: no cover - unused
        return None

    def configure_fit(self, *args):  # pragma: no cover - unused
        return []

    def configure_evaluate(self, *args):  # pragma: no cover - unused
        return []

    def aggregate_evaluate(self, *args):  # pragma: no cover - unused
        return None, {}

    def evaluate(self, *args):  # pragma: no cover - unused
        return None


def test_adaptive_noise_is_calibrated_to_the_norm_the_sites_clipped_with() -> None:
    """Every site clipped, so the norm shrinks by ~10%: the noise must still follow this round's norm."""
    kwargs = dict(noise_multiplier=0.1, num_sampled_clients=5, initial_clipping_norm=1.0, clipped_count_stddev=0.1)
    results = _results([40] * 5, {"norm_bit": True})
    np.random.seed(0)
    ours = AccountedAdaptiveClipping(_Zeros(200_000), ledger=None, **kwargs)
    params, metrics = ours.aggregate_fit(1, results, [])
    measured = float(np.std(parameters_to_ndarrays(params)[0]))
    assert metrics["client-dp-clipping-norm"] == 1.0 and metrics["client-dp-next-clipping-norm"] < 0.95
    assert measured == pytest.approx(ours.noise_multiplier * 1.0 / 5, rel=0.02)
    np.random.seed(0)
    flowers = DifferentialPrivacyClientSideAdaptiveClipping(_Zeros(200_000), 0.1, 5, initial_clipping_norm=1.0,
                                                            clipped_count_stddev=0.1)
    params, _ = flowers.aggregate_fit(1, results, [])
    assert float(np.std(parameters_to_ndarrays(params)[0])) < 0.95 * measured  # Flower 1.42 under-noises this round


@pytest.mark.parametrize("secagg", [True, False])
def test_dp_run_reports_epsilon_per_round_and_adds_the_calibrated_noise(tmp_path: Path, secagg: bool) -> None:
    """5 noise sites (update norm ~7.7, clipped to 1), z = 0.5: model moves by the clipped weighted mean + noise."""
    sizes, z, clip = [10, 20, 30, 40, 50], 0.5, 1.0
    cfg = RunConfig(dataset="synthetic", synthetic_samples=96, model="simplecnn", image_size=16, batch_size=16,
                    num_sites=5, min_fit_clients=5, num_server_rounds=2, fraction_evaluate=0.0, run_dir=str(tmp_path),
                    secagg=secagg, secagg_num_shares=5, secagg_reconstruction_threshold=3, secagg_max_weight=64.0,
                    client_dp="fixed", client_dp_noise_multiplier=z, client_dp_clipping_norm=clip)
    grid = LocalGrid(make_client_app(cfg, client_fn=noise_client_fn(sizes, scale=0.05)), num_nodes=5)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp_path / "run"))
    records = read_metrics(tmp_path / "run")
    eps = [r["fit"]["client-dp-epsilon"] for r in records if r["round"] > 0]
    assert eps == pytest.approx([_flower_epsilon(0.3, k, 5) for k in (1, 2)], rel=1e-9)  # z / (5 * 50/150) = 0.3
    assert all(r["fit"]["client-dp-delta"] == cfg.dp_delta for r in records if r["round"] > 0)
    assert (records[1]["secagg"] is not None) == secagg

    sent = {}
    for msg in grid.sent:
        if msg.metadata.message_type == "train" and "fitins.parameters" in msg.content.array_records:
            fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            sent.setdefault(int(msg.metadata.group_id), parameters_to_ndarrays(fitins.parameters))
    before, after = sent[1], sent[2]
    floats = [i for i, g in enumerate(before) if g.dtype.kind == "f"]
    expected = [np.zeros(before[i].shape) for i in floats]
    for site, n in enumerate(sizes):
        noise = [NoiseClient(site_index=site, num_examples=n, scale=0.05).update(before, 1)[i] for i in floats]
        update = [(before[i] + u).astype(np.float64) - before[i].astype(np.float64) for i, u in zip(floats, noise, strict=True)]
        norm = float(np.sqrt(sum(float(np.sum(u**2)) for u in update)))
        assert norm > 5 * clip
        for e, u in zip(expected, update, strict=True):
            e += n / sum(sizes) * u * (clip / norm)
    residual = np.concatenate([(after[i].astype(np.float64) - before[i] - e).ravel() for i, e in zip(floats, expected, strict=True)])
    sigma = z * clip / 5
    assert abs(float(residual.mean())) < 5 * sigma / np.sqrt(residual.size)
    assert float(residual.std()) == pytest.approx(sigma, rel=0.03)
