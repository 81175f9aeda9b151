"""SecAgg+ secure aggregation for medfed: settings, the fit workflow, and the update adapter.

medfed uses Flower's own SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` at the server,
``flwr.client.mod.secaggplus_mod`` at the sites). This module adds what medfed needs around it:

* :func:`secagg_settings` turns the ``secagg-*`` run-config keys into checked protocol
  parameters, with errors that name the key and the fix (Flower accepts some values that break
  the protocol, e.g. an even ``num_shares`` smaller than the number of sites).
* :class:`MedfedSecAggPlusWorkflow` is Flower's workflow with a record of each round's outcome
  (sampled sites, survivors, dropouts, the stage that failed) for the run directory, and the
  unmask stage's mask arithmetic on flat ``uint32`` vectors (:mod:`medfed.server.secagg_unmask`).
* :class:`SecAggUpdateStrategy` restores full weights from the securely aggregated *update*.

Why sites send updates, not weights
-----------------------------------
SecAgg+ works on integers: each site multiplies its vector by ``q_i / Q`` (``q_i = round(n_i Q /
W)``, ``n_i`` its example count, ``W = max_weight``, ``Q = quantization_range``), clips to
``[-c, c]`` (``c = clipping_range``) and stochastically rounds onto ``Q`` levels. medfed's
weights include BatchNorm statistics (``running_var`` can be far above ``c`` for a site close to
``W`` examples) and int64 step counters, and full weights waste the quantisation range on the
part every site shares (the global model). So under SecAgg+ each site sends ``local - global``
(:mod:`medfed.client.update_mods`) and the server adds the aggregate back
(:class:`SecAggUpdateStrategy`). The strategy below it (FedAvg, FedProx, FedAdam, the DP
wrappers) still sees full weights, so its semantics do not change.

Quantisation error
------------------
Per entry, the SecAgg+ aggregate differs from the exact example-weighted mean of the same
updates by at most (see :func:`quantization_error_bound`)::

    m * (2 c + max_i |x_i|) / sum_i q_i,     q_i = round(n_i Q / W)

for ``m`` aggregated sites, as long as no entry is clipped, i.e. ``|x_i| <= c W / n_i`` (the
effective clipping range of site ``i``). ``2 c m / sum q_i`` comes from stochastic rounding
(less than one level of ``2c / Q`` per site, then divided by ``sum q_i / Q``); ``m max|x| /
sum q_i`` from rounding the weights ``n_i / W`` to ``q_i / Q``. With equal sites this is about
``(2 c + |x|) W / (Q n)``: precision is set by ``W / Q``, so keep ``max_weight`` close above the
largest site and ``quantization_range`` as large as the number of sites allows (the sum of ``m``
vectors must stay below ``modulus_range``: ``m Q < 2^32``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from medfed.server.delegating import DelegatingStrategy
from medfed.server.rounds import apply_round_offset
from medfed.server.secagg_unmask import remove_masks, sum_masked_vectors
from medfed.server.validation import RoundValidation, check_aggregate
from medfed.shared.config import ConfigError, RunConfig, sites_per_round
from medfed.shared.secagg_masks import DEFAULT_MASK_GENERATOR, FLOWER_MASK_GENERATOR, MASK_GENERATOR_KEY

__all__ = [
    "MODULUS_RANGE",
    "SecAggSettings",
    "SecAggOutcome",
    "MedfedSecAggPlusWorkflow",
    "SecAggUpdateStrategy",
    "secagg_settings",
    "quantization_error_bound",
    "restore_weights",
]

logger = logging.getLogger(__name__)

MODULUS_RANGE = 2**32
"""Flower's default (and largest) ``modulus_range``: masks and sums live modulo 2^32."""

_INT32_LIMIT = 2**31
"""Flower's stochastic rounding casts quantised values to int32."""

