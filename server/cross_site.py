"""Cross-site evaluation, the server's side: ask every site to score a model on its local test
split, and write one row per site (and per reported subgroup) into the run directory and the store.

After the last round (``cross-site = true``, the default) the ServerApp sends every site one more
``evaluate`` message over the same path as the rounds' validation (Flower's legacy records),
with ``cross-site = 1``, the run's ``cross-site-min-count`` and, in binary classification, the
decision threshold chosen on the validation split by the server's evaluation of the final model
(``cross-site-threshold``; deployment has none and each site chooses its own on its validation
split). Each site answers with metrics only (:mod:`medfed.client.cross_site`; names: :mod:`medfed.shared.cross_site`); no data leaves it.

The server writes ``<run_dir>/cross_site.json``::

    {"checkpoint": "final", "round": 5, "task": "classification", "min_count": 10,
     "sites": [{"site": "site-0", "n": 40, "metrics": {"auc": ..., "accuracy": ..., ...},
                "subgroups": [{"key": "sex", "value": "F", "n": 21, "metrics": {...}}, ...],
                "suppressed": 1}, ...],
     "gaps": [{"key": "sex", "metric": "auc", "best_value": "F", "best": ..., "worst_value": "M",
               "worst": ..., "gap": ...}, ...]}

``gaps`` pools each subgroup over the sites that report it (the mean of the sites' figures
weighted by their subgroup sizes: the server has no predictions to pool) and gives, per metadata
key and metric, the best and the worst subgroup and the difference (:func:`subgroup_gaps`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import Code, EvaluateIns, ndarrays_to_parameters
from flwr.serverapp import Grid

from medfed.server.identity import SiteIdentities
from medfed.server.rounds import error_class
from medfed.server.run_dir import CROSS_SITE_FILE, RunDirectory
from medfed.shared.config import RunConfig
from medfed.shared.cross_site import CROSS_SITE, MIN_COUNT, REPORTED_METRICS, THRESHOLD, SiteCrossSite, decode_metrics
from medfed.shared.data.metadata import METADATA_KEYS, subgroup_label, subgroup_rank

__all__ = [
    "CROSS_SITE_FILE",
    "GAP_METRICS",
    "build_report",
    "cross_site_config",
    "request_cross_site",
    "run_cross_site",
    "site_row",
    "subgroup_gaps",
    "subgroup_order",
]

logger = logging.getLogger(__name__)

GAP_METRICS: tuple[str, ...] = tuple(m for m in REPORTED_METRICS if m != "threshold")
"""The metrics whose best-worst subgroup gap is reported (higher is better for each)."""


def cross_site_config(cfg: RunConfig, *, threshold: float | None) -> dict[str, bool | int | float]:
    """The evaluate config of a cross-site request."""
    config: dict[str, bool | int | float] = {CROSS_SITE: 1, MIN_COUNT: int(cfg.cross_site_min_count)}
    if threshold is not None and math.isfinite(threshold):
        config[THRESHOLD] = float(threshold)
    return config


def request_cross_site(
    grid: Grid, *, weights: Sequence[np.ndarray], config: Mapping[str, Any], timeout: float | None
) -> list[tuple[int, dict[str, Any]]]:
    """Send the cross-site request to every node of ``grid``; ``(node, metrics)`` of each answer.

    Error replies and sites that do not answer (within ``timeout``) are logged, naming the node
    and the exception class the site's egress guard reports (never a message text).
    """
    nodes = sorted(int(n) for n in grid.get_node_ids())
    ins = EvaluateIns(ndarrays_to_parameters(list(weights)), dict(config))
    messages = [
        Message(
            content=compat.evaluateins_to_recorddict(ins, True),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
            group_id="cross-site",
        )
        for node in nodes
    ]
    out: list[tuple[int, dict[str, Any]]] = []
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error():
            logger.warning(
                "cross-site evaluation: node %d failed (%s); it has no row.", node, error_class(reply.error.reason or "")
            )
            continue
        res = compat.recorddict_to_evaluateres(reply.content)
        if res.status.code != Code.OK:
            logger.warning("cross-site evaluation: node %d answered with status %s; it has no row.", node, res.status.code)
            continue
        out.append((node, dict(res.metrics)))
    for node in nodes:
        if node not in answered:
            logger.warning("cross-site evaluation: node %d did not answer; it has no row.", node)
    return out


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def subgroup_order(group: Mapping[str, Any]) -> tuple[tuple[int, int, str], str]:
    """Sort key of a subgroup entry (:func:`~medfed.shared.data.metadata.subgroup_rank`)."""
    return (subgroup_rank(str(group["key"]), str(group["value"])), str(group["key"]))


def site_row(site: str, result: SiteCrossSite) -> dict[str, Any]:
    """One site's entry of ``cross_site.json`` (subgroup values as shown: ``F``, ``60+``...)."""
    groups = [
        {"key": g.key, "value": subgroup_label(g.key, g.code), "n": int(g.n), "metrics": _finite(g.metrics)}
        for g in result.subgroups
    ]
    return {
        "site": site,
        "n": int(result.n),
        "metrics": _finite(result.metrics),
        "subgroups": sorted(groups, key=subgroup_order),
        "suppressed": int(result.suppressed),
    }


