"""Update validation, robust strategies and their config checks (fast: no training, no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum

from medfed.client.update_mods import clip_update
from medfed.server.dashboard.read_models import RunReader
from medfed.server.run_dir import RoundRecord
from medfed.server.secure import SecAggUpdateStrategy
from medfed.server.store import RunStore
from medfed.server.strategies import MultiKrum, build_strategy
from medfed.server.validation import (
    NORM_CHUNK,
    REASONS,
    RoundValidation,
    ValidatingStrategy,
    check_aggregate,
    check_update,
    site_key,
    update_norm,
)
from medfed.shared.config import ConfigError, RunConfig, robust_min_sites
from medfed.simulations.faults import ATTACKS, Attack, attack_client_fn

OK = Status(code=Code.OK, message="")


def _model() -> list[np.ndarray]:
    """A tiny "model state": a conv weight, a bias, a BatchNorm variance and its step counter."""
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        np.zeros(4, np.float32),
        np.ones(4, np.float32),
        np.array(7, np.int64),
    ]


def _local(glob: list[np.ndarray], site: int, scale: float = 0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + site)
    out = [(g + rng.normal(0, scale, g.shape)).astype(g.dtype) if g.dtype.kind == "f" else g + 3 for g in glob]
    return out


def _res(weights: list[np.ndarray], site: int, n: int = 10) -> tuple[None, FitRes]:
    return None, FitRes(OK, ndarrays_to_parameters(weights), n, {"site-index": site})


# --------------------------------------------------------------------------- single updates
@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "count", "dtype"])
def test_every_broken_update_is_caught_with_its_reason(kind: str) -> None:
    glob = _model()
    sent = Attack(kind).apply(_local(glob, 1), global_weights=glob)
    finding, norm = check_update(sent, global_weights=glob)
    expected = {"nan": "nan", "inf": "inf", "shape": "shape", "count": "count", "dtype": "dtype"}[kind]
    assert finding is not None and finding.reason == expected and norm is None
    assert finding.reason in REASONS


def test_a_valid_update_passes_and_its_norm_leaves_out_step_counters() -> None:
    glob = _model()
    local = _local(glob, 1)
    finding, norm = check_update(local, global_weights=glob, max_update_norm=1.0)
    assert finding is None
    expected = math.sqrt(sum(float(((l.astype(np.float64) - g) ** 2).sum()) for l, g in zip(local[:3], glob[:3])))
    assert norm == pytest.approx(expected, rel=1e-9) and norm == update_norm(local, global_weights=glob)
    assert 0 < norm < 1.0  # the counter moved by 3, which alone would exceed the bound


@pytest.mark.parametrize("where", ["first-chunk", "last-chunk"])
@pytest.mark.parametrize("value, reason", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "inf")])
def test_a_large_update_is_normed_in_chunks_and_one_bad_entry_anywhere_is_caught(
    where: str, value: float, reason: str
) -> None:
    # More entries than NORM_CHUNK, so the norm is summed over several chunks; the finite check
    # runs only when the norm is not finite, so the bad entry must still make it so.
    rng = np.random.default_rng(3)
    glob = [rng.normal(size=(3 * NORM_CHUNK + 11,)).astype(np.float32), np.array(7, np.int64)]
    local = [(glob[0] + rng.normal(0, 0.01, glob[0].shape)).astype(np.float32), np.array(9, np.int64)]
    expected = float(np.sqrt(((local[0].astype(np.float64) - glob[0]) ** 2).sum()))
    finding, norm = check_update(local, global_weights=glob)
    assert finding is None and norm == pytest.approx(expected, rel=1e-12)
    local[0][5 if where == "first-chunk" else -1] = value
    finding, norm = check_update(local, global_weights=glob)
    assert finding is not None and finding.reason == reason and norm is None
    assert "first in array 0" in finding.detail


def test_fedavg_aggregates_pass_through_and_a_changed_dtype_is_cast_back() -> None:
    glob = _model()
    results = [_res(_local(glob, s), s) for s in range(3)]
    for strategy, dtype_changed in ((FedAvg(), False), (FedMedian(), True)):
        inner_params: list[Parameters] = []

        class Spy(type(strategy)):  # records what the wrapped rule returned
            def aggregate_fit(self, server_round, results, failures):
                params, metrics = super().aggregate_fit(server_round, results, failures)
                inner_params.append(params)
                return params, metrics

        wrapper = ValidatingStrategy(Spy())
        wrapper._global[1] = glob
        params, _ = wrapper.aggregate_fit(1, results, [])
        out = parameters_to_ndarrays(params)
        assert [a.dtype for a in out] == [g.dtype for g in glob]
        assert (params is inner_params[0]) is not dtype_changed  # re-encoded only when a dtype changed


def test_norm_bound_rejects_a_scaled_update_and_zero_turns_it_off() -> None:
    glob = _model()
    honest = _local(glob, 1)
    scaled = Attack("scale", factor=1e6).apply(honest, global_weights=glob)
    finding, norm = check_update(scaled, global_weights=glob, max_update_norm=100.0)
    assert finding is not None and finding.reason == "norm" and norm > 1e4
    assert "max-update-norm = 100" in finding.detail
    assert check_update(scaled, global_weights=glob, max_update_norm=0.0)[0] is None  # off


def test_sign_flip_points_the_update_the_other_way() -> None:
    glob = _model()
    honest = _local(glob, 2)
    flipped = Attack("sign-flip", factor=10.0).apply(honest, global_weights=glob)
    for h, f, g in zip(honest[:3], flipped[:3], glob[:3]):
        assert np.allclose(f.astype(np.float64) - g, -10.0 * (h.astype(np.float64) - g), atol=1e-5)
    assert int(flipped[3]) == int(honest[3])  # counters as trained


def test_attack_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="'nan'"):
        Attack("poison")
    assert set(ATTACKS) >= {"nan", "shape", "scale", "sign-flip"}


def test_attacks_refuse_deployment() -> None:
    with pytest.raises(ValueError, match="simulation only"):
        attack_client_fn(RunConfig(dataset="deployment", image_size=28), {0: Attack("nan")})


def test_site_key_survives_hostile_site_indices() -> None:
    assert site_key({"site-index": 3}, fallback=0) == "site-3"
    assert site_key({"site-index": 2.0}, fallback=0) == "site-2"
    for bad in (float("nan"), float("inf"), 1.5, True):
        assert site_key({"site-index": bad}, fallback=4) == "site-?4"
    assert site_key({}, fallback=1) == "site-1"


# --------------------------------------------------------------------------- the strategy wrapper
def _validating(strategy, **kw) -> tuple[ValidatingStrategy, list[RoundValidation], list[np.ndarray]]:
    reports: list[RoundValidation] = []
    glob = _model()
    wrapper = ValidatingStrategy(strategy, on_report=reports.append, **kw)
    wrapper._global[1] = glob  # what configure_fit stores
    return wrapper, reports, glob


def test_wrapper_aggregates_only_the_valid_updates_and_reports_the_rest() -> None:
    wrapper, reports, glob = _validating(FedAvg(), max_update_norm=1.0)
    honest = [_local(glob, s) for s in (0, 4)]
    results = [
        _res(honest[0], 0),
        _res(Attack("nan").apply(_local(glob, 1), global_weights=glob), 1),
        _res(Attack("shape").apply(_local(glob, 2), global_weights=glob), 2),
        _res(Attack("scale", factor=1e6).apply(_local(glob, 3), global_weights=glob), 3),
        _res(honest[1], 4),
        (None, FitRes(OK, Parameters(tensors=[b"not an array"], tensor_type="numpy.ndarray"), 10, {"site-index": 5})),
        _res(_local(glob, 6), 6, n=0),
    ]
    params, _ = wrapper.aggregate_fit(1, results, [])
    out = parameters_to_ndarrays(params)
    expected = FedAvg().aggregate_fit(1, [_res(h, i) for i, h in enumerate(honest)], [])[0]
    for a, b in zip(out, parameters_to_ndarrays(expected)):
        assert np.array_equal(a, b)
    assert [a.dtype for a in out] == [g.dtype for g in glob]
    report = reports[0]
    assert [(r["site"], r["reason"]) for r in report.rejected] == [
        ("site-1", "nan"), ("site-2", "shape"), ("site-3", "norm"), ("site-5", "unreadable"), ("site-6", "examples"),
    ]
    assert report.skipped is None
    assert set(report.norms) == {"site-0", "site-3", "site-4", "site-6"} and report.norms["site-3"] > 1e3


def test_nothing_valid_leaves_the_model_unchanged_and_says_so() -> None:
    wrapper, reports, glob = _validating(FedAvg())
    results = [_res(Attack("nan").apply(_local(glob, s), global_weights=glob), s) for s in range(3)]
    assert wrapper.aggregate_fit(1, results, []) == (None, {})
    assert len(reports[0].rejected) == 3 and "all 3 updates were rejected" in reports[0].skipped


def test_robust_rule_skips_a_round_with_too_few_valid_updates() -> None:
    wrapper, reports, glob = _validating(Krum(num_malicious_clients=1), min_updates=5, rule="krum")
    results = [_res(_local(glob, s), s) for s in range(4)] + [_res(Attack("inf").apply(_local(glob, 4), global_weights=glob), 4)]
    assert wrapper.aggregate_fit(1, results, []) == (None, {})
    assert "krum needs at least 5" in reports[0].skipped


def test_median_keeps_the_model_dtypes() -> None:
    """Flower's median returns float64 step counters; the global model keeps int64."""
    wrapper, _, glob = _validating(FedMedian())
    params, _ = wrapper.aggregate_fit(1, [_res(_local(glob, s), s) for s in range(3)], [])
    out = parameters_to_ndarrays(params)
    assert out[3].dtype == np.int64 and int(out[3]) == 10
    assert out[0].dtype == np.float32


