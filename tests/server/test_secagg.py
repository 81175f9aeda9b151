"""SecAgg+ in medfed: settings, the quantisation bound, dropouts, and what the server sees.

Two real Flower simulations (Ray) carry the acceptance checks:

* ``noise_run``: 5 noise sites (weights + seeded noise, recorded at each site), threshold 3, a
  server Grid that records everything it receives. Round 1 all sites; round 2 two sites die
  after key sharing; round 3 three die; round 4 all again (``secagg-on-failure = continue``).
* ``training_run``: 3 sites train simplecnn on 16x16 synthetic data for one round with SecAgg+;
  the result is compared with plain FedAvg of the same local training, redone in-process.

The failure paths that need timing or many configurations (a site that stops answering,
``secagg-on-failure = stop``) run on an in-process Grid (``tests/support/local_grid.py``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.server import ServerApp
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate
from flwr.simulation import run_simulation

from medfed.client.client_app import make_client_app
from medfed.client.egress import AUDIT_ENV
from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.server.failures import RunFailedError
from medfed.server.run_dir import read_metrics
from medfed.server.secure import (
    MODULUS_RANGE,
    SecAggOutcome,
    SecAggUpdateStrategy,
    quantization_error_bound,
    restore_weights,
    secagg_settings,
)
from medfed.server.server_app import ServerHooks, run_server
from medfed.shared.config import ConfigError, RunConfig
from medfed.simulations.simulate import ray_environment
from tests.support.local_grid import LocalGrid, server_identity
from tests.support.secagg_sites import ServerRecorder, read_true_updates, secagg_test_app

REPO = Path(__file__).resolve().parents[2]
FLOAT32_SLACK = 2.0**-20  # float32 rounding of FedAvg's in-place sums and of global + update


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"secagg_num_shares": 4, "num_sites": 8}, "secagg-num-shares = 4"),
        ({"secagg_num_shares": 2, "num_sites": 8}, "secagg-num-shares = 2"),
        ({"secagg_reconstruction_threshold": 1}, "secagg-reconstruction-threshold = 1"),
        ({"secagg_num_shares": 3, "secagg_reconstruction_threshold": 3, "num_sites": 5}, "[2, 2]"),
        ({"num_sites": 64}, "secagg-quantization-range = 67108864 is too large for 64 sites"),
        ({"num_sites": 1, "min_fit_clients": 1}, "at least 2 sites"),
    ],
)
def test_settings_reject_values_that_break_the_protocol(changes: dict, fragment: str) -> None:
    cfg = RunConfig(secagg=True, **{"num_sites": 5, **changes})
    with pytest.raises(ConfigError) as err:
        secagg_settings(cfg, num_sites=cfg.num_sites)
    assert fragment in str(err.value)


def test_settings_share_with_every_site_when_shares_cover_the_federation() -> None:
    cfg = RunConfig(secagg=True, num_sites=5, secagg_num_shares=5, secagg_reconstruction_threshold=3)
    settings = secagg_settings(cfg, num_sites=5)
    assert settings.num_shares == 1.0 and settings.neighbourhood == 5
    cfg7 = RunConfig(secagg=True, num_sites=7, secagg_num_shares=5, secagg_reconstruction_threshold=3)
    assert secagg_settings(cfg7, num_sites=7).num_shares == 5
    two = secagg_settings(RunConfig(secagg=True, num_sites=2), num_sites=2)  # the defaults work for 2 sites
    assert two.num_shares == 1.0 and two.reconstruction_threshold == 2
    # the defaults fit every federation up to 63 sites: 63 * 2^26 < 2^32
    assert 63 * RunConfig().secagg_quantization_range < MODULUS_RANGE


def _flower_secagg_sum(updates: list[np.ndarray], num_examples: list[int], c: float, q: int, w: float) -> np.ndarray:
    """Flower's SecAgg+ arithmetic without the masks (they cancel exactly modulo 2^32).

    Site side as in ``secaggplus_mod._collect_masked_vectors``, server side as in
    ``SecAggPlusWorkflow.unmask_stage``.
    """
    total = None
    for x, n in zip(updates, num_examples, strict=True):
        q_ratio = round(n / w * q)
        vec = quantize(parameters_multiply([x], q_ratio / q), c, q)
        vec = factor_combine(q_ratio, [v.astype(np.int64) for v in vec])
        total = vec if total is None else parameters_addition(total, vec)
    total = parameters_mod(total, MODULUS_RANGE)
    q_total, rest = factor_extract(total)
    out = dequantize(rest, c, q)[0] - (len(updates) - 1) * c
    return out * (q / q_total)


@pytest.mark.parametrize(
    ("c", "q", "w", "sizes", "scale"),
    [
        (8.0, 2**26, 1e5, [23, 23, 22], 0.03),  # medfed's defaults, tiny demo sites
        (8.0, 2**22, 1e3, [100, 300, 50, 999], 0.5),  # Flower's defaults for c and Q
        (0.5, 2**20, 64.0, [10, 20, 30, 40, 50], 0.01),  # coarse quantisation, tight weight bound
    ],
)
def test_quantization_bound_holds_and_is_tight(c: float, q: int, w: float, sizes: list[int], scale: float) -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, scale, 20_000) for _ in sizes]
    exact = aggregate([([u], n) for u, n in zip(updates, sizes, strict=True)])[0]
    secure = _flower_secagg_sum(updates, sizes, c, q, w)
    bound = quantization_error_bound(
        num_examples=sizes, clipping_range=c, quantization_range=q, max_weight=w,
        max_abs_update=max(float(np.abs(u).max()) for u in updates),
    )
    error = float(np.abs(secure - exact).max())
    assert error <= bound
    assert error >= bound / 20  # the bound is not vacuous: the error reaches a sizeable part of it


def test_large_buffers_survive_as_updates_but_not_as_weights() -> None:
    """Why sites send updates: BatchNorm variances of 50 are clipped at c = 8 when W is tight."""
    rng = np.random.default_rng(1)
    global_var = rng.uniform(40, 60, 5_000)
    local = [global_var + rng.normal(0, 0.1, global_var.size) for _ in range(3)]
    sizes, c, q, w = [50, 50, 50], 8.0, 2**26, 50.0  # max-weight right at the largest site: best precision
    exact = aggregate([([x], n) for x, n in zip(local, sizes, strict=True)])[0]
    as_weights = _flower_secagg_sum(local, sizes, c, q, w)
    assert float(np.abs(as_weights - exact).max()) > 30  # clipped to 8: garbage
    updates = [x - global_var for x in local]
    as_updates = global_var + _flower_secagg_sum(updates, sizes, c, q, w)
    bound = quantization_error_bound(num_examples=sizes, clipping_range=c, quantization_range=q, max_weight=w,
                                     max_abs_update=max(float(np.abs(u).max()) for u in updates))
    assert float(np.abs(as_updates - exact).max()) <= bound + 1e-12


def test_restore_weights_keeps_dtypes_and_rounds_counters() -> None:
    glob = [np.array([1.0, -2.0], np.float32), np.array(7, np.int64)]
    out = restore_weights(glob, [np.array([0.25, 0.5]), np.array(2.0004)])
    assert out[0].dtype == np.float32 and np.allclose(out[0], [1.25, -1.5])
    assert out[1].dtype == np.int64 and int(out[1]) == 9
    with pytest.raises(ValueError, match="update mod"):
        restore_weights(glob, [np.zeros(2)])


def test_update_strategy_adds_the_aggregate_to_the_global_model() -> None:
    inner = FedAvg()
    outer = SecAggUpdateStrategy(inner)
    glob = [np.full(3, 2.0, np.float32)]
    outer._global[1] = glob  # what configure_fit would have stored
    shared = ndarrays_to_parameters([np.array([0.5, 0.0, -1.0])])
    ok = Status(code=Code.OK, message="")
    results = [(None, FitRes(ok, shared, n, {})) for n in (10, 30)]
    params, _ = outer.aggregate_fit(1, results, [])
    assert np.allclose(parameters_to_ndarrays(params)[0], [2.5, 2.0, 1.0])
    outer._global[2] = glob
    separate = [(None, FitRes(ok, ndarrays_to_parameters([np.zeros(3)]), 1, {})) for _ in range(2)]
    with pytest.raises(ValueError, match="SecAgg"):
        outer.aggregate_fit(2, separate, [])



def test_when_no_site_trained_under_secagg_the_run_stops_instead_of_checking_a_void_aggregate(tmp_path: Path) -> None:
    """Every site refused the run (privacy policy) or declined: Flower's aggregate divides by a total weight of 0."""
    from torch import nn

    from medfed.server.recording import RecordingStrategy
    from medfed.server.run_dir import RunDirectory

    recorder = RecordingStrategy(FedAvg(), run_dir=RunDirectory(tmp_path / "run", config={}, mode="federated"),
                                 model=nn.Linear(3, 1), primary_metric="auc")
    invalid: list[int] = []
    outer = SecAggUpdateStrategy(recorder, on_invalid=lambda r, *a, **k: (invalid.append(r), (None, {}))[1])
    outer._global[1] = [np.full(3, 2.0, np.float32)]
    void = ndarrays_to_parameters([np.full(3, np.nan)])
    ok = Status(code=Code.OK, message="")
    metrics = [{"site-index": i, "policy-refused": 1, "policy-refused-dp-delta": 1} for i in range(2)]
    params, _ = outer.aggregate_fit(1, [(None, FitRes(ok, void, 0, m)) for m in metrics], [])
    assert params is None and invalid == [] and recorder.stopped_round == 1
    assert recorder.finish()["policy_refused"]["site-1"]["keys"] == ["dp-delta"]

