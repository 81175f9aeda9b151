"""SecAgg+ protocol cost: round time and upload size, SecAgg+ against plain FedAvg.

Run ``python -m medfed.simulations.bench.secagg`` (about 10 minutes on 2 CPU cores; ``--help`` for
options). Every configuration runs twice in Flower's simulation engine (Ray), once with the
plain legacy workflow and once with medfed's SecAgg+ path (``medfed.server.secure`` workflow and
update adapter, ``medfed.client.client_app.privacy_mods`` at the sites, the egress guard included).
The sites are :class:`NoiseClient`\\ s, which return the global weights plus Gaussian noise at
once, so the figures measure the protocol and the framework, not training (the worst case
for the ratio). With ``--train-model NAME`` the sites are medfed's real ones instead: each
trains ``NAME`` for one local epoch on its share of a synthetic dataset
(``--samples-per-site`` training images), as in a real round.

Reported per configuration (sites x model size), both sides measured in one process on one
machine:

* round time: median over rounds 2..R of the server's time from ``configure_fit`` to the end
  of ``aggregate_fit`` (round 1 includes starting the Ray workers);
* upload per site per round: bytes of everything a site's replies to training messages carry
  (arrays, masked vectors, keys, encrypted shares, metrics), as received by the server, over
  the model's float32 size.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import make_ffn, secaggplus_mod
from flwr.common import FitRes, NDArrays, Parameters, Scalar, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid
from flwr.simulation import run_simulation

from medfed.client.client_app import BoundClientApp, make_client_app, privacy_mods, site_client_fn
from medfed.client.egress import egress_guard
from medfed.client.secagg_packed import packed_secaggplus_mod
from medfed.server.secure import MedfedSecAggPlusWorkflow, SecAggOutcome, SecAggUpdateStrategy, secagg_settings
from medfed.shared.config import RunConfig
from medfed.shared.data.loading import load_dataset
from medfed.shared.models import model_task
from medfed.shared.secagg_masks import DEFAULT_MASK_GENERATOR, FLOWER_MASK_GENERATOR, MASK_GENERATORS
from medfed.shared.seeding import seed_everything
from medfed.shared.site_process import simulated_site_environment
from medfed.shared.task import model_for
from medfed.shared.weights import get_weights
from medfed.simulations.bench.figures import check_rows
from medfed.simulations.bench.support import append_results_rows, bench_command, fmt, line_plot, ratio
from medfed.simulations.engine_tuning import engine_polls, server_threads, tune_grid
from medfed.simulations.simulate import ray_environment, ray_init_args, start_ray, stop_ray

if TYPE_CHECKING:
    from medfed.simulations.bench import BenchContext, SectionResult

__all__ = [
    "NoiseClient", "noise_client_fn", "model_arrays", "payload_bytes", "BenchResult", "run_bench", "secagg_section",
    "main",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sites
class NoiseClient(NumPyClient):
    """A site that returns the global weights plus seeded Gaussian noise, without training.

    Integer entries (step counters) grow by ``site_index + 1`` per round.

    Parameters
    ----------
    site_index
        Reported as the ``site-index`` metric; part of the noise seed.
    num_examples
        The FedAvg weight it reports.
    scale
        Standard deviation of the noise added to every floating-point entry.
    seed
        Base seed; the noise of round ``r`` is drawn from ``(seed, site_index, r)``.
    """

    def __init__(self, *, site_index: int, num_examples: int, scale: float = 0.01, seed: int = 0) -> None:
        self.site_index = site_index
        self.num_examples = num_examples
        self.scale = scale
        self.seed = seed

    def update(self, parameters: NDArrays, server_round: int) -> NDArrays:
        """What this site adds in ``server_round``: noise, and ``site_index + 1`` to integer entries.

        Integer entries stand for step counters such as BatchNorm's ``num_batches_tracked``.
        """
        rng = np.random.default_rng([self.seed, self.site_index, server_round])
        return [
            rng.normal(0.0, self.scale, p.shape).astype(p.dtype)
            if p.dtype.kind == "f"
            else np.full_like(p, self.site_index + 1)
            for p in parameters
        ]

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """``parameters + noise`` at once."""
        server_round = int(config.get("server-round", 0))
        noise = self.update(parameters, server_round)
        return [p + u for p, u in zip(parameters, noise, strict=True)], self.num_examples, {"site-index": self.site_index}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Nothing to evaluate: a zero loss."""
        return 0.0, self.num_examples, {"site-index": self.site_index}