def test_secagg_aggregate_check_drops_the_round() -> None:
    glob = _model()
    dropped: list[RoundValidation] = []

    def on_invalid(server_round: int, results: list, failures: list, *, report: RoundValidation) -> tuple[None, dict]:
        dropped.append(report)
        return None, {}

    outer = SecAggUpdateStrategy(FedAvg(), on_invalid=on_invalid)
    for bad, reason in (([np.zeros(a.shape) for a in glob[:3]], "count"), ([np.full(a.shape, np.nan) for a in glob], "nan")):
        outer._global[1] = glob
        shared = ndarrays_to_parameters(bad)
        results = [(None, FitRes(OK, shared, n, {})) for n in (10, 20)]
        assert outer.aggregate_fit(1, results, []) == (None, {})
        assert dropped[-1].rejected[0]["site"] == "aggregate" and dropped[-1].rejected[0]["reason"] == reason
        assert "unchanged" in dropped[-1].skipped
    good = [np.zeros(a.shape) for a in glob]
    good[3] = np.zeros(1)  # 0-d entries travel as shape (1,)
    assert check_aggregate(good, global_weights=glob) is None


def test_site_clips_its_update_to_the_bound_but_not_its_counters() -> None:
    update = [np.full(4, 3.0), np.full(3, 4.0), np.array([12.0])]
    clipped, scaled = clip_update(update, is_float=[True, True, False], max_norm=1.0)
    norm = math.sqrt(sum(float((u**2).sum()) for u in clipped[:2]))
    assert scaled and norm == pytest.approx(1.0) and clipped[2][0] == 12.0
    same, scaled = clip_update(update, is_float=[True, True, False], max_norm=100.0)
    assert not scaled and same is update


