"""A strategy wrapper that records every round into a :class:`~server.run_dir.RunDirectory`.

It delegates every decision to the wrapped Flower strategy (as Flower's own DP wrappers do) and
only observes: per-site fit and evaluation metrics, the server-side evaluation, failures, round
times, and the best and final global models.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from torch import nn

from server.run_dir import RoundRecord, RunDirectory
from shared.weights import set_weights

__all__ = ["RecordingStrategy"]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]


def _site_key(metrics: dict[str, Scalar], fallback: int) -> str:
    return f"site-{int(metrics.get('site-index', fallback))}"


def _declined(res: FitRes) -> bool:
    """A site declined the round (its privacy budget would be exceeded): nothing to aggregate."""
    return bool(res.metrics.get("dp-declined", 0)) and res.num_examples == 0


def _scalars(metrics: dict[str, Scalar]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "site-index"}


class RecordingStrategy(Strategy):
    """Wrap ``strategy`` and record each round into ``run_dir``.

    Parameters
    ----------
    strategy
        The Flower strategy that decides everything.
    run_dir
        Where rounds, checkpoints and the summary go.
    model
        A model of the run's architecture, used to write checkpoints.
    primary_metric
        Metric (higher is better) that picks the best checkpoint, e.g. ``"auc"`` or ``"dice"``;
        the loss (lower is better) when the metric is absent. It is read from the sites'
        aggregated *validation* metrics, so the held-out test split never chooses the model
        (as MedMNIST v2 selects its checkpoints); only where no site validates (e.g.
        ``fraction-evaluate = 0``) does the server-side evaluation choose.
    on_round
        Called with each finished round's record (e.g. to refresh a progress view).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        run_dir: RunDirectory,
        model: nn.Module,
        primary_metric: str,
        on_round: RoundCallback | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.run_dir = run_dir
        self.model = model
        self.primary_metric = primary_metric
        self.on_round = on_round
        self.records: list[RoundRecord] = []
        self._pending: RoundRecord | None = None
        self._round_start = 0.0
        self._latest: Parameters | None = None
        self._latest_round = 0
        self._best_score = -math.inf
        self._best_round: int | None = None
        self._best_source = ""
        self._best_metrics: dict[str, float] = {}
        self.stopped_round: int | None = None
        """The round in which every site declined (privacy budgets spent); later rounds are skipped."""

    def __repr__(self) -> str:
        return f"RecordingStrategy({self.strategy!r})"

    # ---------------------------------------------------------------- delegation
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate; remember the initial model as the latest one."""
        params = self.strategy.initialize_parameters(client_manager)
        if params is not None:
            self._latest = params
        return params

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Start the round's record, then delegate (no sites once every site has declined)."""
        self._flush()
        if self.stopped_round is not None:
            return []
        self._pending = RoundRecord(round=server_round)
        self._round_start = time.perf_counter()
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        self.run_dir.round_started(server_round, selected=len(instructions))
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Order results by site (deterministic sums), record them, then delegate.

        Sites that declined the round (``dp-declined = 1``, no examples: one more round would
        exceed their privacy budget) are recorded but not passed on. If every result declined,
        nothing is aggregated and the run stops: later rounds select no sites.
        """
        results = sorted(results, key=lambda r: int(r[1].metrics.get("site-index", 0)))
        record = self._record(server_round)
        record.num_fit_results = len(results)
        record.num_fit_failures = len(failures)
        for i, (_, res) in enumerate(results):
            site = record.sites.setdefault(_site_key(res.metrics, i), {})
            site["fit"] = {"num_examples": float(res.num_examples), **_scalars(res.metrics)}
        trained = [r for r in results if not _declined(r[1])]
        if results and not trained:
            self.stopped_round = server_round
            logger.error(
                "round %d: every site declined to train because one more round would exceed its "
                "privacy budget (dp-budget-epsilon). Stopping: the remaining rounds are skipped "
                "and the final model is the one from round %d.",
                server_round,
                self._latest_round,
            )
            return None, {}
        params, metrics = self.strategy.aggregate_fit(server_round, trained, failures)
        record.fit_metrics = _scalars(metrics)
        if params is not None:
            self._latest, self._latest_round = params, server_round
        if failures:
            logger.warning("round %d: %d site(s) failed to train", server_round, len(failures))
        return params, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate (no sites after the run stopped)."""
        if self.stopped_round is not None and server_round > self.stopped_round:
            return []
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Record each site's validation metrics, delegate, and close the round."""
        record = self._record(server_round)
        for i, (_, res) in enumerate(results):
            site = record.sites.setdefault(_site_key(res.metrics, i), {})
            site["eval"] = {"loss": float(res.loss), "num_examples": float(res.num_examples), **_scalars(res.metrics)}
        loss, metrics = self.strategy.aggregate_evaluate(server_round, results, failures)
        record.eval_metrics = _scalars(metrics)
        if loss is not None:
            record.eval_metrics["loss"] = float(loss)
        self._flush()
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate the server-side evaluation, record it and keep the best checkpoint."""
        if self.stopped_round is not None and server_round > self.stopped_round:
            return None
        result = self.strategy.evaluate(server_round, parameters)
        if result is None:
            return None
        loss, metrics = result
        record = self._record(server_round)
        record.global_metrics = {"loss": float(loss), **_scalars(metrics)}
        if server_round == 0:
            self._flush()
        return result

    # ---------------------------------------------------------------- bookkeeping
    def annotate_round(self, server_round: int, **fields: object) -> None:
        """Set extra :class:`RoundRecord` fields (e.g. ``secagg``) of the round in progress."""
        record = self._record(server_round)
        for name, value in fields.items():
            setattr(record, name, value)

    def _record(self, server_round: int) -> RoundRecord:
        if self._pending is None or self._pending.round != server_round:
            self._flush()
            self._pending = RoundRecord(round=server_round)
            self._round_start = time.perf_counter()
        return self._pending

    def _flush(self) -> None:
        record, self._pending = self._pending, None
        if record is None:
            return
        record.seconds = time.perf_counter() - self._round_start if record.round > 0 else 0.0
        if record.round > 0 and record.round == self._latest_round:
            self._consider_best(record)
        self.records.append(record)
        self.run_dir.write_round(record)
        if self.on_round is not None:
            self.on_round(record)

    def _score(self, metrics: dict[str, float]) -> float | None:
        if self.primary_metric in metrics:
            return metrics[self.primary_metric]
        if "loss" in metrics:
            return -metrics["loss"]
        return None

    def _consider_best(self, record: RoundRecord) -> None:
        """Keep the round's global model as the best checkpoint if its score is the best yet.

        The score is the sites' aggregated validation metric (``record.eval_metrics``); the
        server's test metrics are only stored beside it. Without site validation the server's
        own evaluation scores the round.
        """
        score = self._score(record.eval_metrics)
        source = "validation"
        if score is None:
            score, source = self._score(record.global_metrics), "server evaluation"
        if score is None or not score > self._best_score or self._latest is None:
            return
        self._best_score, self._best_round, self._best_source = score, record.round, source
        metrics = dict(record.global_metrics or record.eval_metrics)
        if record.global_metrics:
            metrics.update({f"val-{k}": v for k, v in record.eval_metrics.items()})
        self._best_metrics = metrics
        set_weights(self.model, parameters_to_ndarrays(self._latest))
        self.run_dir.save_checkpoint("best", self.model, server_round=record.round, metrics=metrics)

    def finish(self) -> dict[str, object]:
        """Write the final checkpoint and the summary; return the summary."""
        self._flush()
        final_metrics: dict[str, float] = {}
        if self.records:
            last = self.records[-1]
            final_metrics = last.global_metrics or last.eval_metrics
        if self._latest is not None:
            set_weights(self.model, parameters_to_ndarrays(self._latest))
            self.run_dir.save_checkpoint(
                "final", self.model, server_round=self._latest_round, metrics=final_metrics
            )
        summary: dict[str, object] = {
            "rounds": self._latest_round,
            "final_metrics": final_metrics,
            "best_round": self._best_round,
            "best_metrics": self._best_metrics,
            "best_selected_by": f"{self._best_source} {self.primary_metric}" if self._best_round else None,
            "primary_metric": self.primary_metric,
            "round_seconds": [r.seconds for r in self.records if r.round > 0],
        }
        if self.stopped_round is not None:
            summary["stopped_early"] = {
                "round": self.stopped_round,
                "reason": "every site declined: one more round would exceed its privacy budget",
            }
        self.run_dir.write_summary(summary)
        return summary