def subgroup_gaps(sites: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per metadata key and metric: the best and the worst subgroup, pooled over sites, and the gap.

    Parameters
    ----------
    sites
        Site entries as :func:`site_row` writes them.

    Returns
    -------
    list
        ``{"key", "metric", "best_value", "best", "worst_value", "worst", "gap"}`` for each key
        with at least two subgroups reporting the metric; a subgroup's figure is the mean of the
        sites' figures weighted by their subgroup sizes (ties go to the value first in sort order).
    """
    pooled: dict[tuple[str, str], dict[str, list[float]]] = {}
    for site in sites:
        for group in site.get("subgroups", []):
            sums = pooled.setdefault((str(group["key"]), str(group["value"])), {})
            for metric, value in group.get("metrics", {}).items():
                if metric in GAP_METRICS and math.isfinite(float(value)):
                    acc = sums.setdefault(metric, [0.0, 0.0])
                    acc[0] += float(value) * float(group["n"])
                    acc[1] += float(group["n"])
    order = {key: i for i, key in enumerate(METADATA_KEYS)}
    gaps: list[dict[str, Any]] = []
    for key in sorted({k for k, _ in pooled}, key=lambda k: (order.get(k, len(order)), k)):
        for metric in GAP_METRICS:
            means = {
                value: sums[metric][0] / sums[metric][1]
                for (k, value), sums in sorted(pooled.items())
                if k == key and metric in sums and sums[metric][1] > 0
            }
            if len(means) < 2:
                continue
            best = max(means, key=lambda v: means[v])
            worst = min(means, key=lambda v: means[v])
            gaps.append({
                "key": key, "metric": metric, "best_value": best, "best": means[best],
                "worst_value": worst, "worst": means[worst], "gap": means[best] - means[worst],
            })  # fmt: skip
    return gaps


def build_report(
    rows: Sequence[tuple[str, SiteCrossSite]], *, checkpoint: str, server_round: int, task: str, min_count: int
) -> dict[str, Any]:
    """The content of ``cross_site.json`` from each site's decoded answer (in site order)."""
    sites = [site_row(site, result) for site, result in rows]
    return {
        "checkpoint": checkpoint,
        "round": int(server_round),
        "task": task,
        "min_count": int(min_count),
        "sites": sites,
        "gaps": subgroup_gaps(sites),
    }


def run_cross_site(
    grid: Grid,
    *,
    cfg: RunConfig,
    weights: Sequence[np.ndarray],
    threshold: float | None,
    identities: SiteIdentities,
    task: str,
    run_dir: RunDirectory,
    server_round: int,
    checkpoint: str = "final",
) -> dict[str, Any]:
    """Ask every site to score ``weights``, write the report (file and store), return the summary entry.

    Returns
    -------
    dict
        ``{"cross_site": {"file", "checkpoint", "sites", "subgroups", "suppressed", "min_count"}}``
        for ``summary.json``.
    """
    config = cross_site_config(cfg, threshold=threshold)
    answers = request_cross_site(grid, weights=weights, config=config, timeout=cfg.round_timeout or None)
    rows: list[tuple[tuple[int, int, str], str, SiteCrossSite]] = []
    for position, (node, metrics) in enumerate(answers):
        identity = identities.identify(node, metrics, position=position)
        if identity.refused is not None:
            logger.error("cross-site evaluation: a result was refused (%s); it has no row.", identity.refused)
            continue
        result = decode_metrics(metrics)
        if result is None:
            logger.warning(
                "cross-site evaluation: %s sent no cross-site figures (its policy refused the run); it has no row.",
                identity.key,
            )
            continue
        if result.n == 0:
            logger.warning("cross-site evaluation: %s has no local test split; it has no row.", identity.key)
            continue
        order = (0, identity.index, identity.key) if identity.index is not None else (1, 0, identity.key)
        rows.append((order, identity.key, result))
    rows.sort(key=lambda r: r[0])
    report = build_report(
        [(site, result) for _, site, result in rows],
        checkpoint=checkpoint, server_round=server_round, task=task, min_count=cfg.cross_site_min_count,
    )
    path = run_dir.write_cross_site(report)
    logger.info("cross-site evaluation: %d site row(s) in %s", len(report["sites"]), path.name)
    return {
        "cross_site": {
            "file": path.name,
            "checkpoint": checkpoint,
            "sites": len(report["sites"]),
            "subgroups": sum(len(s["subgroups"]) for s in report["sites"]),
            "suppressed": sum(s["suppressed"] for s in report["sites"]),
            "min_count": cfg.cross_site_min_count,
        }
    }
