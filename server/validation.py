"""Update validation: the server rejects broken or hostile site updates before aggregation.

Without SecAgg+ the server sees every site's weights. :class:`ValidatingStrategy` wraps the
aggregation strategy (inside :class:`~medfed.server.recording.RecordingStrategy`) and checks each
result against the round's global model, in this order (the first failed check is the
reason recorded):

``unreadable``
    the arrays cannot be decoded (e.g. pickled objects, which Flower refuses to load);
``count``
    a different number of arrays than the model's state entries;
``shape``, ``dtype``
    an entry's shape or dtype differs from the global model's (a site must send the model's
    own state: float32 parameters and buffers, int64 step counters);
``nan``, ``inf``
    a floating-point entry holds NaN or +-Inf;
``examples``
    the site reports no (or a negative number of) training examples;
``norm``
    ``max-update-norm > 0`` and the L2 norm of ``site weights - global weights`` over the
    floating-point entries exceeds it (integer step counters are not part of the norm).

A rejected update is left out of the round, which goes on with the others; the rejection
(site, reason, a short detail without any data values) goes into the round's record in
``metrics.jsonl`` and the run store's events. If no valid update is left, or fewer than the
robust rule needs (:func:`medfed.shared.config.robust_min_sites`), nothing is aggregated: the global
model stays unchanged and the record says why (``skipped``). Each accepted or norm-rejected
site's update norm is recorded too (``sites.<site>.fit.update-norm``), so that a bound can be
chosen from real rounds.

Under SecAgg+ the server cannot see single updates: the sites check and clip their own update
before masking (:mod:`medfed.client.update_mods`) and the server checks the aggregate only
(:func:`check_aggregate`, applied by :class:`medfed.server.secure.SecAggUpdateStrategy`). See
``docs/faults.md`` for what this does and does not protect against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from medfed.server.delegating import DelegatingStrategy
from medfed.shared.weights import npy_view

__all__ = [
    "REASONS",
    "Finding",
    "RoundValidation",
    "ValidatingStrategy",
    "check_update",
    "check_aggregate",
    "update_norm",
    "site_key",
    "cast_like",
]

logger = logging.getLogger(__name__)

REASONS: tuple[str, ...] = ("unreadable", "count", "shape", "dtype", "nan", "inf", "examples", "norm")
"""Every reason a rejection can carry, in the order the checks run."""

ReportCallback = Callable[["RoundValidation"], None]
SiteOf = Callable[[ClientProxy, FitRes, int], str]
"""``(proxy, result, position)`` -> the site's record key (:meth:`medfed.server.recording.RecordingStrategy.site_of`)."""


@dataclass(frozen=True)
class Finding:
    """Why an update (or an aggregate) is invalid.

    ``detail`` names array positions, shapes, dtypes, counts or the norm; never data values.
    """

    reason: str
    detail: str


@dataclass
class RoundValidation:
    """What validation decided in one round (see :meth:`RecordingStrategy.record_validation`)."""

    round: int
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """One ``{"site", "node", "reason", "detail"}`` per rejected update."""
    norms: dict[str, float] = field(default_factory=dict)
    """Update norm per site (finite norms only)."""
    skipped: str | None = None
    """Why nothing was aggregated this round (``None``: the round aggregated)."""


def site_key(metrics: dict[str, Scalar], *, fallback: int) -> str:
    """``site-<site-index>`` from a site's metrics; ``site-?<position>`` if it is not an integer.

    A hostile or broken site may send any scalar; a missing, fractional or non-finite index
    must not stop the server.
    """
    value = metrics.get("site-index", fallback)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"site-?{fallback}"
    if float(value) != int(value):
        return f"site-?{fallback}"
    return f"site-{int(value)}"


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f"


NORM_CHUNK = 1 << 18
"""Entries per float64 difference in :func:`update_norm` (2 MiB: the buffer stays warm in cache
and is reused, instead of two whole-model float64 copies per site and round)."""


def update_norm(weights: NDArrays, *, global_weights: NDArrays) -> float:
    """L2 norm of ``weights - global_weights`` over the floating-point entries, in float64.

    Entries whose global counterpart is an integer (BatchNorm's ``num_batches_tracked``) are
    left out: they count steps, they are not learned. Shapes must match. Non-finite entries give
    a non-finite norm. The differences are formed :data:`NORM_CHUNK` entries at a time.
    """
    total = 0.0
    for w, g in zip(weights, global_weights, strict=True):
        g = np.asarray(g)
        if not _is_float(g):
            continue
        w_flat, g_flat = np.asarray(w).reshape(-1), g.reshape(-1)
        if w_flat.shape != g_flat.shape:
            raise ValueError(f"shapes differ: {np.shape(w)} and {g.shape}")
        for start in range(0, g_flat.size, NORM_CHUNK):
            diff = np.subtract(w_flat[start:start + NORM_CHUNK], g_flat[start:start + NORM_CHUNK], dtype=np.float64)
            total += float(np.dot(diff, diff))
    return math.sqrt(total)


