"""medfed's Flower ServerApp (thin: strategies, recording and workflow are built here).

The workflow is Flower's legacy ``DefaultWorkflow`` over a ``LegacyContext``: the path on which
Flower 1.42 offers SecAgg+ (``SecAggPlusWorkflow``), so plain and secure aggregation share it.
Its per-round steps are wrapped by :class:`medfed.server.rounds.RoundStep` (round timeout, failed
sites, true round numbers in a resumed run; see ``docs/faults.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from flwr.app import Context
from flwr.common import NDArrays, Scalar
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
from flwr.serverapp import Grid
from torch import nn

from medfed.server.cross_site import run_cross_site
from medfed.server.evaluation import make_evaluate_fn
from medfed.server.failures import RunFailedError
from medfed.server.identity import SiteIdentities, enrolment_from_env
from medfed.server.recording import RecordingStrategy, RoundCallback
from medfed.server.resume import ResumePoint, restore_chain_state, restore_rng, resume_point
from medfed.server.rounds import RoundStep
from medfed.server.run_dir import RunDirectory, new_run_path
from medfed.server.secure import MedfedSecAggPlusWorkflow, SecAggOutcome, SecAggUpdateStrategy, secagg_settings
from medfed.server.strategies import build_strategy
from medfed.server.tracking import open_run_sink
from medfed.server.validation import ValidatingStrategy
from medfed.shared.config import RunConfig, robust_min_sites
from medfed.shared.config_sources import config_from_run_config
from medfed.shared.data.base import DataSplits
from medfed.shared.data.loading import load_dataset
from medfed.shared.inference import model_shape_for
from medfed.shared.models import model_task
from medfed.shared.precision import eval_dtype
from medfed.shared.preflight import check_dp_model
from medfed.shared.seeding import seed_everything
from medfed.shared.task import initial_model_with_report, model_for
from medfed.shared.training import reestimate_bn, select_device
from medfed.shared.weights import get_weights, trainable_mask

__all__ = [
    "app", "make_server_app", "ServerHooks", "primary_metric_for", "build_workflow", "run_server", "simulation_evaluate_fn",
]

logger = logging.getLogger(__name__)


@dataclass
class ServerHooks:
    """Optional observers of a run (set by ``medfed simulate``)."""

    on_start: Callable[[RunDirectory], None] | None = None
    on_round: RoundCallback | None = None
    on_finish: Callable[[dict[str, object]], None] | None = None
    on_final_model: Callable[[list], dict[str, object]] | None = None
    """Called with the final global weights (a list of arrays) before the summary is written;
    what it returns is added to the summary (``medfed simulate``: the sites' personalization)."""


def primary_metric_for(task: str) -> str:
    """The higher-is-better metric that picks the best checkpoint."""
    return {"segmentation": "dice", "detection": "map50"}.get(task, "auc")


def simulation_evaluate_fn(
    cfg: RunConfig, splits: DataSplits
) -> Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]]]:
    """The server's evaluation of each round's global model in a simulation (it holds the data).

    Scores on the test split at a threshold chosen on the validation split, after re-estimating
    BatchNorm statistics on the pooled training split when the sites keep theirs
    (``bn-mode != "global"``): :func:`medfed.server.evaluation.make_evaluate_fn`.
    """
    return make_evaluate_fn(
        model_for(cfg, splits.train), splits.test, val=splits.val,
        bn_data=splits.train if cfg.bn_mode != "global" else None, roi_size=cfg.patch_size,
        dtype=eval_dtype(cfg.eval_precision, device=select_device("auto"), task=splits.task),
        threshold_rule=cfg.decision_threshold,
    )