class NoiseClientFn:
    """A ``client_fn``: partition ``i`` becomes ``NoiseClient(num_examples=num_examples[i])``.

    A module-level class, so the simulation pickles it by reference, as medfed's own
    :class:`~medfed.client.client_app.SiteClientFn`.
    """

    def __init__(self, num_examples: Sequence[int], *, scale: float = 0.01) -> None:
        self.sizes = list(num_examples)
        self.scale = scale

    def __call__(self, context: Context) -> Client:
        index = int(context.node_config["partition-id"])
        return NoiseClient(site_index=index, num_examples=self.sizes[index], scale=self.scale).to_client()


def noise_client_fn(num_examples: Sequence[int], *, scale: float = 0.01) -> Callable[[Context], Client]:
    """A ``client_fn``: partition ``i`` becomes ``NoiseClient(num_examples=num_examples[i])``."""
    return NoiseClientFn(num_examples, scale=scale)


def model_arrays(num_params: int, *, num_layers: int = 10, seed: int = 0) -> NDArrays:
    """``num_params`` float32 values in ``num_layers`` arrays, like a model's state (weights ~ N(0, 0.05))."""
    rng = np.random.default_rng(seed)
    sizes = [num_params // num_layers] * num_layers
    sizes[-1] += num_params - sum(sizes)
    return [rng.normal(0.0, 0.05, size).astype(np.float32) for size in sizes]


# --------------------------------------------------------------------------- measuring
def payload_bytes(message: Message) -> int:
    """Bytes a message's content carries: arrays, bytes and numbers (no protocol framing)."""
    if not message.has_content():
        return 0
    total = 0
    for record in message.content.array_records.values():
        total += sum(int(array.numpy().nbytes) for array in record.values())
    for records in (message.content.config_records, message.content.metric_records):
        for record in records.values():
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


class UploadCountingGrid:
    """Wraps a Grid; adds up the payload of every reply to a training message, per round."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.uploads: dict[str, int] = defaultdict(int)
        self.replies: dict[str, set[int]] = defaultdict(set)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.message_type == "train":
                self.uploads[reply.metadata.group_id] += payload_bytes(reply)
                self.replies[reply.metadata.group_id].add(reply.metadata.src_node_id)
        return replies


class RoundTimer(Strategy):
    """Delegates to ``strategy``; records each round's ``configure_fit`` .. ``aggregate_fit`` time."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy
        self.seconds: dict[int, float] = {}
        self._start: dict[int, float] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        self._start[server_round] = time.perf_counter()
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list) -> tuple:
        out = self.strategy.aggregate_fit(server_round, results, failures)
        self.seconds[server_round] = time.perf_counter() - self._start[server_round]
        return out

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


@dataclass
class BenchResult:
    """One configuration, one side (plain or SecAgg+)."""

    sites: int
    num_params: int
    secagg: bool
    round_seconds: list[float] = field(default_factory=list)
    upload_per_site: float = 0.0
    stage_seconds: list[dict[str, float]] = field(default_factory=list)
    """SecAgg+ only: each round's seconds per protocol stage (``SecAggOutcome.stage_seconds``)."""

    def median_stages(self) -> dict[str, float]:
        """Median seconds of each stage over rounds 2.. (round 1 starts the workers)."""
        later = self.stage_seconds[1:] or self.stage_seconds
        return {k: statistics.median(d[k] for d in later if k in d) for k in (later[0] if later else {})}

    @property
    def median_round(self) -> float:
        """Median over rounds 2.. (round 1 starts the workers)."""
        later = self.round_seconds[1:] or self.round_seconds
        return statistics.median(later)