def _finite_finding(arrays: NDArrays) -> Finding | None:
    nans = infs = 0
    first: int | None = None
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype.kind not in "fc":
            continue
        n, k = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if (n or k) and first is None:
            first = i
        nans, infs = nans + n, infs + k
    if nans:
        return Finding("nan", f"{nans} NaN and {infs} infinite entries (first in array {first})")
    if infs:
        return Finding("inf", f"{infs} infinite entries (first in array {first})")
    return None


def check_update(
    weights: NDArrays, *, global_weights: NDArrays, max_update_norm: float = 0.0
) -> tuple[Finding | None, float | None]:
    """Check one site's weights against the round's global model.

    Parameters
    ----------
    weights
        The site's state entries, as received (one array per state entry, any shapes).
    global_weights
        The global model the site was sent this round (shapes and dtypes are the reference).
    max_update_norm
        Reject when :func:`update_norm` exceeds it; ``0`` turns the check off.

    Returns
    -------
    tuple
        ``(finding, norm)``: the first failed check (``None`` if valid) and the update norm
        (``None`` when it cannot be computed: wrong count, shapes, dtypes or non-finite values).
    """
    if len(weights) != len(global_weights):
        return Finding("count", f"{len(weights)} arrays, the model has {len(global_weights)}"), None
    for i, (w, g) in enumerate(zip(weights, global_weights, strict=True)):
        w, g = np.asarray(w), np.asarray(g)
        if w.shape != g.shape:
            return Finding("shape", f"array {i} has shape {tuple(w.shape)}, the model {tuple(g.shape)}"), None
        if w.dtype != g.dtype:
            return Finding("dtype", f"array {i} has dtype {w.dtype}, the model {g.dtype}"), None
    norm = update_norm(weights, global_weights=global_weights)
    # A NaN or an infinity anywhere in a float entry makes the norm non-finite (the global model is
    # finite), so the entry-by-entry count runs only then, or when a complex entry is not in the norm.
    if not math.isfinite(norm) or any(np.asarray(w).dtype.kind == "c" for w in weights):
        finding = _finite_finding(weights)
        if finding is not None:
            return finding, None
    if max_update_norm > 0 and not norm <= max_update_norm:
        return Finding("norm", f"update norm {norm:.4g} > max-update-norm = {max_update_norm:g}"), norm
    return None, norm


def check_aggregate(update: NDArrays, *, global_weights: NDArrays) -> Finding | None:
    """Check a SecAgg+ aggregate (the mean update) before it is added to the global model.

    The count and the shapes must match the model (0-d entries may travel as shape ``(1,)``,
    see :mod:`medfed.client.update_mods`) and every entry must be finite.
    """
    if len(update) != len(global_weights):
        return Finding("count", f"the aggregate has {len(update)} arrays, the model {len(global_weights)}")
    for i, (d, g) in enumerate(zip(update, global_weights, strict=True)):
        d, g = np.asarray(d), np.asarray(g)
        if d.shape != g.shape and not (d.size == g.size == 1):
            return Finding("shape", f"aggregate array {i} has shape {tuple(d.shape)}, the model {tuple(g.shape)}")
        if d.dtype.kind not in "biuf":
            return Finding("dtype", f"aggregate array {i} has dtype {d.dtype}")
    return _finite_finding(update)


def cast_like(weights: NDArrays, *, reference: NDArrays) -> NDArrays:
    """``weights`` in the dtypes of ``reference`` (integer entries rounded).

    Flower's median and trimmed mean return float64 for int64 step counters; the global model
    keeps the model's own dtypes, so every round validates against the same ones.
    """
    out: NDArrays = []
    for w, r in zip(weights, reference, strict=True):
        w = np.asarray(w)
        if w.dtype == r.dtype:
            out.append(w)
        elif r.dtype.kind in "iub":
            out.append(np.rint(w).astype(r.dtype))
        else:
            out.append(w.astype(r.dtype))
    return out


