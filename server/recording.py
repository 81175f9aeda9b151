"""A strategy wrapper that records every round into a :class:`~medfed.server.run_dir.RunDirectory`.

It delegates every decision to the wrapped Flower strategy (as Flower's own DP wrappers do) and
only observes: per-site fit and evaluation metrics, the server-side evaluation, failures (which
site, the error class Flower reports), round times, and the best and final global models. Sites
are keyed by the identity the server checks (:mod:`medfed.server.identity`), never by the index
they report; a result from a node that claims another site's identity is refused (left out of
the round, recorded as a rejection with reason ``identity``). After
every completed round it saves the server's resume state (``medfed.server.resume``). Two decisions are
its own: a round with fewer training results than ``min_results`` is not aggregated, a run
whose sites all declined (privacy budgets spent) stops, and a run in which every site failed a
round stops as failed (``medfed.server.failures``: :attr:`RecordingStrategy.failure`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

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
from medfed.server.identity import IDENTITY_REASON, Identity, SiteIdentities
from medfed.server.resume import ResumeState, capture_rng, chain_state, write_resume_state
from medfed.server.rounds import SiteFailure
from medfed.server.run_dir import RoundRecord, RunDirectory
from medfed.server.validation import RoundValidation
from medfed.shared.metrics import predicts_single_class
from medfed.shared.refusals import is_refusal, refused_keys
from medfed.shared.weights import set_weights

__all__ = ["RecordingStrategy"]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]


def _declined(res: FitRes) -> bool:
    """A site declined the round (its privacy budget would be exceeded): nothing to aggregate."""
    return bool(res.metrics.get("dp-declined", 0)) and res.num_examples == 0


def _refused(res: FitRes | EvaluateRes) -> bool:
    """A site refused the run (it asks for less privacy than the site's policy allows)."""
    return is_refusal(res.metrics)


def _node_of(proxy: ClientProxy | None) -> int | None:
    node = getattr(proxy, "node_id", None)
    return int(node) if node is not None else None


def _site_order(identity: Identity) -> tuple[int, int, str]:
    """Sort key: by the site's index as the server knows it, then by key (deterministic sums)."""
    return (0, identity.index, identity.key) if identity.index is not None else (1, 0, identity.key)


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
    identities
        Who each node is (:class:`~medfed.server.identity.SiteIdentities`, built from the Grid
        and the enrolment); default: no node information, each node owns the first index it
        reports.
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
        identities: SiteIdentities | None = None,
        prepare_checkpoint: Callable[[nn.Module], object] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.identities = identities or SiteIdentities()
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
        self._refusals: dict[str, dict[str, object]] = {}
        """Per site: the first round it refused the run and the run-config keys it named."""
        self._final_site_metrics: dict[str, float] = {}

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
        if self.stopped_round is not None or self.failed_round is not None or self.run_dir.stopped:
            return []  # stopped recording: the run is being interrupted, start no further round
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
        exceed their privacy budget) or refused the run (``policy-refused = 1``: it asks for less
        privacy than their policy allows) are recorded but not passed on. If every result
        declined or refused, nothing is aggregated and the run stops: later rounds select no sites.
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
        trained = [r for r in results if not _declined(r[1]) and not _refused(r[1])]
        if results and not trained:
            self.stopped_round = server_round
            if any(_refused(r[1]) for r in results):
                logger.error(
                    "round %d: no site trained: %s. Stopping: the remaining rounds are skipped and the "
                    "final model is the one from round %d.",
                    server_round,
                    self._refusal_text(),
                    self._latest_round,
                )
                return None, {}
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

    def site_of(self, proxy: ClientProxy | None, res: FitRes, position: int) -> str:
        """The record key of an accepted result (for :class:`~medfed.server.validation.ValidatingStrategy`)."""
        node = _node_of(proxy)
        if node is not None and node in self._site_of_node:
            return self._site_of_node[node]
        return self.identities.identify(node, res.metrics, position=position).key

    def _identify(
        self, server_round: int, results: list[tuple[ClientProxy, Any]], *, step: str
    ) -> list[tuple[ClientProxy, Any, Identity]]:
        """The accepted results with their identities, ordered by site; refused ones recorded."""
        record = self._record(server_round)
        accepted: list[tuple[ClientProxy, Any, Identity]] = []
        for i, (proxy, res) in enumerate(results):
            identity = self.identities.identify(_node_of(proxy), res.metrics, position=i)
            if identity.refused is None:
                accepted.append((proxy, res, identity))
                if identity.node is not None:
                    self._site_of_node[identity.node] = identity.key
                continue
            logger.error(
                "round %d: %s result refused: %s. It is left out of the round; %s's records are unchanged.",
                server_round, step, identity.refused, identity.key,
            )
            node = "" if identity.node is None else str(identity.node)
            if not any(r.get("node") == node and r.get("reason") == IDENTITY_REASON for r in record.rejected):
                record.rejected.append(
                    {"site": identity.key, "node": node, "reason": IDENTITY_REASON, "detail": identity.refused}
                )
        return sorted(accepted, key=lambda item: _site_order(item[2]))

    def _record_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> list[tuple[ClientProxy, FitRes]]:
        """Record the sites' fit metrics and counts; return the accepted results ordered by site."""
        accepted = self._identify(server_round, results, step="training")
        record = self._record(server_round)
        timeouts = sum(1 for f in self._fit_failures.get(server_round, []) if f.code == "TIMEOUT")
        record.num_fit_results = len(accepted)
        record.num_fit_failures = len(failures) + timeouts
        for _, res, identity in accepted:
            site = record.sites.setdefault(identity.key, {})
            site["fit"] = {"num_examples": float(res.num_examples), **_scalars(res.metrics)}
            if _refused(res):
                self._note_refusal(server_round, identity.key, res.metrics)
        return [(proxy, res) for proxy, res, _ in accepted]

    def _note_refusal(self, server_round: int, site: str, metrics: dict[str, Scalar]) -> None:
        keys = refused_keys(metrics)
        if site not in self._refusals:
            self._refusals[site] = {"round": server_round, "keys": keys}
        logger.error(
            "round %d: %s refused the run: it asks for less privacy than the site's policy allows (%s). "
            "Change these keys of the run config; the site's log names its limits.",
            server_round,
            site,
            ", ".join(keys) or "no key named",
        )

    def _refusal_text(self) -> str:
        return "; ".join(
            f"{site} refused the run ({', '.join(info['keys']) or 'no key named'})"  # type: ignore[arg-type]
            for site, info in sorted(self._refusals.items())
        )

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
        accepted = self._identify(server_round, results, step="evaluation")
        refused = [a for a in accepted if _refused(a[1])]
        accepted = [a for a in accepted if not _refused(a[1])]  # no loss, no examples: nothing to average
        for _, res, identity in refused:
            record.sites.setdefault(identity.key, {})["eval"] = {"num_examples": 0.0, **_scalars(res.metrics)}
        if refused and not accepted:
            self._flush()
            return None, {}
        for _, res, identity in accepted:
            site = record.sites.setdefault(identity.key, {})
            site["eval"] = {"loss": float(res.loss), "num_examples": float(res.num_examples), **_scalars(res.metrics)}
        results = [(proxy, res) for proxy, res, _ in accepted]
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
        a best checkpoint no newer than the resume state: the record is written here, the resume
        state and the checkpoint (a copy of what they hold, taken here) in that order in the run's
        writer thread (:meth:`RunDirectory.write_later`), while the next round starts.
        """
        record, self._pending = self._pending, None
        if record is None or self.run_dir.stopped:  # stopped: the run is being interrupted
            return
        record.seconds = time.perf_counter() - self._round_start if record.round > 0 else 0.0
        record.failed_sites = [
            f.to_json(site=self._site_of_node.get(f.node_id) or self.identities.key_of_node(f.node_id))
            for f in self._fit_failures.pop(record.round, [])
        ]
        self._final_metrics = dict(record.global_metrics or record.eval_metrics)
        self._final_site_metrics = dict(record.eval_metrics)
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
            self.run_dir.save_checkpoint("best", self.model, server_round=best_round, metrics=metrics, later=True)
        if self.on_round is not None:
            self.on_round(record)

    def _save_resume_state(self, server_round: int) -> None:
        if self._latest is None:
            return
        state = ResumeState(
            round=server_round,
            weights=parameters_to_ndarrays(self._latest),  # new arrays
            # a copy: strategies' tensors share their arrays (state_tensors), which the next round may change
            strategies=copy.deepcopy(chain_state(self.outer)),
            rng=capture_rng(),
            run_id=self.run_dir.run_id,
        )
        self.run_dir.write_later(partial(write_resume_state, self.run_dir.path, state))

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
            "final_site_metrics": dict(self._final_site_metrics),
            "resumes": list(self._resumes),
            "policy_refused": {site: dict(info) for site, info in self._refusals.items()},
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
        self._refusals = {str(k): dict(v) for k, v in dict(state.get("policy_refused", {})).items()}  # type: ignore[call-overload]
        self._final_site_metrics = dict(state.get("final_site_metrics", {}))  # type: ignore[call-overload]
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

    @property
    def final_metrics(self) -> dict[str, float]:
        """The last recorded round's global metrics (the server's evaluation, else the sites'
        aggregated validation): in binary classification its ``threshold`` is the one chosen on
        validation data, which cross-site evaluation applies."""
        self._flush()
        return dict(self._final_metrics)

    def final_weights(self) -> list | None:
        """The global model's weights after the last aggregated round (``None``: none yet)."""
        return parameters_to_ndarrays(self._latest) if self._latest is not None else None

    def finish(self, *, extra: dict[str, object] | None = None) -> dict[str, object]:
        """Write the final checkpoint and the summary (``"status"``: ``"finished"``, or ``"failed"``
        with the ``"failure"``); return the summary.

        The summary's ``single_class`` says whether the final and the validation-selected global
        models predict a single class (:func:`medfed.shared.metrics.predicts_single_class`);
        ``extra`` adds fields (e.g. the sites' personalization report).
        """
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
            "single_class": {
                "final": predicts_single_class(final_metrics, self._final_site_metrics),
                "selected": predicts_single_class(
                    self._best_metrics, {k[4:]: v for k, v in self._best_metrics.items() if k.startswith("val-")}
                ) if self._best_round else None,
            },
        }
        summary.update(extra or {})
        if self._resumes:
            summary["resumed"] = list(self._resumes)
        if self.failure is not None:
            summary["failure"] = self.failure
            summary["failed_round"] = self.failed_round
        if self._refusals:
            summary["policy_refused"] = {site: dict(info) for site, info in sorted(self._refusals.items())}
        if self.stopped_round is not None:
            reason = "every site declined: one more round would exceed its privacy budget"
            if self._refusals:
                reason = "no site trained: " + self._refusal_text()
            summary["stopped_early"] = {"round": self.stopped_round, "reason": reason}
        self.run_dir.write_summary(summary)
        return summary