def training_config(*, model: str, sites: int, samples_per_site: int, rounds: int, secagg: bool) -> RunConfig:
    """The run config of a real-training round: ``model`` on a synthetic set, 1 local epoch.

    The synthetic set is split 70/15/15, so each site trains on about ``samples_per_site``
    images; segmentation models get 32x32 masks (UNet sides must divide by 16).
    """
    task = model_task(model)
    return RunConfig(
        num_sites=sites,
        min_fit_clients=sites,
        num_server_rounds=rounds,
        secagg=secagg,
        model=model,
        norm="instance" if task == "segmentation" else "batch",
        synthetic_task=task,  # type: ignore[arg-type]
        synthetic_samples=max(int(samples_per_site * sites / 0.7), 30),
        image_size=32 if task == "segmentation" else 0,
        local_epochs=1,
        store="off",
    )


def run_interleaved(
    *,
    sites: int,
    num_params: int,
    rounds: int = 3,
    num_cpus: int = 1,
    train_model: str | None = None,
    samples_per_site: int = 64,
    mask_generator: str = DEFAULT_MASK_GENERATOR,
) -> tuple[BenchResult, BenchResult]:
    """Plain and SecAgg+ rounds alternating in one simulation: ``(plain, secure)``, ``rounds`` each.

    Odd rounds run Flower's plain fit workflow over the timing strategy, even rounds medfed's
    SecAgg+ workflow over :class:`~medfed.server.secure.SecAggUpdateStrategy`; the sites run
    medfed's SecAgg+ mods only for SecAgg+ messages (:func:`_secure_messages_mod`), so a plain
    round is exactly :func:`run_bench`'s plain round. Both kinds share the Ray workers, the
    sites' warm state and the machine's load of the moment, which two separate runs do not:
    on a shared 2-core machine the plain round of one run and of the next differed by up to
    20 %, more than the effect being measured.
    """
    plain, secure = _simulate(
        mode="interleaved", sites=sites, num_params=num_params, rounds=rounds, num_cpus=num_cpus,
        train_model=train_model, samples_per_site=samples_per_site, mask_generator=mask_generator,
    )
    assert secure is not None
    return plain, secure


def run_bench(
    *,
    sites: int,
    num_params: int,
    secagg: bool,
    rounds: int = 3,
    num_cpus: int = 1,
    flower_only: bool = False,
    train_model: str | None = None,
    samples_per_site: int = 64,
    tuned: bool = True,
    packed: bool = True,
    mask_generator: str = DEFAULT_MASK_GENERATOR,
) -> BenchResult:
    """Simulate ``rounds`` rounds of ``sites`` :class:`NoiseClient` sites; time the rounds.

    The server is medfed's: ``build_workflow``'s choice of plain ``DefaultWorkflow`` or
    SecAgg+ (:class:`~medfed.server.secure.MedfedSecAggPlusWorkflow` over
    :class:`~medfed.server.secure.SecAggUpdateStrategy`), FedAvg weighting, no evaluation.
    ``flower_only`` (with ``secagg``) runs Flower's bare SecAgg+ instead (``SecAggPlusWorkflow``,
    ``secaggplus_mod`` alone: no update mod, no egress guard), to separate medfed's own cost.
    ``train_model`` replaces the noise sites by medfed's real ones training that model (see
    :func:`training_config`); ``num_params`` is then the model's own size.
    ``tuned`` (default) runs the simulation as ``medfed simulate`` does (0.02 s polls, the server
    process's torch threads: :mod:`medfed.simulations.engine_tuning`; Ray started by
    :func:`~medfed.simulations.simulate.start_ray`); ``False`` keeps Flower's 0.1 s polls and
    Ray start. ``packed=False`` (with ``secagg``) swaps medfed's 32-bit site stage
    for Flower's own ``secaggplus_mod`` (int64 masked vectors), everything else unchanged, and
    with it Flower's mask generator. ``mask_generator`` is ``secagg-mask-generator`` otherwise.
    """
    if not packed or flower_only:
        mask_generator = FLOWER_MASK_GENERATOR  # Flower's site mod draws only Flower's masks
    return _simulate(
        mode="secagg" if secagg else "plain", sites=sites, num_params=num_params, rounds=rounds,
        num_cpus=num_cpus, flower_only=flower_only, train_model=train_model,
        samples_per_site=samples_per_site, tuned=tuned, packed=packed, mask_generator=mask_generator,
    )[0]