# --------------------------------------------------------------------------- robust strategies
FIVE = dict(num_sites=5, min_fit_clients=5)


@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("fedmedian", FedMedian, {}),
        ("fedtrimmedavg", FedTrimmedAvg, {}),
        ("krum", Krum, {}),
        ("multikrum", MultiKrum, {}),
        ("bulyan", Bulyan, {"num_sites": 7, "min_fit_clients": 7}),
    ],
)
def test_robust_strategies_are_flowers_and_aggregate(name: str, cls: type, extra: dict) -> None:
    cfg = RunConfig(strategy=name, **{**FIVE, **extra})
    glob = _model()
    strategy = build_strategy(cfg, initial_weights=glob, evaluate_fn=None, min_available_clients=cfg.num_sites)
    assert isinstance(strategy, cls)
    honest = [_local(glob, s) for s in range(cfg.num_sites - 1)]
    poisoned = Attack("sign-flip", factor=1e3).apply(_local(glob, 99), global_weights=glob)
    results = [_res(h, i) for i, h in enumerate(honest)] + [_res(poisoned, cfg.num_sites - 1)]
    params, _ = strategy.aggregate_fit(1, results, [])
    out = parameters_to_ndarrays(params)
    # The poisoned update is 1000x away; the robust aggregate stays among the honest ones.
    assert update_norm(out, global_weights=glob) <= max(update_norm(h, global_weights=glob) for h in honest) + 1e-6
    mean = FedAvg().aggregate_fit(1, results, [])[0]
    assert update_norm(parameters_to_ndarrays(mean), global_weights=glob) > 10 * update_norm(out, global_weights=glob)