def run_server(grid: Grid, context: Context, cfg: RunConfig, hooks: ServerHooks, run_path: str | None) -> None:
    """Build the model, strategy and run directory, then run the rounds.

    With ``cfg.resume`` the run continues in that directory (and run-store run) after its last
    completed round; ``run_path``, if given, must be that directory.

    Raises
    ------
    server.resume.ResumeError
        ``cfg.resume`` cannot be continued (see :func:`medfed.server.resume.resume_point`).
    shared.preflight.PreflightError
        ``dp = true`` with a model DP-SGD cannot train (checked before any site is asked).
    server.failures.RunFailedError
        Every site failed a round, or no round completed (``medfed.server.failures``); the summary
        and the run store say so, and the run directory is resumable from its last completed
        round.

    With ``cfg.cross_site`` (and ``fraction-evaluate > 0``: at 0 no site evaluates anything)
    every site then scores the final model on its local test split
    (:mod:`medfed.server.cross_site`: ``cross_site.json``, the run store, ``summary.json``'s
    ``cross_site``).
    """
    seed_everything(cfg.seed)
    point: ResumePoint | None = None
    if cfg.resume:
        if run_path is not None and Path(run_path).resolve() != Path(cfg.resume).resolve():
            raise ValueError(f"resume = {cfg.resume!r} but the run directory was given as {run_path!r}: they must agree.")
        point = resume_point(cfg)
        run_path = str(point.path)
    prepare: Callable[[nn.Module], object] | None = None
    if cfg.is_deployment:  # the server holds no data: shape from the config, sites evaluate
        (model, init_report), evaluate_fn, task = initial_model_with_report(cfg, None), None, model_task(cfg.model)
    else:
        splits = load_dataset(cfg)
        model, init_report = initial_model_with_report(cfg, splits.train)  # with init-weights loaded
        task = splits.task
        bn_data = splits.train if cfg.bn_mode != "global" else None
        evaluate_fn = simulation_evaluate_fn(cfg, splits)
        if bn_data is not None:  # the sites keep their statistics: the checkpoints get pooled ones
            device = select_device("auto")
            prepare = partial(reestimate_bn, data=bn_data, device=device)
    check_dp_model(cfg, model=model, task=task)  # before any site is asked to train
    run_dir = RunDirectory(
        run_path or new_run_path(cfg.run_dir, name=f"{cfg.strategy}-s{cfg.seed}"),
        config=cfg.to_run_config(),
        mode="federated",
        sink=open_run_sink(cfg),
        resume_after=point.state.round if point else None,
        run_id=point.state.run_id if point else None,
    )
    run_dir.model_shape = model_shape_for(cfg, None if cfg.is_deployment else splits.train).to_json()
    if init_report is not None and point is None:
        run_dir.write_init_weights(init_report.to_json())
    if cfg.is_deployment:
        _record_app_bundle(grid, run_dir, signed=bool(cfg.app_signature))
    if hooks.on_start:
        hooks.on_start(run_dir)
    num_sites = cfg.num_sites
    aggregator = build_strategy(
        cfg,
        initial_weights=get_weights(model),
        evaluate_fn=evaluate_fn,
        min_available_clients=num_sites,
        trainable=trainable_mask(model),
    )
    validator: ValidatingStrategy | None = None
    if not cfg.secagg:  # under SecAgg+ the sites validate; the server checks the aggregate
        aggregator = validator = ValidatingStrategy(
            aggregator, max_update_norm=cfg.max_update_norm, min_updates=robust_min_sites(cfg), rule=cfg.strategy
        )
    strategy = RecordingStrategy(
        aggregator,
        run_dir=run_dir,
        model=model,
        primary_metric=primary_metric_for(task),
        on_round=hooks.on_round,
        min_results=1 if cfg.secagg else min(cfg.min_fit_clients, num_sites),
        resume=point.state if point else None,
        identities=SiteIdentities(nodes=grid.get_nodes, enrolled=enrolment_from_env()),
        prepare_checkpoint=prepare,
    )
    if validator is not None:
        validator.on_report = strategy.record_validation
        validator.site_of = strategy.site_of
    done = point.state.round if point else 0
    workflow, outer = build_workflow(cfg, strategy, num_sites=num_sites, first_round=done + 1)
    strategy.outer = outer
    if point is not None:
        restore_chain_state(outer, point.state.strategies, source=str(point.path / "checkpoints" / "resume.pt"))
        restore_rng(point.state.rng)  # the server's random state as it was after round `done`
        logger.warning("run %s resumed after round %d of %d", run_dir.path.name, done, cfg.num_server_rounds)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.num_server_rounds - done, round_timeout=cfg.round_timeout or None),
        strategy=outer,
    )
    try:
        workflow(grid, legacy)
        strategy.check_progress(first_round=done + 1, last_round=cfg.num_server_rounds)
        weights = strategy.final_weights() if strategy.failure is None else None
        extra = hooks.on_final_model(weights) if hooks.on_final_model and weights is not None else None
        if cfg.cross_site and cfg.fraction_evaluate > 0 and weights is not None:  # no site evaluates at 0
            # the server's evaluation chose it on validation data (deployment: none, each site chooses its own)
            threshold = None if cfg.is_deployment else strategy.final_metrics.get("threshold")
            extra = {**(extra or {}), **run_cross_site(
                grid, cfg=cfg, weights=weights, threshold=threshold, identities=strategy.identities, task=task,
                run_dir=run_dir, server_round=strategy.latest_round,
            )}
        summary = strategy.finish(extra=extra)  # a failed run's summary says so, and the run store too
    except BaseException as err:
        run_dir.fail(err)  # the run store shows the run as failed
        raise
    if strategy.failure is not None:
        raise RunFailedError(strategy.failure, run_dir=run_dir.path, last_round=strategy.latest_round)
    logger.info("run finished; results in %s", run_dir.path)
    if hooks.on_finish:
        hooks.on_finish(summary)