# --------------------------------------------------------------------------- Ray: noise sites
NOISE_SIZES = [10, 20, 30, 40, 50]
DIE_AFTER_KEYS = Stage.COLLECT_MASKED_VECTORS  # the stage after key sharing
NOISE_PLAN = {2: (DIE_AFTER_KEYS, {3, 4}), 3: (DIE_AFTER_KEYS, {0, 1, 2})}


def _simulate(server: ServerApp, client, num_sites: int) -> None:
    ray_environment()  # as medfed simulate: sites at normal priority, not Ray's nice 15
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )


def _recording_server(cfg: RunConfig, run_path: Path, recorders: list[ServerRecorder]) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid, context: Context) -> None:
        recorder = ServerRecorder(grid)
        recorders.append(recorder)
        run_server(recorder, context, cfg, ServerHooks(), str(run_path))

    return server


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("secagg-noise")
    (tmp / "updates").mkdir()
    cfg = RunConfig(
        dataset="synthetic", synthetic_samples=96, model="simplecnn", image_size=16, batch_size=16,
        num_sites=5, min_fit_clients=5, num_server_rounds=4, run_dir=str(tmp / "runs"),
        secagg=True, secagg_num_shares=5, secagg_reconstruction_threshold=3, secagg_max_weight=64.0,
        secagg_timeout=60.0, fraction_evaluate=0.0,
    )
    recorders: list[ServerRecorder] = []
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # Ray workers import tests.*
    try:
        _simulate(
            _recording_server(cfg, tmp / "run", recorders),
            secagg_test_app(cfg, num_examples=NOISE_SIZES, out_dir=str(tmp / "updates"), plan=NOISE_PLAN),
            cfg.num_sites,
        )
    finally:
        mp.undo()
    final = torch.load(tmp / "run" / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    return cfg, tmp, recorders[0], read_metrics(tmp / "run"), [t.numpy() for t in final.values()]


def _global_after(recorder: ServerRecorder, final: list[np.ndarray], server_round: int) -> list[np.ndarray]:
    return recorder.globals_.get(server_round + 1, final)


def plain_fedavg(sites: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """What medfed's plain path computes from the same local weights: Flower's FedAvg.

    (Flower's in-place FedAvg casts the weights to the dtype of integer entries, so step
    counters come out as 0 with and without SecAgg+; float entries are the weighted mean.)
    """
    ok = Status(code=Code.OK, message="")
    results = [(None, FitRes(ok, ndarrays_to_parameters(w), n, {})) for w, n in sites]
    params, _ = FedAvg().aggregate_fit(1, results, [])
    return parameters_to_ndarrays(params)


def assert_close_to_plain(secure: list[np.ndarray], plain: list[np.ndarray], bound: float, label: object) -> None:
    """Float entries within the quantisation bound (plus float32 rounding); integer entries equal."""
    for i, (a, p) in enumerate(zip(secure, plain, strict=True)):
        a64, p64 = np.asarray(a, np.float64), np.asarray(p, np.float64)
        if np.asarray(a).dtype.kind in "iu":
            assert np.array_equal(a64, np.rint(p64)), (label, i)
            continue
        err = np.abs(a64 - p64)
        assert np.all(err <= bound + FLOAT32_SLACK * (np.abs(p64) + 1.0)), (label, i, float(err.max()), bound)


def _check_round_aggregate(cfg: RunConfig, tmp: Path, recorder: ServerRecorder, final, server_round: int, survivors: set[int]) -> None:
    """The new global model is plain FedAvg of the survivors' local weights, within the bound."""
    sites = read_true_updates(tmp / "updates", server_round)
    before, after = recorder.globals_[server_round], _global_after(recorder, final, server_round)
    local = [
        ([(np.asarray(g, np.float64) + u).astype(g.dtype) for g, u in zip(before, update, strict=True)], n)
        for p, (_, n, update) in sites.items()
        if p in survivors
    ]
    settings = secagg_settings(cfg, num_sites=cfg.num_sites)
    bound = settings.error_bound(
        [n for _, n in local],
        max_abs_update=max(float(np.abs(u).max()) for p, (_, _, update) in sites.items() if p in survivors for u in update),
    )
    assert bound < 1e-4  # with max-weight 64 the quantisation is fine: the check is meaningful
    assert_close_to_plain(after, plain_fedavg(local), bound, server_round)
    moved = max(float(np.abs(np.asarray(a, np.float64) - b).max()) for a, b in zip(after, before, strict=True))
    assert moved > 100 * bound  # the model did move by the (noise) updates


def test_server_never_receives_an_unmasked_update(noise_run) -> None:
    """Acceptance 2: masked vectors are uncorrelated with the true updates; the aggregate is right."""
    cfg, tmp, recorder, records, final = noise_run
    assert recorder.train_replies > 0 and recorder.train_reply_arrays == 0  # no array ever came back
    sites = read_true_updates(tmp / "updates", 1)
    assert len(sites) == 5 and set(recorder.masked[1]) == {node for node, _, _ in sites.values()}
    for node, _, update in sites.values():
        flat = np.concatenate([u.ravel() for u in update])
        assert flat.size >= 10_000
        corr = np.corrcoef(recorder.masked[1][node].astype(np.float64), flat)[0, 1]
        assert abs(corr) < 0.05, (node, corr)
    _check_round_aggregate(cfg, tmp, recorder, final, 1, survivors={0, 1, 2, 3, 4})


def test_secagg_aggregate_equals_weighted_fedavg_within_bound(noise_run) -> None:
    """Acceptance 1 (and FedAvg weighting): rounds 1 and 4 with all five sites of 10..50 examples."""
    cfg, tmp, recorder, records, final = noise_run
    _check_round_aggregate(cfg, tmp, recorder, final, 4, survivors={0, 1, 2, 3, 4})
    by_round = {r["round"]: r for r in records}
    assert by_round[4]["secagg"] == {**by_round[4]["secagg"], "sampled": 5, "survivors": 5, "dropped": 0, "completed": True}
    stages = by_round[4]["secagg"]["stage_seconds"]  # where a round's time went, stage by stage
    assert set(stages) == {"setup", "share-keys", "collect-masked-vectors", "unmask"}
    # Each of the five figures is rounded to 1 ms, so the four stages' sum may exceed the round's by
    # up to 5 x 0.5 ms (it did: 0.564 against 0.563, 2026-12-07).
    rounding = 5 * 0.0005 + 1e-9
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= by_round[4]["secagg"]["seconds"] + rounding
    fit = by_round[4]["sites"]  # what each site reports in the clear: its example count, no update
    assert sorted(s["fit"]["num_examples"] for s in fit.values()) == NOISE_SIZES


def test_two_dropouts_after_key_sharing_still_aggregate_the_survivors(noise_run) -> None:
    """Acceptance 3a: sites 3 and 4 die after sharing keys; the round averages sites 0-2."""
    cfg, tmp, recorder, records, final = noise_run
    rec = {r["round"]: r for r in records}[2]
    assert rec["secagg"]["completed"] and rec["secagg"]["survivors"] == 3 and rec["secagg"]["dropped"] == 2
    assert rec["fit_failures"] == 2 and rec["fit_results"] == 3
    _check_round_aggregate(cfg, tmp, recorder, final, 2, survivors={0, 1, 2})


def test_three_dropouts_fail_the_round_cleanly_and_the_run_continues(noise_run) -> None:
    """Acceptance 3b: below the threshold the round fails fast, the model is unchanged, round 4 runs."""
    cfg, tmp, recorder, records, final = noise_run
    by_round = {r["round"]: r for r in records}
    failed = by_round[3]["secagg"]
    assert failed["completed"] is False and failed["failed_stage"] == "collect-masked-vectors"
    assert failed["survivors"] == 2 and failed["seconds"] < cfg.secagg_timeout
    for b, a in zip(recorder.globals_[3], recorder.globals_[4], strict=True):
        assert np.array_equal(a, b)  # no update from the failed round
    assert by_round[4]["secagg"]["completed"] and [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert json.loads((tmp / "run" / "summary.json").read_text())["rounds"] == 4


# --------------------------------------------------------------------------- Ray: training
TRAIN = dict(dataset="synthetic", synthetic_samples=96, model="simplecnn", num_sites=3, num_server_rounds=1,
             local_epochs=1, batch_size=16, image_size=16)


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("secagg-train")
    cfg = RunConfig(run_dir=str(tmp / "runs"), secagg=True, **TRAIN)
    recorders: list[ServerRecorder] = []
    mp = pytest.MonkeyPatch()
    mp.setenv(AUDIT_ENV, str(tmp / "egress.jsonl"))
    try:
        _simulate(_recording_server(cfg, tmp / "run", recorders), make_client_app(cfg), cfg.num_sites)
    finally:
        mp.undo()
    return cfg, tmp, recorders[0]


def test_secagg_training_matches_plain_fedavg(training_run) -> None:
    """End to end: the SecAgg+ model equals plain FedAvg of the same local training, within the bound."""
    cfg, tmp, recorder = training_run
    glob = recorder.globals_[1]
    fit_config = {"server-round": 1, "learning-rate": cfg.learning_rate}
    local = []
    for i in range(cfg.num_sites):
        client = SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=i, num_sites=cfg.num_sites), site_index=i)
        weights, n, _ = client.fit([g.copy() for g in glob], fit_config)
        local.append((weights, n))
    updates = [np.asarray(w, np.float64) - np.asarray(g, np.float64) for ws, _ in local for w, g in zip(ws, glob, strict=True)]
    settings = secagg_settings(cfg, num_sites=cfg.num_sites)
    bound = settings.error_bound([n for _, n in local], max_abs_update=max(float(np.abs(u).max()) for u in updates))
    final = torch.load(tmp / "run" / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    assert_close_to_plain([t.numpy() for t in final.values()], plain_fedavg(local), bound, "final")
    records = read_metrics(tmp / "run")
    assert records[1]["secagg"]["completed"] and records[1]["secagg"]["survivors"] == 3
    assert {"auc", "loss"} <= set(records[1]["global"])
    assert records[1]["fit"]["secagg-clipped"] == 0  # nothing fell outside the clipping range


def test_sites_send_only_protocol_values_under_secagg(training_run) -> None:
    """The egress audit at the sites: training replies carry SecAgg+ records, never model arrays."""
    _, tmp, recorder = training_run
    reports = [json.loads(line) for line in (tmp / "egress.jsonl").read_text().splitlines()]
    train = [r for r in reports if r["message_type"] == "train"]
    assert len(train) == 4 * 3  # four SecAgg+ stages, three sites
    assert all(r["arrays"] == [] and r["protocol_records"] == [RECORD_KEY_CONFIGS] for r in train)
    assert all(r["protocol_bytes"] > 0 for r in train)
    assert recorder.train_reply_arrays == 0


# --------------------------------------------------------------------------- in-process Grid
def _local_run(cfg: RunConfig, tmp: Path, *, plan=None, silent=None) -> tuple[LocalGrid, list[dict], float]:
    app = secagg_test_app(cfg, num_examples=NOISE_SIZES[: cfg.num_sites], out_dir=str(tmp), plan=plan)
    grid = LocalGrid(app, num_nodes=cfg.num_sites, silent=silent)
    start = time.perf_counter()
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp / "run"))
    return grid, read_metrics(tmp / "run"), time.perf_counter() - start