OutcomeCallback = Callable[["SecAggOutcome"], None]
InvalidCallback = Callable[..., tuple[Parameters | None, dict[str, Scalar]]]
"""``(server_round, results, failures, *, report)``: records a round whose aggregate was invalid."""


def quantization_error_bound(
    *,
    num_examples: Sequence[int],
    clipping_range: float,
    quantization_range: int,
    max_weight: float,
    max_abs_update: float,
) -> float:
    """Worst-case per-entry error of a SecAgg+ aggregate against the exact weighted mean.

    Parameters
    ----------
    num_examples
        ``n_i`` of every site whose masked vector is in the aggregate (``m`` entries).
    clipping_range, quantization_range, max_weight
        ``c``, ``Q`` and ``W`` of the protocol.
    max_abs_update
        ``max_i |x_i|`` over the entries compared (no entry may exceed ``c W / n_i``, the site's
        effective clipping range, or it is clipped and the bound does not apply).

    Returns
    -------
    float
        ``m (2 c + max|x|) / sum_i q_i`` with ``q_i = round(n_i Q / W)``; see the module
        docstring for the derivation.
    """
    q = [round(n / max_weight * quantization_range) for n in num_examples]
    total = sum(q)
    if total <= 0:
        raise ValueError("every site has a zero weight: the aggregate is undefined.")
    return len(q) * (2.0 * clipping_range + float(max_abs_update)) / total


@dataclass(frozen=True)
class SecAggSettings:
    """Checked SecAgg+ parameters of one run (see :func:`secagg_settings`)."""

    num_shares: int | float
    """Passed to Flower: an odd int below the number of sites, or ``1.0`` (every site)."""
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float
    sites_per_round: int
    on_failure: str
    modulus_range: int = MODULUS_RANGE
    mask_generator: str = DEFAULT_MASK_GENERATOR
    """Expands the sites' mask seeds (:data:`medfed.shared.secagg_masks.MASK_GENERATORS`)."""

    @property
    def neighbourhood(self) -> int:
        """Shares per secret: every site when ``num_shares`` is ``1.0``."""
        return self.sites_per_round if isinstance(self.num_shares, float) else int(self.num_shares)

    def error_bound(self, num_examples: Sequence[int], max_abs_update: float) -> float:
        """:func:`quantization_error_bound` with this run's ``c``, ``Q`` and ``W``."""
        return quantization_error_bound(
            num_examples=num_examples,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            max_weight=self.max_weight,
            max_abs_update=max_abs_update,
        )

    def describe(self) -> str:
        """One log line: shares, threshold, range, precision for a site of ``W`` examples."""
        step = 2 * self.clipping_range / self.quantization_range
        return (
            f"SecAgg+: {self.sites_per_round} sites per round, {self.neighbourhood} shares per secret, "
            f"threshold {self.reconstruction_threshold}, clipping range {self.clipping_range:g}, "
            f"quantization range {self.quantization_range}, max weight {self.max_weight:g}, "
            f"timeout {self.timeout:g} s, masks from {self.mask_generator}; a site with n examples is "
            f"quantised in steps of {step:.3g} * {self.max_weight:g} / n"
        )