def _record_app_bundle(grid: Grid, run_dir: RunDirectory, *, signed: bool) -> None:
    """Write the deployed app bundle's hash (Flower's ``Run.fab_hash``) into the run directory."""
    try:
        fab_hash = str(grid.run.fab_hash or "")
    except (AttributeError, RuntimeError, ValueError):  # a Grid without a run (tests)
        fab_hash = ""
    if fab_hash:
        run_dir.write_app_bundle(fab_hash, signed=signed)
    else:
        logger.warning("the app bundle's hash is unknown (Flower gave none): the model card cannot show it.")


def build_workflow(
    cfg: RunConfig, strategy: RecordingStrategy, *, num_sites: int, first_round: int = 1
) -> tuple[DefaultWorkflow, Strategy]:
    """The legacy workflow and the strategy it drives.

    Plain: ``DefaultWorkflow`` with Flower's fit and evaluate steps over ``strategy``. SecAgg+
    (``cfg.secagg``): the fit step is ``SecAggPlusWorkflow`` (medfed's subclass, which records
    each round's survivors and dropouts into the run directory) over
    :class:`~medfed.server.secure.SecAggUpdateStrategy` wrapping ``strategy`` (sites send updates; it
    checks the securely aggregated update, drops the round if it is not finite or not
    model-shaped, and adds it back to the global model). Without SecAgg+, ``strategy`` already
    validates every update (``medfed.server.validation``). The plain fit step and the
    evaluate step are wrapped in :class:`~medfed.server.rounds.RoundStep` (``round-timeout``, failed
    sites reported to ``strategy``; SecAgg+ has its own per-stage timeout and records its own
    dropouts). Rounds are numbered from ``first_round`` (a resumed run: ``DefaultWorkflow``
    itself counts from 1, so it is given ``num_server_rounds - first_round + 1`` rounds and the
    fit step adds the offset).

    Raises
    ------
    ConfigError
        If the ``secagg-*`` keys do not fit the federation (see :func:`medfed.server.secure.secagg_settings`).
    """
    timeout = cfg.round_timeout or None
    evaluate_step = RoundStep(
        default_evaluate_workflow, step="evaluate", timeout=timeout, on_failures=strategy.note_failures
    )
    if not cfg.secagg:
        fit_step = RoundStep(
            default_fit_workflow,
            step="fit",
            round_offset=first_round - 1,
            timeout=timeout,
            on_failures=strategy.note_failures,
        )
        return DefaultWorkflow(fit_workflow=fit_step, evaluate_workflow=evaluate_step), strategy
    settings = secagg_settings(cfg, num_sites=num_sites)
    logger.info("%s", settings.describe())
    outer = SecAggUpdateStrategy(strategy, on_failure=settings.on_failure, on_invalid=strategy.drop_round)

    def on_outcome(outcome: SecAggOutcome) -> None:
        strategy.annotate_round(outcome.round, secagg=outcome.to_json())
        outer.record_outcome(outcome)

    fit_workflow = MedfedSecAggPlusWorkflow(settings, on_outcome=on_outcome, round_offset=first_round - 1)
    return DefaultWorkflow(fit_workflow=fit_workflow, evaluate_workflow=evaluate_step), outer


def make_server_app(
    cfg: RunConfig | None = None,
    *,
    hooks: ServerHooks | None = None,
    run_path: str | None = None,
    tune_grid: Callable[[Grid], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``cfg`` (simulation), or reading the run config (``flwr run``).

    ``tune_grid``: called with the grid before the run (a simulation shortens the in-memory
    grid's waits for replies: ``medfed.simulations.engine_tuning.tune_grid``); ``None`` leaves
    the grid as Flower made it.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if tune_grid is not None:
            tune_grid(grid)
        run_cfg = cfg or config_from_run_config(context.run_config)
        run_server(grid, context, run_cfg, hooks or ServerHooks(), run_path)

    return app


app = make_server_app()
