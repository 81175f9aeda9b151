"""The pooled (centralized) baseline: the same model, loop and epochs on all sites' data at once.

A federated run of R rounds x E local epochs shows each training image R x E times; the pooled run
trains R x E epochs on the union of the sites' data, with the same cosine learning-rate schedule
stepped once per "round" (every E epochs), and is evaluated on the same test split after each, so
the two are compared in one harness.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from medfed.server.failures import RunFailedError
from medfed.server.run_dir import RoundRecord, RunDirectory, new_run_path
from medfed.server.server_app import ServerHooks, primary_metric_for
from medfed.server.tracking import open_run_sink
from medfed.shared.config import RunConfig
from medfed.shared.inference import model_shape_for
from medfed.shared.partition import training_pool
from medfed.shared.precision import eval_dtype
from medfed.shared.preflight import preflight
from medfed.shared.seeding import seed_everything
from medfed.shared.task import initial_model_with_report, round_settings, training_criterion
from medfed.shared.trainable import apply_trainable, trainable_parameters
from medfed.shared.training import (
    evaluate,
    evaluate_at_validation_threshold,
    make_optimizer,
    make_train_loader,
    select_device,
    train_epochs,
)
from medfed.simulations.interrupt import RunInterrupted, interruptible
from medfed.simulations.simulate import SimulationResult

__all__ = ["run_pooled"]

logger = logging.getLogger(__name__)


def run_pooled(
    cfg: RunConfig, *, hooks: ServerHooks | None = None, run_path: str | Path | None = None
) -> SimulationResult:
    """Train ``cfg.model`` on the pooled training split; evaluate on the test split each round.

    The pooled training data is what the simulated sites train on together: the training split
    less the sites' local test splits (``local-test-fraction``). It trains with the sites' loss
    (:func:`medfed.shared.task.training_criterion`: ``loss = "auto"`` is balanced softmax for
    classification, its class prior from the pooled counts), so a federated/pooled ratio
    compares training regimes, not losses. Each round's decision
    threshold is chosen on the validation split (``evaluate_at_validation_threshold``).

    Returns
    -------
    SimulationResult
        With one :class:`RoundRecord` per round-equivalent and the same run-directory layout as a
        federated run (``config.json`` says ``"mode": "pooled"``).

    Raises
    ------
    DataError, ValueError
        The data cannot be read or the model does not fit it (:func:`medfed.shared.preflight.preflight`).
    server.failures.RunFailedError
        Training or evaluation raised: the message names the round and the error; the run
        store records the run as failed.
    simulations.interrupt.RunInterrupted
        SIGINT or SIGTERM: ``summary.json`` says ``"status": "interrupted"`` (a pooled run
        cannot be resumed).
    """
    hooks = hooks or ServerHooks()
    seed_everything(cfg.seed)
    splits = preflight(cfg, federated=False).splits
    if splits is None:  # preflight(federated=False) refuses a config without data
        raise RuntimeError("the pooled baseline needs data")
    device = select_device()
    dtype = eval_dtype(cfg.eval_precision, device=device, task=splits.task)  # evaluation and BatchNorm passes
    model, init_report = initial_model_with_report(cfg, splits.train)  # with init-weights loaded
    apply_trainable(model, mode=cfg.trainable, model_name=cfg.model)  # trainable: the rest is frozen
    pool, _ = training_pool(splits.train.class_labels(), seed=cfg.seed, local_test_fraction=cfg.local_test_fraction)
    train_data = splits.train.subset(pool)  # what the simulated sites train on together (no local tests)
    criterion = training_criterion(cfg, train_data)  # the sites' loss; a label-skew prior from the pooled counts
    path = Path(run_path) if run_path else new_run_path(cfg.run_dir, name=f"pooled-s{cfg.seed}")
    run_dir = RunDirectory(path, config=cfg.to_run_config(), mode="pooled", sink=open_run_sink(cfg))
    run_dir.model_shape = model_shape_for(cfg, splits.train).to_json()
    if init_report is not None:
        run_dir.write_init_weights(init_report.to_json())
    if hooks.on_start:
        hooks.on_start(run_dir)
    result = SimulationResult(run_dir=path)
    primary = primary_metric_for(splits.task)
    best = float("-inf")
    best_round: int | None = None
    best_metrics: dict[str, float] = {}
    start = time.perf_counter()

    def record_round(record: RoundRecord) -> None:
        run_dir.write_round(record)
        result.rounds.append(record)
        if hooks.on_round:
            hooks.on_round(record)

    server_round = 0
    with interruptible() as interrupt:
        try:
            window = cfg.patch_size
            initial = evaluate_at_validation_threshold(
                model, splits.test, val=splits.val, device=device, roi_size=window, dtype=dtype,
                threshold_rule=cfg.decision_threshold,
            )
            record_round(RoundRecord(round=0, seconds=0.0, global_metrics=initial))
            metrics = initial
            for server_round in range(1, cfg.num_server_rounds + 1):
                round_start = time.perf_counter()
                run_dir.round_started(server_round, selected=1)
                settings = round_settings(cfg, server_round=server_round, site_index=-1)
                seed_everything(settings.seed)
                optimizer = make_optimizer(
                    trainable_parameters(model),
                    name=settings.optimizer,
                    learning_rate=settings.learning_rate,
                    weight_decay=settings.weight_decay,
                )
                train = train_epochs(
                    model,
                    make_train_loader(train_data, settings),
                    optimizer,
                    task=splits.task,
                    epochs=settings.epochs,
                    device=device,
                    criterion=criterion,
                    bn_dtype=dtype,
                )
                metrics = evaluate_at_validation_threshold(
                    model, splits.test, val=splits.val, device=device, roi_size=window, dtype=dtype,
                    threshold_rule=cfg.decision_threshold,
                )
                val_metrics = (
                    evaluate(model, splits.val, device=device, roi_size=window, dtype=dtype) if len(splits.val) else {}
                )
                record = RoundRecord(
                    round=server_round,
                    seconds=time.perf_counter() - round_start,
                    global_metrics=metrics,
                    fit_metrics={"train-loss": train.loss},
                    eval_metrics=val_metrics,
                    num_fit_results=1,
                )
                record_round(record)
                # The validation split picks the best checkpoint (the test split only when there is none).
                chooser = val_metrics or metrics
                score = chooser.get(primary, -chooser["loss"])
                if score > best:
                    best, best_round = score, server_round
                    best_metrics = {**metrics, **{f"val-{k}": v for k, v in val_metrics.items()}}
                    run_dir.save_checkpoint("best", model, server_round=server_round, metrics=best_metrics)
            run_dir.save_checkpoint("final", model, server_round=cfg.num_server_rounds, metrics=metrics)
            result.summary = {
                "status": "finished",
                "rounds": cfg.num_server_rounds,
                "final_metrics": metrics,
                "best_round": best_round,
                "best_metrics": best_metrics,
                "best_selected_by": f"{'validation' if len(splits.val) else 'test'} {primary}",
                "primary_metric": primary,
                "round_seconds": [r.seconds for r in result.rounds if r.round > 0],
            }
            run_dir.write_summary(result.summary)
        except KeyboardInterrupt:
            last = result.rounds[-1].round if result.rounds else None
            signal_name = interrupt.signal_name or "SIGINT"
            run_dir.mark_interrupted(
                last_round=last,
                planned_rounds=cfg.num_server_rounds,
                reason=f"interrupted ({signal_name}) in round {server_round} of {cfg.num_server_rounds}",
                resumable=False,
            )
            raise RunInterrupted(
                signal_name=signal_name, run_dir=path, last_round=last, planned_rounds=cfg.num_server_rounds,
                resumable=False,
            ) from None
        except Exception as err:
            run_dir.fail(err)  # the run store shows the run as failed
            last = result.rounds[-1].round if result.rounds else None
            step = f"round {server_round}" if server_round else "the initial evaluation"
            raise RunFailedError(
                f"the pooled run failed in {step}: {type(err).__name__}: {err} (run directory {path}; "
                "-v shows the traceback)",
                run_dir=path,
                last_round=last,
            ) from err
    result.wall_seconds = time.perf_counter() - start
    if hooks.on_finish:
        hooks.on_finish(result.summary)
    return result