class ValidatingStrategy(DelegatingStrategy):
    """Reject invalid site updates, then let ``strategy`` aggregate the rest.

    Parameters
    ----------
    strategy
        The aggregation strategy (FedAvg, a robust rule, a DP wrapper...).
    max_update_norm
        ``max-update-norm`` (``0``: no norm check).
    min_updates
        Fewest valid updates ``strategy`` may aggregate (a robust rule's guarantee, see
        :func:`medfed.shared.config.robust_min_sites`); with fewer the round is skipped.
    rule
        The strategy's name, for messages.
    on_report
        Called with each round's :class:`RoundValidation` before this returns.
    site_of
        Names a result's site in the report (the server's identity of the node); default: the
        ``site-index`` it reports (:func:`site_key`).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        max_update_norm: float = 0.0,
        min_updates: int = 1,
        rule: str = "",
        on_report: ReportCallback | None = None,
        site_of: SiteOf | None = None,
    ) -> None:
        super().__init__(strategy)
        self.site_of = site_of
        self.max_update_norm = float(max_update_norm)
        self.min_updates = max(1, int(min_updates))
        self.rule = rule or type(strategy).__name__
        self.on_report = on_report
        self.reports: list[RoundValidation] = []
        self._global: dict[int, NDArrays] = {}

    def __repr__(self) -> str:
        return f"ValidatingStrategy({self.strategy!r}, max_update_norm={self.max_update_norm:g})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Remember the round's global model (the reference), then delegate."""
        self._global = {server_round: parameters_to_ndarrays(parameters)}
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check every result; aggregate the valid ones (or skip the round, model unchanged)."""
        global_weights = self._global.pop(server_round, None)
        if global_weights is None:
            raise RuntimeError(
                f"ValidatingStrategy got results for round {server_round} without having configured it: "
                "it must wrap the strategy that configures the round."
            )
        report = RoundValidation(round=server_round)
        valid: list[tuple[ClientProxy, FitRes]] = []
        for i, (proxy, res) in enumerate(results):
            site = self.site_of(proxy, res, i) if self.site_of is not None else site_key(res.metrics, fallback=i)
            finding, norm = self._check(res, global_weights)
            if norm is not None and math.isfinite(norm):
                report.norms[site] = norm
            if finding is None:
                valid.append((proxy, res))
                continue
            node = str(getattr(proxy, "cid", "")) if proxy is not None else ""
            report.rejected.append({"site": site, "node": node, "reason": finding.reason, "detail": finding.detail})
            logger.warning(
                "round %d: %s's update rejected (%s: %s); the round goes on without it.",
                server_round, site, finding.reason, finding.detail,
            )
        if results and not valid:
            report.skipped = f"all {len(results)} updates were rejected: the global model is unchanged"
        elif valid and len(valid) < self.min_updates:
            report.skipped = (
                f"{len(valid)} valid update(s), but {self.rule} needs at least {self.min_updates} for its "
                "robustness guarantee: the global model is unchanged"
            )
        if report.skipped:
            logger.error("round %d: %s.", server_round, report.skipped)
            self._report(report)
            return None, {}
        params, metrics = self.strategy.aggregate_fit(server_round, valid, failures)
        if params is not None and any(  # re-encoded only when a rule changed a dtype (headers only)
            npy_view(t).dtype != g.dtype for t, g in zip(params.tensors, global_weights, strict=True)
        ):
            params = ndarrays_to_parameters(cast_like(parameters_to_ndarrays(params), reference=global_weights))
        self._report(report)
        return params, metrics

    def _check(self, res: FitRes, global_weights: NDArrays) -> tuple[Finding | None, float | None]:
        try:  # read-only views of the payload: checking needs no copy of the update
            weights = [npy_view(tensor) for tensor in res.parameters.tensors]
        except Exception as err:  # noqa: BLE001 - anything a site sends must not stop the server
            return Finding("unreadable", f"the arrays cannot be decoded ({type(err).__name__})"), None
        finding, norm = check_update(weights, global_weights=global_weights, max_update_norm=0.0)
        if finding is None and res.num_examples <= 0:
            return Finding("examples", f"it reports {res.num_examples} training examples"), norm
        if finding is None and self.max_update_norm > 0 and norm is not None and not norm <= self.max_update_norm:
            finding = Finding("norm", f"update norm {norm:.4g} > max-update-norm = {self.max_update_norm:g}")
        return finding, norm

    def _report(self, report: RoundValidation) -> None:
        self.reports.append(report)
        if self.on_report is not None:
            self.on_report(report)