def secagg_settings(cfg: RunConfig, *, num_sites: int) -> SecAggSettings:
    """Check the ``secagg-*`` keys against Flower's SecAgg+ and the federation size.

    Parameters
    ----------
    cfg
        The run configuration.
    num_sites
        Sites in the federation (the server waits for this many).

    Raises
    ------
    ConfigError
        Naming the key, the value and the fix, when the protocol could not run or would
        silently compute a wrong aggregate.
    """
    m = sites_per_round(cfg, num_sites=num_sites)
    if m < 2:
        raise ConfigError(
            f"SecAgg+ needs at least 2 sites per round, but num-sites = {num_sites}, fraction-fit = "
            f"{cfg.fraction_fit} and min-fit-clients = {cfg.min_fit_clients} select {m}: "
            "add sites or turn secagg off."
        )
    shares, threshold = cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold
    num_shares: int | float
    if shares >= m:
        num_shares, neighbourhood = 1.0, m  # every site holds a share of every other site's secret
    elif shares < 3 or shares % 2 == 0:
        raise ConfigError(
            f"secagg-num-shares = {shares} is invalid for {m} sites per round: a SecAgg+ neighbourhood "
            "is a site and the same number of neighbours on each side, so use an odd number >= 3 "
            f"(or >= {m} to share with every site)."
        )
    else:
        num_shares, neighbourhood = shares, shares
    # With shares at every site Flower accepts threshold == sites (no dropout tolerated); with
    # fewer shares than sites it requires threshold < shares. Flower reads 1 as "all shares".
    highest = neighbourhood if isinstance(num_shares, float) else neighbourhood - 1
    if not 2 <= threshold <= highest:
        raise ConfigError(
            f"secagg-reconstruction-threshold = {threshold} is invalid with {neighbourhood} shares per "
            f"secret: it must lie in [2, {highest}]."
        )
    if threshold == neighbourhood:
        logger.warning(
            "secagg-reconstruction-threshold = %d equals the number of shares: a round fails if any site "
            "drops out.",
            threshold,
        )
    if m == 2:
        logger.warning(
            "SecAgg+ with 2 sites per round: each site can compute the other's update from the aggregate "
            "and its own; the protection is against the coordinator and the network only."
        )
    if threshold * 2 <= neighbourhood:
        logger.warning(
            "secagg-reconstruction-threshold = %d is at most half of the %d shares: a server that lies "
            "about which sites dropped could collect both secrets of one site and unmask its update. "
            "Use a threshold above half the shares (see docs/threat-model-secagg.md).",
            threshold,
            neighbourhood,
        )
    q = cfg.secagg_quantization_range
    if q >= _INT32_LIMIT:
        raise ConfigError(
            f"secagg-quantization-range = {q} is too large: Flower quantises to int32, so it must be "
            f"< {_INT32_LIMIT}."
        )
    if m * q >= MODULUS_RANGE:
        raise ConfigError(
            f"secagg-quantization-range = {q} is too large for {m} sites per round: the sum of {m} "
            f"quantised vectors would wrap around the modulus 2^32 and the aggregate would be garbage. "
            f"Use at most {(MODULUS_RANGE - 1) // m} (e.g. {2 ** int(math.log2((MODULUS_RANGE - 1) // m))})."
        )
    return SecAggSettings(
        num_shares=num_shares,
        reconstruction_threshold=threshold,
        clipping_range=float(cfg.secagg_clipping_range),
        quantization_range=int(q),
        max_weight=float(cfg.secagg_max_weight),
        timeout=float(cfg.secagg_timeout),
        sites_per_round=m,
        on_failure=cfg.secagg_on_failure,
        mask_generator=cfg.secagg_mask_generator,
    )


