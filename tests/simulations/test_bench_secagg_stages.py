"""The SecAgg+ benchmarks: per-stage medians skip round 1, the interleaved workflow, the parts command."""

from __future__ import annotations

from medfed.simulations.bench.secagg import BenchResult


def test_median_stages_skip_the_first_round() -> None:
    rounds = [
        {"setup": 10.0, "share-keys": 0.1, "collect-masked-vectors": 0.5, "unmask": 0.2},
        {"setup": 0.04, "share-keys": 0.06, "collect-masked-vectors": 0.44, "unmask": 0.17},
        {"setup": 0.06, "share-keys": 0.08, "collect-masked-vectors": 0.52, "unmask": 0.15},
        {"setup": 0.05, "share-keys": 0.07, "collect-masked-vectors": 0.48, "unmask": 0.19},
    ]
    result = BenchResult(sites=8, num_params=1_000_000, secagg=True, stage_seconds=rounds)
    assert result.median_stages() == {"setup": 0.05, "share-keys": 0.07, "collect-masked-vectors": 0.48, "unmask": 0.17}
    assert BenchResult(sites=8, num_params=1, secagg=False).median_stages() == {}


def test_interleaved_rounds_alternate_a_real_plain_round_and_a_secagg_round() -> None:
    """``--interleave``'s workflow on an in-process grid: odd rounds are plain FedAvg of float32 weights
    (no SecAgg+ record, no update mod), even rounds SecAgg+ (masked uint32 vectors), and the global
    model after each round is the example-weighted mean of the sites' weights (exactly when plain,
    within the quantisation error under SecAgg+)."""
    import numpy as np
    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow

    from medfed.client.egress import egress_guard
    from medfed.server.secure import MedfedSecAggPlusWorkflow, SecAggUpdateStrategy, secagg_settings
    from medfed.shared.config import RunConfig
    from medfed.simulations.bench.secagg import (
        NoiseClient,
        _AlternatingFit,
        _secure_messages_mod,
        model_arrays,
        noise_client_fn,
    )
    from tests.support.local_grid import LocalGrid, server_identity

    sizes, sites = [100, 110, 120], 3
    cfg = RunConfig(num_sites=sites, min_fit_clients=sites, secagg=True, model="simplecnn")
    initial = model_arrays(3000, num_layers=3)
    globals_after: dict[int, list[np.ndarray]] = {}

    class Capture(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            globals_after[server_round] = parameters_to_ndarrays(out[0])
            return out

    plain = Capture(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites, min_available_clients=sites,
                    initial_parameters=ndarrays_to_parameters(initial), on_fit_config_fn=lambda r: {"server-round": r})
    secure = SecAggUpdateStrategy(plain)
    fit = _AlternatingFit(MedfedSecAggPlusWorkflow(secagg_settings(cfg, num_sites=sites)), secure=secure, plain=plain)
    sent_dtypes: dict[int, set[str]] = {1: set(), 2: set(), 3: set(), 4: set()}

    def record_uploads(msg, ctx, call_next):  # outermost: what leaves the site, before the server reads it
        reply = call_next(msg, ctx)
        if msg.metadata.message_type == "train" and reply.has_content():
            kept = sent_dtypes[int(msg.metadata.group_id)]
            kept |= {str(a.numpy().dtype) for rec in reply.content.array_records.values() for a in rec.values()}
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
            kept |= {f"masked {bytes_to_ndarray(b).dtype}" for b in configs.get(Key.MASKED_PARAMETERS, [])}
        return reply

    app = ClientApp(client_fn=noise_client_fn(sizes), mods=[record_uploads, egress_guard, _secure_messages_mod(cfg)])
    grid = LocalGrid(app, num_nodes=sites)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with server_identity():
        DefaultWorkflow(fit_workflow=fit)(grid, LegacyContext(context=context, config=ServerConfig(num_rounds=4),
                                                              strategy=secure))
    assert sorted(globals_after) == [1, 2, 3, 4]
    assert sent_dtypes == {1: {"float32"}, 2: {"masked uint32"}, 3: {"float32"}, 4: {"masked uint32"}}
    previous = initial
    for server_round in range(1, 5):
        sent = [NoiseClient(site_index=i, num_examples=n).fit(previous, {"server-round": server_round})[0]
                for i, n in enumerate(sizes)]
        expected = [sum(n * w[k].astype(np.float64) for n, w in zip(sizes, sent, strict=True)) / sum(sizes)
                    for k in range(len(initial))]
        tolerance = 1e-6 if server_round % 2 else 1e-3
        for got, want in zip(globals_after[server_round], expected, strict=True):
            assert np.max(np.abs(got - want)) < tolerance, server_round
        previous = globals_after[server_round]


def test_secagg_parts_times_every_part_it_names() -> None:
    from medfed.shared.secagg_masks import MASK_GENERATORS
    from medfed.simulations.bench.secagg_parts import measure

    rows = dict(measure(repeat=1))
    for generator in MASK_GENERATORS:
        for size in ("1M", "11.2M"):
            assert float(rows[f"one mask, {size} entries, {generator}"].removesuffix(" ms")) > 0
    assert float(rows["quantisation and stochastic rounding, 11.2M entries"].removesuffix(" ms")) > 0
    for label in ("1M", "11.2M"):
        assert float(rows[f"quantisation and stochastic rounding, {label} entries"].removesuffix(" ms")) > 0
    for dtype in ("float64", "float32"):
        assert float(rows[f"writing a 1M-entry update for the next mod, {dtype}"].removesuffix(" ms")) > 0
    assert {k for k in rows if "Shamir" in k} == {
        "Shamir shares of one secret (8 shares, threshold 5), Flower's create_shares",
        "Shamir shares of one secret (8 shares, threshold 5), medfed's create_shares",
        "one secret from 3 Shamir shares, Flower's combine_shares",
        "one secret from 3 Shamir shares, medfed's combine_shares",
        "8 secrets from 8 Shamir shares each, in 8 orders, medfed's combine_shares (cache cleared)",
    }
    assert float(rows["decoding a site's secret key from bytes"].removesuffix(" ms")) > 0
    for parser in ("NumPy's parser (np.load)", "medfed's npy_view (cached)"):
        assert float(rows[f"one .npy header, {parser}"].removesuffix(" us")) >= 0
    by_value = rows["pickling the SecAgg+ bench's noise-site app, by value"]
    by_reference = rows["pickling the SecAgg+ bench's noise-site app, by reference"]
    assert int(by_reference.split(", ")[1].removesuffix(" bytes")) < int(by_value.split(", ")[1].removesuffix(" bytes"))
    bound = rows["pickling the app per message, medfed's BoundClientApp"]
    plain = rows["pickling the app per message, Flower's ClientApp with medfed's SecAgg+ mods"]
    assert int(bound.split(", ")[1].removesuffix(" bytes")) < int(plain.split(", ")[1].removesuffix(" bytes"))