def test_multikrum_keeps_all_but_the_malicious_of_each_round() -> None:
    strategy = build_strategy(RunConfig(strategy="multikrum", num_sites=6, min_fit_clients=6),
                              initial_weights=_model(), evaluate_fn=None, min_available_clients=6)
    glob = _model()
    strategy.aggregate_fit(1, [_res(_local(glob, s), s) for s in range(6)], [])
    assert strategy.num_clients_to_keep == 5
    strategy.aggregate_fit(2, [_res(_local(glob, s), s) for s in range(5)], [])
    assert strategy.num_clients_to_keep == 4


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_strategy_with_secagg_names_both_keys(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"strategy": name, "secagg": True, "num-sites": 9, "min-fit-clients": 9})
    assert "strategy" in str(err.value) and "secagg" in str(err.value) and name in str(err.value)


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"strategy": "krum", "num-sites": 4}, ["krum", "num-malicious-sites = 1", "at least 5", "select 4"]),
        ({"strategy": "bulyan", "num-sites": 6}, ["bulyan", "at least 7"]),
        ({"strategy": "fedmedian", "num-sites": 2}, ["fedmedian", "at least 3"]),
        ({"strategy": "fedtrimmedavg", "num-sites": 4}, ["trim-beta = 0.2", "num-malicious-sites = 1", "1/4"]),
        ({"strategy": "multikrum", "num-sites": 5, "num-sites-to-keep": 6}, ["num-sites-to-keep = 6", "at most 5"]),
        ({"strategy": "fedmedian", "client-dp": "fixed"}, ["fedmedian", "client-dp"]),
        ({"trim-beta": 0.5}, ["trim-beta", "[0, 0.5)"]),
        ({"max-update-norm": -1}, ["max-update-norm", ">= 0"]),
        ({"num-malicious-sites": -1}, ["num-malicious-sites", ">= 0"]),
    ],
)
def test_robust_knobs_are_validated(raw: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(raw)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_robust_minimums() -> None:
    assert robust_min_sites(RunConfig(strategy="krum", **FIVE)) == 5
    assert robust_min_sites(RunConfig(strategy="fedtrimmedavg", **FIVE)) == 5
    assert robust_min_sites(RunConfig(strategy="fedtrimmedavg", trim_beta=0.3, **FIVE)) == 4
    assert robust_min_sites(RunConfig(strategy="fedmedian", num_malicious_sites=0, num_sites=2)) == 1
    assert robust_min_sites(RunConfig()) == 1  # fedavg
    RunConfig(strategy="krum", num_malicious_sites=0, num_sites=3)  # f = 0 is allowed


def test_pyproject_declares_the_new_keys() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for key in ("max-update-norm", "trim-beta", "num-malicious-sites", "num-sites-to-keep"):
        assert declared[key] == RunConfig().to_run_config()[key]


# --------------------------------------------------------------------------- recording
def test_rejections_and_skips_become_store_events(tmp_path: Path) -> None:
    with RunStore(f"sqlite:///{tmp_path / 'medfed.db'}") as store:
        run_id = store.start_run("r", mode="federated", config={"num-server-rounds": 2})
        rejected = [{"site": "site-1", "node": "7", "reason": "nan", "detail": "3 NaN and 0 infinite entries"}]
        store.round_finished(run_id, RoundRecord(round=1, rejected=rejected).to_json())
        skipped = RoundRecord(round=2, rejected=rejected, skipped="all 1 updates were rejected: the global model is unchanged")
        store.round_finished(run_id, skipped.to_json())
        events = RunReader(store).events(run_id)
    rejections = [e for e in events if e["kind"] == "update-rejected"]
    assert [e["round"] for e in rejections] == [1, 2] and all(e["level"] == "warning" for e in rejections)
    assert "site-1's update rejected (nan: 3 NaN" in rejections[0]["message"]
    skips = [e for e in events if e["kind"] == "round-skipped"]
    assert len(skips) == 1 and skips[0]["round"] == 2 and skips[0]["level"] == "error"
    assert "unchanged" in skips[0]["message"]


# --------------------------------------------------------------------------- SecAgg+: the sites validate
def test_under_secagg_sites_refuse_nan_and_clip_to_the_bound(tmp_path: Path) -> None:
    """Site 0's update is NaN (it drops out), site 1's is 1e6-scaled (it clips itself to the bound)."""
    import torch
    from flwr.app import Context as AppContext
    from flwr.app import RecordDict
    from flwr.client import Client

    from medfed.client.client_app import make_client_app
    from medfed.server.run_dir import read_metrics
    from medfed.server.server_app import ServerHooks, run_server
    from medfed.simulations.bench.secagg import NoiseClient
    from medfed.simulations.faults import AttackingClient
    from tests.support.local_grid import LocalGrid, server_identity
    from tests.support.secagg_sites import ServerRecorder

    bound = 2.0  # the noise sites' honest updates have norm ~1.5 (scale 0.01, ~24k entries)
    cfg = RunConfig(
        dataset="synthetic", synthetic_samples=96, model="simplecnn", image_size=16, batch_size=16, num_sites=5,
        min_fit_clients=5, num_server_rounds=1, secagg=True, secagg_num_shares=5, secagg_reconstruction_threshold=3,
        secagg_max_weight=64.0, fraction_evaluate=0.0, max_update_norm=bound, run_dir=str(tmp_path), store="off",
    )
    attacks = {0: Attack("nan"), 1: Attack("scale", factor=1e6)}

    def client_fn(context: AppContext) -> Client:
        index = int(context.node_config["partition-id"])
        site = NoiseClient(site_index=index, num_examples=10 * (index + 1))
        return (AttackingClient(site, attack=attacks[index]) if index in attacks else site).to_client()

    grid = ServerRecorder(LocalGrid(make_client_app(cfg, client_fn=client_fn), num_nodes=5))
    with server_identity():
        run_server(grid, AppContext(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp_path / "run"))
    record = read_metrics(tmp_path / "run")[1]
    assert record["secagg"]["completed"] and record["secagg"]["survivors"] == 4  # site 0 did not send
    assert record["fit_failures"] == 1 and record["skipped"] is None
    clipped = {s: v["fit"]["update-clipped"] for s, v in record["sites"].items()}
    assert clipped == {"site-1": 1, "site-2": 0, "site-3": 0, "site-4": 0}
    before = grid.globals_[1]
    after = [t.numpy() for t in torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=False)["state_dict"].values()]
    moved = update_norm(after, global_weights=before)
    assert 0.1 < moved <= bound + 1e-3  # a mean of updates of norm <= bound (quantisation error ~1e-5)


def test_progress_table_shows_rejections() -> None:
    import io

    from rich.console import Console

    from medfed.simulations.progress import RunProgress

    console = Console(record=True, width=200, file=io.StringIO())
    progress = RunProgress(title="t", rounds=2, console=console)
    rejected = [{"site": "site-1", "node": "", "reason": "nan", "detail": ""}] * 2
    progress.records = [RoundRecord(round=1, num_fit_results=5, rejected=rejected),
                        RoundRecord(round=2, num_fit_results=2, rejected=rejected, skipped="all 2 updates were rejected")]
    console.print(progress.table())
    text = console.export_text()
    assert "5 (2 rejected)" in text and "2 (2 rejected) (not aggregated)" in text