# --------------------------------------------------------------------------- round outcome
@dataclass
class SecAggOutcome:
    """What the server knows about one SecAgg+ round (written to ``metrics.jsonl``)."""

    round: int
    sampled: int
    survivors: int = 0
    """Sites whose masked vector is in the aggregate."""
    completed: bool = False
    failed_stage: str | None = None
    seconds: float = 0.0
    active_after_stage: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each stage that ran (messages out and back, and the server's work)."""

    @property
    def dropped(self) -> int:
        """Sampled sites that are not in the aggregate."""
        return self.sampled - self.survivors

    def to_json(self) -> dict[str, Any]:
        """The ``secagg`` field of a round record."""
        return {
            "sampled": self.sampled,
            "survivors": self.survivors,
            "dropped": self.dropped,
            "completed": self.completed,
            "failed_stage": self.failed_stage,
            "seconds": round(self.seconds, 3),
            "active_after_stage": dict(self.active_after_stage),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }


def _unique_failures(failures: list[Exception]) -> list[Exception]:
    """Flower 1.42's collect stage records each failed reply twice; keep one per reply error."""
    seen: set[int] = set()
    unique = []
    for failure in failures:
        key = id(failure.args[0]) if failure.args else id(failure)
        if key not in seen:
            seen.add(key)
            unique.append(failure)
    return unique


class MedfedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow`` that reports each round's :class:`SecAggOutcome`.

    The protocol itself is Flower's, unchanged; only the loop over the four stages is
    repeated here so the outcome (survivors, the stage that failed) is known, and a failed
    site is passed to ``aggregate_fit`` once (Flower's collect stage lists it twice). The unmask
    stage sends and receives Flower's messages and recovers Flower's secrets, but removes the
    masks on flat ``uint32`` vectors (:mod:`medfed.server.secagg_unmask`: the same integers,
    tested against Flower's arithmetic, without the per-tensor ``int64`` copies).

    Parameters
    ----------
    settings
        From :func:`secagg_settings`.
    on_outcome
        Called once per round in which sites were sampled, after the last stage ran.
    round_offset
        Rounds completed before this process started (a resumed run): added to the round
        number ``DefaultWorkflow`` counts from 1 (see :func:`medfed.server.rounds.apply_round_offset`).
    """

    STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")

    def __init__(
        self, settings: SecAggSettings, *, on_outcome: OutcomeCallback | None = None, round_offset: int = 0
    ) -> None:
        super().__init__(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            modulus_range=settings.modulus_range,
            timeout=settings.timeout,
        )
        self.settings = settings
        self.on_outcome = on_outcome
        self.round_offset = round_offset
        self.outcomes: list[SecAggOutcome] = []

    def __call__(self, grid: Grid, context: Any) -> None:
        """Run the four SecAgg+ stages of one round and report the outcome."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        outcome = SecAggOutcome(round=apply_round_offset(context, self.round_offset), sampled=0)
        state = WorkflowState()
        steps = (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage)
        start = time.perf_counter()
        for name, step in zip(self.STAGES, steps, strict=True):
            stage_start = time.perf_counter()
            ok = step(grid, context, state)
            outcome.stage_seconds[name] = time.perf_counter() - stage_start
            state.failures = _unique_failures(state.failures)
            outcome.sampled = len(state.sampled_node_ids)
            outcome.active_after_stage[name] = len(state.active_node_ids)
            if name == "collect-masked-vectors":
                outcome.survivors = len(state.legacy_results)
            if not ok:
                outcome.failed_stage = name
                break
        else:
            outcome.completed = True
        outcome.seconds = time.perf_counter() - start
        if outcome.sampled == 0:
            return  # no site selected (nothing to protect, nothing to report)
        if not outcome.completed:
            logger.error(
                "round %d: secure aggregation failed at the %s stage (%d of %d sites still active, "
                "threshold %d): no update this round.",
                outcome.round,
                outcome.failed_stage,
                outcome.active_after_stage.get(outcome.failed_stage or "", 0),
                outcome.sampled,
                self.settings.reconstruction_threshold,
            )
        elif outcome.dropped:
            logger.warning(
                "round %d: %d of %d sites dropped out; the aggregate covers the %d survivors.",
                outcome.round,
                outcome.dropped,
                outcome.sampled,
                outcome.survivors,
            )
        self.outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's collect-masked-vectors stage with the sum on one flat ``uint32`` buffer.

        The messages (the key shares forwarded with each site's ``FitIns``), the bookkeeping of
        active sites and failures and the legacy results are Flower's, step for step; only the
        sum of the masked vectors is :func:`~medfed.server.secagg_unmask.sum_masked_vectors`
        (the same integers as Flower's ``parameters_mod(sum, 2^32)``, read without copies).

        Unless the run uses Flower's mask generator, each message names medfed's
        (``settings.mask_generator``) and each reply must echo it: a site that masked with another
        generator (Flower's own ``secaggplus_mod`` ignores the name) counts as dropped out, with
        an error that says so, so the masks it shares with its neighbours are removed as a
        dropout's and the aggregate of the others stays exact.
        """
        if state.mod_range != MODULUS_RANGE:
            return super().collect_masked_vectors_stage(grid, context, state)
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        generator = self.settings.mask_generator
        named = generator != FLOWER_MASK_GENERATOR  # Flower's sites and workflow name no generator

        def make(nid: int) -> Message:
            content = state.nid_to_fitins[nid]
            configs = ConfigRecord({
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: state.forward_ciphertexts[nid],  # type: ignore[dict-item]
                Key.SOURCE_LIST: state.forward_srcs[nid],  # type: ignore[dict-item]
            })
            if named:
                configs[MASK_GENERATOR_KEY] = generator
            content.config_records[RECORD_KEY_CONFIGS] = configs
            return Message(
                content=content,
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
                group_id=str(cfg[WorkflowKey.CURRENT_ROUND]),
            )

        msgs = list(grid.send_and_receive([make(nid) for nid in state.active_node_ids], timeout=self.timeout))
        del state.forward_ciphertexts, state.forward_srcs, state.nid_to_fitins
        replies = []
        for msg in msgs:  # each failed reply once (Flower's stage records it twice: see _unique_failures)
            if msg.has_error():
                state.failures.append(Exception(msg.error))
            elif named and (echoed := msg.content.config_records[RECORD_KEY_CONFIGS].get(MASK_GENERATOR_KEY)) != generator:
                used = "Flower's generator" if echoed is None else repr(echoed)
                problem = (
                    f"SecAgg+: node {msg.metadata.src_node_id} masked its update with {used}, not {generator}: "
                    "its update is left out as a dropout's. Run medfed's ClientApp at that site, or set "
                    "secagg-mask-generator = 'flower-mt19937' for every site."
                )
                logger.error("%s", problem)
                state.failures.append(Exception(problem))
            else:
                replies.append(msg)
        state.active_node_ids = {msg.metadata.src_node_id for msg in replies}
        if replies:
            state.aggregate_ndarrays = sum_masked_vectors([
                msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]  # type: ignore[misc]
                for msg in replies
            ])
        for msg in replies:  # backward compatibility with Strategy, as Flower's stage
            fitres = compat.recorddict_to_fitres(msg.content, True)
            state.legacy_results.append((state.nid_to_proxies[msg.metadata.src_node_id], fitres))
        return self._check_threshold(state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's unmask stage with the mask arithmetic on flat ``uint32`` vectors.

        The messages (the same ``UNMASK`` request to every active site, the same key shares back),
        the Shamir recovery and the pairwise keys are Flower's; :func:`remove_masks` replaces
        Flower's per-tensor ``int64`` mask expansion and arithmetic. The aggregate is the same
        integer vector, so everything after it
        (dequantisation, ``aggregate_fit``, history) runs as Flower's code does.
        """
        if state.mod_range != MODULUS_RANGE:
            return super().unmask_stage(grid, context, state)
        current_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        active_nids = set(state.active_node_ids)
        dead_nids = state.sampled_node_ids - active_nids

        def make(nid: int) -> Message:
            neighbours = state.nid_to_neighbours[nid]
            configs = ConfigRecord({
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: list(neighbours & active_nids),
                Key.DEAD_NODE_ID_LIST: list(neighbours & dead_nids),
            })
            return Message(
                content=RecordDict({RECORD_KEY_CONFIGS: configs}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
                group_id=str(current_round),
            )

        msgs = grid.send_and_receive([make(nid) for nid in state.active_node_ids], timeout=self.timeout)
        state.active_node_ids = {msg.metadata.src_node_id for msg in msgs if not msg.has_error()}
        shares: dict[int, list[bytes]] = {nid: [] for nid in state.sampled_node_ids}
        for msg in msgs:
            if msg.has_error():
                state.failures.append(Exception(msg.error))
                continue
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            for owner, share in zip(configs[Key.NODE_ID_LIST], configs[Key.SHARE_LIST], strict=True):
                shares[int(owner)].append(share)  # type: ignore[arg-type]
        masked = state.aggregate_ndarrays
        del state.aggregate_ndarrays
        unmasked = remove_masks(
            masked,
            shares=shares,
            active=active_nids,
            neighbours=state.nid_to_neighbours,
            public_keys=state.nid_to_publickeys,
            threshold=state.threshold,
            generator=self.settings.mask_generator,
        )
        if unmasked is None:
            logger.error("secure aggregation: not enough key shares to remove the masks")
            return False
        return self._finish_unmask(context, state, unmasked, current_round=current_round, active=len(active_nids))

    def _finish_unmask(
        self, context: LegacyContext, state: WorkflowState, unmasked: NDArrays, *, current_round: int, active: int
    ) -> bool:
        """Flower's unmask tail, unchanged: dequantise, hand the aggregate to ``aggregate_fit``."""
        q_total_ratio, recon = factor_extract(unmasked)
        inv_dq_total_ratio = state.quantization_range / q_total_ratio
        aggregated = dequantize(recon, state.clipping_range, state.quantization_range)
        offset = -(active - 1) * state.clipping_range
        for vec in aggregated:
            vec += offset
            vec *= inv_dq_total_ratio
        results = state.legacy_results
        parameters = ndarrays_to_parameters(aggregated)
        for _, fitres in results:
            fitres.parameters = parameters
        parameters_aggregated, metrics_aggregated = context.strategy.aggregate_fit(
            current_round, results, state.failures  # type: ignore[arg-type]
        )
        if parameters_aggregated:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                parameters_aggregated, True
            )
            context.history.add_metrics_distributed_fit(server_round=current_round, metrics=metrics_aggregated)
        return True


# --------------------------------------------------------------------------- update adapter
def restore_weights(global_weights: NDArrays, update: NDArrays) -> NDArrays:
    """``global + update`` entry by entry, in each global entry's dtype.

    Integer entries (BatchNorm's ``num_batches_tracked``) get the update rounded to an integer.

    Raises
    ------
    ValueError
        If the number of entries or a shape differs.
    """
    if len(global_weights) != len(update):
        raise ValueError(
            f"the SecAgg+ aggregate has {len(update)} arrays but the global model has {len(global_weights)}: "
            "every site must run medfed's update mod (client.update_mods) when secagg is on."
        )
    out: NDArrays = []
    for i, (g, d) in enumerate(zip(global_weights, update, strict=True)):
        d = np.asarray(d, dtype=np.float64)
        if d.size == g.size:
            d = d.reshape(g.shape)  # 0-d entries travel as shape (1,) (see client.update_mods)
        if d.shape != g.shape:
            raise ValueError(f"SecAgg+ aggregate entry {i} has shape {d.shape}, the global model {g.shape}.")
        if g.dtype.kind in "iub":
            out.append((g.astype(np.int64) + np.rint(d).astype(np.int64)).astype(g.dtype))
        else:
            out.append((g.astype(np.float64) + d).astype(g.dtype))
    return out


class SecAggUpdateStrategy(DelegatingStrategy):
    """Outermost wrapper under SecAgg+: turns the aggregated update back into weights.

    Under SecAgg+ every site sends ``local - global`` and Flower's workflow hands the strategy
    one :class:`FitRes` per surviving site, each carrying the same securely aggregated vector
    (the example-weighted mean update) and the site's own ``num_examples`` and metrics. This
    wrapper replaces that vector by ``global + update`` before delegating, so ``strategy`` sees
    what it would see without SecAgg+: full weights. It also stops the run after a failed
    round when ``on_failure == "stop"``.

    Before that it checks the aggregate (:func:`medfed.server.validation.check_aggregate`: as many
    arrays as the model, the model's shapes, finite): the server cannot check single updates
    under SecAgg+, but a broken aggregate must not become the global model. An invalid
    aggregate drops the round (the model is unchanged) and is reported to ``on_invalid``.

    Parameters
    ----------
    strategy
        The wrapped strategy (medfed: ``RecordingStrategy(DP wrapper(FedAvg))``).
    on_failure
        ``"continue"``: a failed round leaves the model unchanged and the next round runs;
        ``"stop"``: no later round selects sites or evaluates.
    on_invalid
        Called as ``on_invalid(server_round, results, failures, report=RoundValidation)`` for a
        round whose aggregate is invalid (medfed: :meth:`RecordingStrategy.drop_round`).
    """

    def __init__(
        self, strategy: Strategy, *, on_failure: str = "continue", on_invalid: InvalidCallback | None = None
    ) -> None:
        super().__init__(strategy)
        self.on_failure = on_failure
        self.on_invalid = on_invalid
        self.stopped_round: int | None = None
        self._global: dict[int, NDArrays] = {}

    def record_outcome(self, outcome: SecAggOutcome) -> None:
        """Called by :class:`MedfedSecAggPlusWorkflow` after each round."""
        self._global.pop(outcome.round, None)
        if not outcome.completed and self.on_failure == "stop" and self.stopped_round is None:
            self.stopped_round = outcome.round
            logger.error(
                "secagg-on-failure = 'stop': the run stops after round %d; the final model is the last "
                "one securely aggregated.",
                outcome.round,
            )

    def _stopped(self, server_round: int) -> bool:
        return self.stopped_round is not None and server_round > self.stopped_round

    def resume_state(self) -> dict[str, object]:
        """What a resumed run needs from this wrapper (see ``medfed.server.resume``)."""
        return {"stopped_round": self.stopped_round}

    def load_resume_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`resume_state`."""
        self.stopped_round = state["stopped_round"]  # type: ignore[assignment]

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Remember the round's global model, then delegate (no sites once stopped)."""
        if self._stopped(server_round):
            return []
        self._global[server_round] = parameters_to_ndarrays(parameters)
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the aggregated update, replace it by ``global + update`` in every result, delegate.

        An aggregate that is not finite or not model-shaped drops the round (``None``: the
        global model stays) and goes to ``on_invalid``. When no site trained (every result has
        ``num_examples = 0``: budgets spent, or the run refused by the sites' privacy policies)
        the aggregate is meaningless (Flower divides by a total weight of 0) and the results go
        to ``strategy`` as they are, which records them and stops the run.
        """
        if results and all(res.num_examples == 0 for _, res in results):
            self._global.pop(server_round, None)
            return self.strategy.aggregate_fit(server_round, results, failures)
        if results:
            shared = results[0][1].parameters
            if any(res.parameters is not shared for _, res in results[1:]):
                raise ValueError(
                    "SecAggUpdateStrategy expects the results of Flower's SecAgg+ workflow (one shared "
                    "aggregate); it must only wrap the strategy of a SecAgg+ run."
                )
            global_weights = self._global.pop(server_round)
            update = parameters_to_ndarrays(shared)
            finding = check_aggregate(update, global_weights=global_weights)
            if finding is not None:
                skipped = f"the SecAgg+ aggregate is invalid ({finding.reason}: {finding.detail}): the global model is unchanged"
                logger.error("round %d: %s.", server_round, skipped)
                report = RoundValidation(
                    round=server_round,
                    rejected=[{"site": "aggregate", "node": "", "reason": finding.reason, "detail": finding.detail}],
                    skipped=skipped,
                )
                if self.on_invalid is not None:
                    return self.on_invalid(server_round, results, failures, report=report)
                return None, {}
            restored = ndarrays_to_parameters(restore_weights(global_weights, update))
            for _, res in results:
                res.parameters = restored
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate (no sites once stopped)."""
        if self._stopped(server_round):
            return []
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate (nothing once stopped)."""
        if self._stopped(server_round):
            return None
        return self.strategy.evaluate(server_round, parameters)