def _simulate(
    *,
    mode: str,
    sites: int,
    num_params: int,
    rounds: int,
    num_cpus: int,
    train_model: str | None,
    samples_per_site: int,
    mask_generator: str,
    flower_only: bool = False,
    tuned: bool = True,
    packed: bool = True,
) -> tuple[BenchResult, BenchResult | None]:
    """One simulation for :func:`run_bench` (``mode`` plain or secagg) or :func:`run_interleaved`."""
    secagg = mode != "plain"
    interleaved = mode == "interleaved"
    total_rounds = 2 * rounds if interleaved else rounds
    if train_model:
        cfg = training_config(
            model=train_model, sites=sites, samples_per_site=samples_per_site, rounds=total_rounds, secagg=secagg
        )
        seed_everything(cfg.seed)
        initial = get_weights(model_for(cfg, load_dataset(cfg).train))
        num_params = sum(int(a.size) for a in initial)
    else:
        cfg = RunConfig(
            num_sites=sites, min_fit_clients=sites, num_server_rounds=total_rounds, secagg=secagg, model="simplecnn"
        )
        initial = model_arrays(num_params)
    cfg = cfg.replace(secagg_mask_generator=mask_generator)
    num_examples = [100 + 10 * i for i in range(sites)]
    timer = RoundTimer(
        FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=sites,
            min_evaluate_clients=0,
            min_available_clients=sites,
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=lambda r: {"server-round": r},
        )
    )
    result = BenchResult(sites=sites, num_params=num_params, secagg=secagg)
    plain_result = BenchResult(sites=sites, num_params=num_params, secagg=False) if interleaved else None
    counting: list[UploadCountingGrid] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if tuned:
            tune_grid(grid)
        wrapped = UploadCountingGrid(grid)
        counting.append(wrapped)
        if secagg and flower_only:
            settings = secagg_settings(cfg, num_sites=sites)
            outer, workflow = timer, DefaultWorkflow(
                fit_workflow=SecAggPlusWorkflow(
                    num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
                    max_weight=settings.max_weight, quantization_range=settings.quantization_range,
                )
            )
        elif secagg:
            settings = secagg_settings(cfg, num_sites=sites)
            outer = SecAggUpdateStrategy(timer)
            def on_outcome(outcome: SecAggOutcome, record=outer.record_outcome) -> None:
                result.stage_seconds.append(dict(outcome.stage_seconds))
                record(outcome)

            secure_fit = MedfedSecAggPlusWorkflow(settings, on_outcome=on_outcome)
            fit = _AlternatingFit(secure_fit, secure=outer, plain=timer) if interleaved else secure_fit
            workflow = DefaultWorkflow(fit_workflow=fit)
        else:
            outer, workflow = timer, DefaultWorkflow()
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=total_rounds), strategy=outer)
        workflow(wrapped, legacy)  # type: ignore[arg-type]

    client_fn = site_client_fn(cfg) if train_model else noise_client_fn(num_examples)
    if flower_only:
        client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    elif interleaved:
        client_app = BoundClientApp(cfg, client_fn=client_fn, mods=[_secure_messages_mod(cfg)])
    elif packed:
        client_app = make_client_app(cfg, client_fn=client_fn)
    else:  # medfed's mods with Flower's own SecAgg+ site stage
        mods = [secaggplus_mod if m is packed_secaggplus_mod else m for m in privacy_mods(cfg)]
        client_app = ClientApp(client_fn=client_fn, mods=[egress_guard, *mods])
    ray_environment()
    polls, threads = (engine_polls(), server_threads()) if tuned else (nullcontext(), nullcontext())
    with polls, threads, simulated_site_environment():
        started_ray = start_ray(verbose=False) if tuned else False
        try:
            run_simulation(
                server_app=server,
                client_app=client_app,
                num_supernodes=sites,
                backend_config={
                    "client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0},
                    "init_args": ray_init_args(verbose=False),
                },
            )
        finally:
            if started_ray:
                stop_ray()
    if len(timer.seconds) != total_rounds:
        raise RuntimeError(f"only {len(timer.seconds)} of {total_rounds} rounds finished; see the log above.")
    grid = counting[0]
    for out, parity in ((result, 0), (plain_result, 1)) if interleaved else ((result, None),):
        assert out is not None
        kept = [r for r in sorted(timer.seconds) if parity is None or r % 2 == parity]
        out.round_seconds = [timer.seconds[r] for r in kept]
        out.upload_per_site = statistics.mean(
            grid.uploads[str(r)] / max(len(grid.replies[str(r)]), 1) for r in kept
        )
    if interleaved:
        return plain_result, result  # type: ignore[return-value]
    return result, None