LOCAL = dict(dataset="synthetic", synthetic_samples=96, model="simplecnn", image_size=16, batch_size=16,
             num_sites=5, min_fit_clients=5, secagg=True, secagg_num_shares=5, secagg_reconstruction_threshold=3,
             secagg_max_weight=64.0, fraction_evaluate=0.0)


def test_stop_on_failure_ends_the_run_after_the_failed_round(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path), num_server_rounds=3, secagg_on_failure="stop", **LOCAL)
    app = secagg_test_app(cfg, num_examples=NOISE_SIZES[: cfg.num_sites], out_dir=str(tmp_path),
                          plan={1: (DIE_AFTER_KEYS, {0, 1, 2})})
    grid = LocalGrid(app, num_nodes=cfg.num_sites)
    with server_identity(), pytest.raises(RunFailedError, match="no round completed in round 1"):
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp_path / "run"))  # nothing was ever aggregated: the run failed
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1]
    assert records[1]["secagg"]["completed"] is False
    assert {int(m.metadata.group_id) for m in grid.sent if m.metadata.message_type == "train"} == {1}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 0  # the final model is the initial one
    assert summary["status"] == "failed"


def test_sites_that_stop_answering_time_out_without_hanging(tmp_path: Path) -> None:
    """Silent sites (no reply at all): the round waits ``secagg-timeout`` once, then goes on or fails."""
    timeout = 0.5
    cfg = RunConfig(run_dir=str(tmp_path), num_server_rounds=3, secagg_timeout=timeout, **LOCAL)

    def silent(msg: Message, partition: int) -> bool:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        stage = configs.get(Key.STAGE) if configs is not None else None
        dead = {1: {3, 4}, 2: {0, 1, 2}}.get(int(msg.metadata.group_id), set())
        return stage == DIE_AFTER_KEYS and partition in dead

    _, records, seconds = _local_run(cfg, tmp_path, silent=silent)
    by_round = {r["round"]: r["secagg"] for r in records if r["round"] > 0}
    assert by_round[1]["completed"] and by_round[1]["survivors"] == 3
    assert by_round[2]["completed"] is False and by_round[2]["failed_stage"] == "collect-masked-vectors"
    assert by_round[3]["completed"] and by_round[3]["survivors"] == 5
    for r in (1, 2):
        assert timeout <= by_round[r]["seconds"] < timeout + 20  # waited for the silent sites, once
    assert seconds < 120


def test_outcome_json_counts_dropouts() -> None:
    outcome = SecAggOutcome(round=2, sampled=5, survivors=3, completed=True)
    assert outcome.to_json()["dropped"] == 2 and outcome.to_json()["failed_stage"] is None
