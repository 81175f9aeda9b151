"""A strategy wrapper that records every round into a :class:`~medfed.server.run_dir.RunDirectory`.

It delegates every decision to the wrapped Flower strategy (as Flower's own DP wrappers do) and
only observes: per-site fit and evaluation metrics, the server-side evaluation, failures (which
site, the error class Flower reports), round times, and the best and final global models. After
every completed round it saves the server's resume state (``medfed.server.resume``). Two decisions are
its own: a round with fewer training results than ``min_results`` is not aggregated, a run
whose sites all declined (privacy budgets spent) stops, and a run in which every site failed a
round stops as failed (``medfed.server.failures``: :attr:`RecordingStrategy.failure`).
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
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from torch import nn

from medfed.server.delegating import DelegatingStrategy
from medfed.server.failures import every_site_failed, no_round_completed
from medfed.server.resume import ResumeState, capture_rng, chain_state, write_resume_state
from medfed.server.rounds import SiteFailure
from medfed.server.run_dir import RoundRecord, RunDirectory
from medfed.server.validation import RoundValidation, site_key
from medfed.shared.weights import set_weights

__all__ = ["RecordingStrategy"]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]


def _declined(res: FitRes) -> bool:
    """A site declined the round (its privacy budget would be exceeded): nothing to aggregate."""
    return bool(res.metrics.get("dp-declined", 0)) and res.num_examples == 0


def _site_order(result: tuple[ClientProxy, FitRes]) -> tuple[int, float]:
    """Sort key: by ``site-index``; results with an unusable index last (a hostile site may send anything)."""
    value = result[1].metrics.get("site-index", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return (1, 0.0)
    return (0, float(value))


def _scalars(metrics: dict[str, Scalar]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "site-index"}


class RecordingStrategy(DelegatingStrategy):
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
    min_results
        The fewest training results a round needs (``min-fit-clients``): with fewer, the round
        is recorded but not aggregated and the global model stays as it was.
    resume
        The state saved after the last completed round of this run (``medfed.server.resume``): the
        strategy starts from its weights and records, and skips the initial evaluation.
    prepare_checkpoint
        Called on ``model`` after the global weights are loaded and before a checkpoint is
        written (``bn-mode`` local: re-estimate the BatchNorm statistics, which the sites keep).

    Attributes
    ----------
    outer
        The outermost strategy of the chain the workflow drives (set by the server when it
        wraps this one, e.g. in SecAgg+'s update strategy); its whole chain's state goes into
        the resume state.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        run_dir: RunDirectory,
        model: nn.Module,
        primary_metric: str,
        on_round: RoundCallback | None = None,
        min_results: int = 1,
        resume: ResumeState | None = None,
        prepare_checkpoint: Callable[[nn.Module], object] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.run_dir = run_dir
        self.model = model
        self.prepare_checkpoint = prepare_checkpoint
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
        self.failed_round: int | None = None
        """The round in which every selected site failed; it and the later rounds are skipped."""
        self.failure: str | None = None
        """Why the run failed (``medfed.server.failures``), or ``None``."""
        self.min_results = min_results
        self.outer: Strategy = self
        self._resume = resume
        self._site_of_node: dict[int, str] = {}
        self._fit_failures: dict[int, list[SiteFailure]] = {}
        self._best_pending: tuple[int, dict[str, float], Parameters] | None = None
        self._earlier_seconds: list[float] = []
        self._resumes: list[dict[str, float]] = []
        self._final_metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- delegation
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate; remember the initial model as the latest one.

        When resuming, the wrapped strategy is still asked (it may drop its copy of the initial
        model, as FedAvg does), but the global model is the saved one.
        """
        params = self.strategy.initialize_parameters(client_manager)
        if self._resume is not None:
            params = self._latest
        if params is not None:
            self._latest = params
        return params

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Start the round's record, then delegate (no sites once every site has declined)."""
        self._flush()
        if self.stopped_round is not None or self.failed_round is not None:
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
        results = self._record_fit(server_round, results, failures)
        record = self._record(server_round)
        if not results and record.num_fit_failures:
            self.failed_round = server_round
            self.failure = every_site_failed(
                server_round, self._fit_failures.get(server_round, []), selected=record.num_fit_failures
            )
            record.skipped = "every site failed"
            return None, {}
        if record.num_fit_failures:
            logger.warning("round %d: %d site(s) failed to train", server_round, record.num_fit_failures)
        if len(results) < self.min_results:
            logger.error(
                "round %d: %d site(s) answered, fewer than min-fit-clients = %d: the round is not "
                "aggregated and the global model stays as after round %d.",
                server_round,
                len(results),
                self.min_results,
                self._latest_round,
            )
            return None, {}
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
        self._record(server_round).fit_metrics = _scalars(metrics)
        if params is not None:
            self._latest, self._latest_round = params, server_round
        return params, metrics

    def note_failures(self, server_round: int, step: str, failures: list[SiteFailure]) -> None:
        """Sites that failed ``step`` (``"fit"`` or ``"evaluate"``) of ``server_round`` (from
        :class:`medfed.server.rounds.RoundStep`): training failures are recorded site by site."""
        if step == "fit":
            self._fit_failures.setdefault(server_round, []).extend(failures)
            self._record(server_round)

    def _learn_site(self, proxy: ClientProxy | None, key: str) -> None:
        node = getattr(proxy, "node_id", None)
        if node is not None:
            self._site_of_node[int(node)] = key

    def _record_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> list[tuple[ClientProxy, FitRes]]:
        """Record the sites' fit metrics and counts; return the results ordered by site."""
        results = sorted(results, key=_site_order)
        record = self._record(server_round)
        timeouts = sum(1 for f in self._fit_failures.get(server_round, []) if f.code == "TIMEOUT")
        record.num_fit_results = len(results)
        record.num_fit_failures = len(failures) + timeouts
        for i, (proxy, res) in enumerate(results):
            key = site_key(res.metrics, fallback=i)
            self._learn_site(proxy, key)
            site = record.sites.setdefault(key, {})
            site["fit"] = {"num_examples": float(res.num_examples), **_scalars(res.metrics)}
        return results

    def record_validation(self, report: RoundValidation) -> None:
        """Record what update validation decided (``medfed.server.validation``): rejections, norms, a skip."""
        record = self._record(report.round)
        record.rejected.extend(report.rejected)
        if report.skipped:
            record.skipped = report.skipped
        for site, norm in report.norms.items():
            record.sites.setdefault(site, {}).setdefault("fit", {})["update-norm"] = float(norm)

    def drop_round(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
        *,
        report: RoundValidation,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record the round's sites and ``report`` without aggregating: the global model stays."""
        self._record_fit(server_round, results, failures)
        self.record_validation(report)
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate (no sites after the run stopped, nor in the round every site failed)."""
        if self.stopped_round is not None and server_round > self.stopped_round:
            return []
        if self.failed_round is not None and server_round >= self.failed_round:
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
        record.num_eval_failures = len(failures)
        if failures:
            logger.warning("round %d: %d site(s) failed to evaluate", server_round, len(failures))
        for i, (proxy, res) in enumerate(results):
            key = site_key(res.metrics, fallback=i)
            self._learn_site(proxy, key)
            site = record.sites.setdefault(key, {})
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
        if self.failed_round is not None and server_round >= self.failed_round:
            return None
        if server_round == 0 and self._resume is not None:
            return None  # round 0 is recorded already
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
        """Close the pending round: its record, then the resume state, then a new best checkpoint.

        In this order a crash at any point leaves a resume state no newer than the records, and
        a best checkpoint no newer than the resume state.
        """
        record, self._pending = self._pending, None
        if record is None or self.run_dir.stopped:  # stopped: the run is being interrupted
            return
        record.seconds = time.perf_counter() - self._round_start if record.round > 0 else 0.0
        record.failed_sites = [
            f.to_json(site=self._site_of_node.get(f.node_id)) for f in self._fit_failures.pop(record.round, [])
        ]
        self._final_metrics = dict(record.global_metrics or record.eval_metrics)
        if record.round > 0 and record.round == self._latest_round:
            self._consider_best(record)
        self.records.append(record)
        self.run_dir.write_round(record)
        if record.round != self.failed_round:  # a resumed run trains the failed round again
            self._save_resume_state(record.round)
        if self._best_pending is not None:
            best_round, metrics, params = self._best_pending
            self._best_pending = None
            set_weights(self.model, parameters_to_ndarrays(params))
            if self.prepare_checkpoint is not None:
                self.prepare_checkpoint(self.model)
            self.run_dir.save_checkpoint("best", self.model, server_round=best_round, metrics=metrics)
        if self.on_round is not None:
            self.on_round(record)

    def _save_resume_state(self, server_round: int) -> None:
        if self._latest is None:
            return
        state = ResumeState(
            round=server_round,
            weights=parameters_to_ndarrays(self._latest),
            strategies=chain_state(self.outer),
            rng=capture_rng(),
            run_id=self.run_dir.run_id,
        )
        write_resume_state(self.run_dir.path, state)

    # ---------------------------------------------------------------- resume
    def resume_state(self) -> dict[str, object]:
        """This wrapper's part of the resume state (see :func:`medfed.server.resume.chain_state`)."""
        return {
            "latest_round": self._latest_round,
            "best_score": self._best_score if math.isfinite(self._best_score) else None,
            "best_round": self._best_round,
            "best_source": self._best_source,
            "best_metrics": dict(self._best_metrics),
            "stopped_round": self.stopped_round,
            "round_seconds": self._earlier_seconds + [r.seconds or 0.0 for r in self.records if r.round > 0],
            "final_metrics": dict(self._final_metrics),
            "resumes": list(self._resumes),
        }

    def load_resume_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`resume_state` (and the saved global weights given at construction)."""
        if self._resume is None:
            raise RuntimeError("load_resume_state() needs the ResumeState passed as resume= at construction.")
        self._latest = ndarrays_to_parameters(self._resume.weights)
        self._latest_round = int(state["latest_round"])  # type: ignore[arg-type]
        best = state["best_score"]
        self._best_score = float(best) if best is not None else -math.inf  # type: ignore[arg-type]
        self._best_round = state["best_round"]  # type: ignore[assignment]
        self._best_source = str(state.get("best_source", ""))
        self._best_metrics = dict(state.get("best_metrics", {}))  # type: ignore[call-overload]
        self.stopped_round = state["stopped_round"]  # type: ignore[assignment]
        self._earlier_seconds = [float(s) for s in state["round_seconds"]]  # type: ignore[union-attr]
        self._final_metrics = dict(state["final_metrics"])  # type: ignore[call-overload]
        self._resumes = [*state["resumes"], {"after_round": self._resume.round, "time": time.time()}]  # type: ignore[misc]

    def _score(self, metrics: dict[str, float]) -> float | None:
        if self.primary_metric in metrics:
            return metrics[self.primary_metric]
        if "loss" in metrics:
            return -metrics["loss"]
        return None

    def _consider_best(self, record: RoundRecord) -> None:
        """Make the round's global model the pending best checkpoint if its score is the best yet.

        The score is the sites' aggregated validation metric (``record.eval_metrics``); the
        server's test metrics are only stored beside it (``val-*`` keys hold the validation
        ones). Without site validation the server's own evaluation scores the round.
        """
        score, source = self._score(record.eval_metrics), "validation"
        if score is None:
            score, source = self._score(record.global_metrics), "server evaluation"
        if score is None or not score > self._best_score or self._latest is None:
            return
        metrics = dict(record.global_metrics or record.eval_metrics)
        if record.global_metrics:
            metrics.update({f"val-{k}": v for k, v in record.eval_metrics.items()})
        self._best_score, self._best_round = score, record.round
        self._best_source, self._best_metrics = source, metrics
        self._best_pending = (record.round, dict(metrics), self._latest)  # written when the round closes

    @property
    def latest_round(self) -> int:
        """The last round whose aggregate became the global model (0: none yet)."""
        return self._latest_round

    def check_progress(self, *, first_round: int, last_round: int) -> None:
        """After the workflow ran rounds ``first_round..last_round``: if none was aggregated (and
        the run neither failed nor stopped on spent privacy budgets), the run failed
        (:func:`medfed.server.failures.no_round_completed`)."""
        if self.failure is not None or self.stopped_round is not None or last_round < first_round:
            return
        if self._latest_round < first_round:
            self._flush()
            ran = [r for r in self.records if r.round >= first_round]
            self.failure = no_round_completed(ran, min_results=self.min_results)

    def finish(self) -> dict[str, object]:
        """Write the final checkpoint and the summary (``"status"``: ``"finished"``, or ``"failed"``
        with the ``"failure"``); return the summary."""
        self._flush()
        final_metrics = dict(self._final_metrics)
        if self._latest is not None:
            set_weights(self.model, parameters_to_ndarrays(self._latest))
            if self.prepare_checkpoint is not None:
                self.prepare_checkpoint(self.model)
            self.run_dir.save_checkpoint(
                "final", self.model, server_round=self._latest_round, metrics=final_metrics
            )
        summary: dict[str, object] = {
            "status": "failed" if self.failure is not None else "finished",
            "rounds": self._latest_round,
            "final_metrics": final_metrics,
            "best_round": self._best_round,
            "best_metrics": dict(self._best_metrics),
            "best_selected_by": f"{self._best_source} {self.primary_metric}" if self._best_round else None,
            "primary_metric": self.primary_metric,
            "round_seconds": self._earlier_seconds + [r.seconds for r in self.records if r.round > 0],
        }
        if self._resumes:
            summary["resumed"] = list(self._resumes)
        if self.failure is not None:
            summary["failure"] = self.failure
            summary["failed_round"] = self.failed_round
        if self.stopped_round is not None:
            summary["stopped_early"] = {
                "round": self.stopped_round,
                "reason": "every site declined: one more round would exceed its privacy budget",
            }
        self.run_dir.write_summary(summary)
        return summary