class _AlternatingFit:
    """A fit workflow: Flower's plain fit in odd rounds, ``secure`` (SecAgg+) in even rounds.

    ``LegacyContext.strategy`` is switched per round: the SecAgg+ wrapper in even rounds, the
    plain (timing) strategy in odd ones; both end in the same FedAvg.
    """

    def __init__(self, secure_fit: Callable[[Grid, Any], None], *, secure: Strategy, plain: Strategy) -> None:
        self.secure_fit, self.secure, self.plain = secure_fit, secure, plain

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        if current % 2 == 0:
            context.strategy = self.secure
            self.secure_fit(grid, context)
        else:
            context.strategy = self.plain
            default_fit_workflow(grid, context)


class _SecureMessagesMod:
    """Runs medfed's SecAgg+ site mods (:func:`privacy_mods`) for SecAgg+ messages only.

    A plain round's message carries no ``secaggplus_configs`` record and goes straight to the
    client, as in a run without SecAgg+ (weights, float32; no update mod). A class, so the
    ClientApp pickles by reference (:class:`~medfed.client.client_app.BoundClientApp`).
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.secure_mods = privacy_mods(cfg)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_SecureMessagesMod, (self.cfg,))

    def __call__(self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
            return make_ffn(call_next, self.secure_mods)(msg, context)
        return call_next(msg, context)


def _secure_messages_mod(cfg: RunConfig) -> _SecureMessagesMod:
    """The mod of an interleaved run's sites (:class:`_SecureMessagesMod`)."""
    return _SecureMessagesMod(cfg)


def _figure_row(
    plain: BenchResult,
    secure: BenchResult,
    *,
    training: bool,
    interleaved: bool,
    model: str = "",
    mask_generator: str = DEFAULT_MASK_GENERATOR,
) -> dict[str, Any]:
    """One ``results.json`` row (section ``secagg``) from a plain and a SecAgg+ measurement."""
    fp32 = 4 * plain.num_params
    row: dict[str, Any] = {
        "sites": plain.sites,
        "params": plain.num_params,
        "time_ratio": round(secure.median_round / plain.median_round, 3),
        "upload_ratio": round(secure.upload_per_site / fp32, 4),
        "upload_ratio_plain": round(plain.upload_per_site / fp32, 4),
        "plain_s": round(plain.median_round, 4),
        "secagg_s": round(secure.median_round, 4),
        "added_s_per_million_params": round((secure.median_round - plain.median_round) / (plain.num_params / 1e6), 4),
        "training": training,
        "interleaved": interleaved,
        "mask_generator": mask_generator,
        "load": os.getloadavg()[0],
    }
    if model:
        row["model"] = model
    return row


