"""The metrics by which a site tells the coordinator it refused a run (its privacy policy).

Both sides use these names: a deployed site that refuses a run
(:func:`medfed.client.site_policy.check_run`) replies with :func:`refusal_metrics`, and the server
(``medfed.server.recording``, the run store) reads them back with :func:`refused_keys`. Only the
names of the run-config keys travel, as metric names: never the site's limits (they stay on the
site, in its log).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from medfed.shared.config import RunConfig

__all__ = ["POLICY_REFUSED", "POLICY_REFUSED_PREFIX", "refusal_metrics", "refused_keys", "is_refusal"]

POLICY_REFUSED = "policy-refused"
"""Fit / evaluate metric: 1 when the site refused the run because it asks for less privacy than
the site's policy allows (nothing trained or evaluated, ``num_examples = 0``)."""

POLICY_REFUSED_PREFIX = "policy-refused-"
"""Prefix of the per-key metrics: ``policy-refused-dp-delta = 1`` names the run-config key that
broke the site's policy."""


def refusal_metrics(keys: Iterable[str]) -> dict[str, int]:
    """``{"policy-refused": 1, "policy-refused-<key>": 1, ...}`` for the violated run-config ``keys``."""
    metrics = {POLICY_REFUSED: 1}
    for key in keys:
        metrics[POLICY_REFUSED_PREFIX + key] = 1
    return metrics


def is_refusal(metrics: Mapping[str, Any]) -> bool:
    """Whether a site's metrics say it refused the run."""
    value = metrics.get(POLICY_REFUSED, 0)
    return isinstance(value, (int, float)) and value == 1


def refused_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The run-config keys a site's refusal metrics name, sorted (empty: the site did not refuse).

    Only names of real run-config keys count: a metric name carrying any other text is ignored,
    so what a hostile site puts there never reaches a log, an event or the dashboard.
    """
    if not is_refusal(metrics):
        return []
    known = set(RunConfig.keys())
    return sorted(
        key
        for name, value in metrics.items()
        if str(name).startswith(POLICY_REFUSED_PREFIX)
        and value
        and (key := str(name)[len(POLICY_REFUSED_PREFIX):]) in known
    )