def secagg_section(ctx: BenchContext) -> SectionResult:
    """Section ``secagg`` of ``medfed bench``: SecAgg+ / plain round time and upload per site.

    For each model size and number of sites of the profile, plain and SecAgg+ rounds alternating
    in one simulation (:func:`run_interleaved`); plot: round time vs number of sites.
    """
    from medfed.simulations.bench import SectionResult, Table, Target

    p = ctx.profile
    table = Table(
        title="SecAgg+ vs plain FedAvg (NoiseClient sites: the protocol, not training, is timed)",
        columns=["model parameters", "sites", "plain round s", "SecAgg+ round s", "SecAgg+ / plain time",
                 "upload per site, plain / fp32 model", "upload per site, SecAgg+ / fp32 model",
                 "SecAgg+ upload per site (MB)"],
    )
    result = SectionResult(tables=[table])
    rows: list[dict[str, Any]] = []
    result.figures["secagg"] = rows
    for num_params in p.secagg_params:
        plain_s: list[float] = []
        secure_s: list[float] = []
        for sites in p.secagg_sites:
            plain, secure = run_interleaved(sites=sites, num_params=num_params, rounds=p.secagg_rounds)
            fp32 = 4 * num_params
            if sites == (8 if 8 in p.secagg_sites else max(p.secagg_sites)) and num_params == p.secagg_params[0]:
                result.targets.append(Target.check(
                    f"SecAgg+ / plain round time ({sites} sites, {num_params / 1e6:g}M parameters)", "issue 19",
                    value=secure.median_round / plain.median_round, at_most=2.0,
                    limits="issue 19's target (issue 3 asked 1.5): four message exchanges against the plain round's "
                    "one, key agreement, Shamir shares, mask expansion; see BENCHMARKS.md for the profile",
                ))
                result.targets.append(Target.check(
                    f"SecAgg+ upload per site / fp32 model ({sites} sites, {num_params / 1e6:g}M parameters)",
                    "issue 19", value=secure.upload_per_site / fp32, at_most=1.1,
                ))
            rows.append(_figure_row(plain, secure, training=False, interleaved=True))
            plain_s.append(plain.median_round)
            secure_s.append(secure.median_round)
            table.add(
                f"{num_params:,d}", sites, fmt(plain.median_round, 2), fmt(secure.median_round, 2),
                ratio(secure.median_round, plain.median_round), ratio(plain.upload_per_site, fp32),
                ratio(secure.upload_per_site, fp32), fmt(secure.upload_per_site / 1e6, 2),
            )
        result.plots.append(
            line_plot(
                ctx.plot_path(f"secagg-sites-{num_params // 1000}k.png"),
                series={"plain FedAvg": (list(p.secagg_sites), plain_s), "SecAgg+": (list(p.secagg_sites), secure_s)},
                title=f"Round time vs sites ({num_params / 1e6:g}M-parameter model, no training)",
                xlabel="sites", ylabel="seconds per round (median of rounds 2..R)",
            )
        )
    train_table = Table(
        title="SecAgg+ vs plain FedAvg with real sites (medfed's SiteClient training one local epoch)",
        columns=["model", "parameters", "sites", "plain round s", "SecAgg+ round s", "SecAgg+ / plain time"],
    )
    result.tables.append(train_table)
    if not p.secagg_train_model:
        train_table.add_unavailable("not run: the quick profile times the protocol only; --profile full adds this",
                                    "all configurations")
    for sites in p.secagg_sites if p.secagg_train_model else ():
        plain, secure = run_interleaved(sites=sites, num_params=0, rounds=p.secagg_rounds,
                                        train_model=p.secagg_train_model)
        train_table.add(p.secagg_train_model, f"{plain.num_params:,d}", sites, fmt(plain.median_round, 2),
                        fmt(secure.median_round, 2), ratio(secure.median_round, plain.median_round))
        rows.append(_figure_row(plain, secure, training=True, interleaved=True, model=p.secagg_train_model))
    train_table.notes.append(
        "Synthetic 32x32 data, about 64 training images per site, one local epoch per round: the cost SecAgg+ adds "
        "to a round that trains, beside the protocol-only figures above."
    )
    table.notes.append(
        f"Conditions: {p.secagg_rounds} rounds per configuration, median round time over rounds 2..{p.secagg_rounds} "
        "(round 1 starts Ray's workers), server time from configure_fit to the end of aggregate_fit; upload: every "
        "byte of a site's replies to training messages (arrays, masked vectors, keys, shares, metrics) over the "
        "fp32 model size. Flower's simulation engine on this machine, one CPU per site."
    )
    result.commands.append(ctx.reproduce("secagg"))
    result.commands.append(
        "python -m medfed.simulations.bench.secagg --sites " + " ".join(str(s) for s in p.secagg_sites)
        + " --params " + " ".join(f"{n:g}" for n in p.secagg_params) + f" --rounds {p.secagg_rounds}"
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table: SecAgg+ / plain round time and upload per site over the fp32 model size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 7e6], help="model sizes (parameters)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flower-only", action="store_true", help="also time Flower's bare SecAgg+ (no medfed mods)")
    parser.add_argument(
        "--train-model", nargs="+", default=None,
        help="real sites training these registry models 1 local epoch (replaces --params), e.g. unet densenet121",
    )
    parser.add_argument("--samples-per-site", type=int, default=64, help="training images per site (--train-model)")
    parser.add_argument(
        "--before", action="store_true",
        help="also run the untuned pair (Flower's 0.1 s polls, Flower's int64 site stage) in the same process",
    )
    parser.add_argument(
        "--interleave", action="store_true",
        help="plain and SecAgg+ rounds alternate in one simulation (--rounds of each), instead of two runs",
    )
    parser.add_argument(
        "--mask-generator", choices=MASK_GENERATORS, default=DEFAULT_MASK_GENERATOR,
        help="secagg-mask-generator of medfed's SecAgg+ runs (the --before and --flower-only runs use Flower's)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="run the plain / SecAgg+ pair N times, interleaved; the row reports the median ratio of the pairs "
             "(a shared machine's load drifts between runs)",
    )
    parser.add_argument(
        "--record", type=Path, default=None, metavar="RESULTS_JSON",
        help="append this run's rows to section 'secagg' of this file (e.g. docs/bench/results.json)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1.")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 includes starting Ray; the medians use rounds 2..R).")
    figures: list[dict[str, Any]] = []
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows = []
    stages: list[tuple[str, dict[str, float]]] = []
    workloads: list[tuple[int, str | None]] = (
        [(0, name) for name in args.train_model] if args.train_model else [(int(p), None) for p in args.params]
    )
    for num_params, train_model in workloads:
        for sites in args.sites:
            common = {"sites": sites, "num_params": num_params, "rounds": args.rounds, "train_model": train_model,
                      "samples_per_site": args.samples_per_site, "mask_generator": args.mask_generator}
            pairs = []
            for _ in range(args.repeat):
                if args.interleave:
                    plain, secure = run_interleaved(**common)  # type: ignore[arg-type]
                else:
                    plain = run_bench(secagg=False, **common)  # type: ignore[arg-type]
                    secure = run_bench(secagg=True, **common)  # type: ignore[arg-type]
                pairs.append((secure.median_round / plain.median_round, plain, secure))
            _, plain, secure = sorted(pairs, key=lambda pair: pair[0])[len(pairs) // 2]  # median (upper of two)
            num_params = plain.num_params
            stages.append((f"{train_model or 'noise'} {num_params / 1e6:.1f}M x {sites} sites", secure.median_stages()))
            figure = _figure_row(plain, secure, training=bool(train_model), interleaved=args.interleave,
                                 model=train_model or "", mask_generator=args.mask_generator)
            figure["pair_ratios"] = [round(r, 3) for r, _, _ in pairs]
            if train_model:
                figure["samples_per_site"] = args.samples_per_site
            figures.append(figure)
            fp32 = 4 * num_params
            row = (
                f"{train_model or 'noise'}  {num_params / 1e6:4.1f}M  {sites:5d}  {plain.median_round:8.2f}  {secure.median_round:8.2f}  "
                f"{secure.median_round / plain.median_round:6.2f}  {plain.upload_per_site / fp32:7.2f}  "
                f"{secure.upload_per_site / fp32:7.2f}"
            )
            if args.repeat > 1:
                row += "  pairs " + ", ".join(f"{r:.2f}" for r, _, _ in pairs)
            if args.flower_only:
                bare = run_bench(sites=sites, num_params=num_params, secagg=True, rounds=args.rounds, flower_only=True)
                row += f"  {bare.median_round:8.2f}  {bare.median_round / plain.median_round:6.2f}"
            if args.before:
                plain0 = run_bench(secagg=False, tuned=False, **common)  # type: ignore[arg-type]
                secure0 = run_bench(secagg=True, tuned=False, packed=False, **common)  # type: ignore[arg-type]
                row += (f"  {plain0.median_round:8.2f}  {secure0.median_round:8.2f}  "
                        f"{secure0.median_round / plain0.median_round:6.2f}  {secure0.upload_per_site / fp32:7.2f}")
                figure["before_time_ratio"] = round(secure0.median_round / plain0.median_round, 3)
                figure["before_upload_ratio"] = round(secure0.upload_per_site / fp32, 4)
            rows.append(row)
            print(row, flush=True)
    print()
    sites_kind = (
        f"real sites training 1 local epoch on {args.samples_per_site} synthetic images each"
        if args.train_model else "NoiseClient sites"
    )
    layout = "alternating in one simulation" if args.interleave else "in two simulations"
    print(f"SecAgg+ benchmark ({args.rounds} rounds of each kind, {layout}; median round time over rounds "
          f"2..{args.rounds} of each; {os.cpu_count()} CPUs; {sites_kind}, FedAvg, no evaluation)")
    header = "sites_do  model  sites  plain_s  secagg_s  ratio  plain_up/fp32  secagg_up/fp32"
    print(header + ("  flower_secagg_s  flower_ratio" if args.flower_only else "")
          + ("  before_plain_s  before_secagg_s  before_ratio  before_up/fp32" if args.before else ""))
    for row in rows:
        print(row)
    if stages:
        print("\nSecAgg+ seconds per stage (median over rounds 2..), medfed's side of each row:")
        for label, medians in stages:
            print(f"{label}  " + "  ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    if args.record is not None:
        command = bench_command("medfed.simulations.bench.secagg", argv if argv is not None else sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d", time.gmtime())
        for figure, (_, medians) in zip(figures, stages, strict=True):
            figure.update(command=command, measured_at=stamp, stage_seconds={k: round(v, 3) for k, v in medians.items()})
        append_results_rows(args.record, "secagg", check_rows("secagg", figures))
        print(f"\nwrote {len(figures)} rows to section 'secagg' of {args.record}")


if __name__ == "__main__":
    # Run the importable module's ``main``, not ``__main__``'s: cloudpickle pickles what ``__main__``
    # defines (the noise sites, the mods) by value, class source included, with every message
    # (9.0 KB, 0.84 ms of the server's time each: bench.secagg_parts); from the module, by reference.
    from medfed.simulations.bench.secagg import main as _main

    _main()
