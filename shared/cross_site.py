"""Cross-site evaluation's message protocol: the evaluate-config keys and the metric names a site sends.

Shared by the site (:mod:`medfed.client.cross_site`, which computes the figures) and the server
(:mod:`medfed.server.cross_site`, which reads them). Every name passes the egress rules of
:mod:`medfed.client.egress` (lower-case kebab-case, at most 48 characters, no run of more than 4
digits):

* ``xsite-n``: test images; ``xsite-<metric>``: the site's figures (:data:`REPORTED_METRICS`);
  ``xsite-suppressed``: how many subgroups the site left out;
* ``xsite-sg-<i>-<key>-<code>``: subgroup ``i`` (0, 1, ...) is metadata ``key = code`` and holds
  this many images (:func:`medfed.shared.data.metadata.subgroup_code`: at most 20 characters,
  so the longest name, with ``manufacturer`` and ``i`` up to 999, has 48);
  ``xsite-sg-<i>-<metric>``: its figures.

This module never imports Flower or torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from medfed.shared.data.metadata import METADATA_KEYS

__all__ = [
    "CROSS_SITE",
    "MIN_COUNT",
    "PREFIX",
    "REPORTED_METRICS",
    "THRESHOLD",
    "SiteCrossSite",
    "Subgroup",
    "decode_metrics",
    "encode_metrics",
    "is_cross_site",
]

CROSS_SITE = "cross-site"
"""Evaluate-config key: ``1`` asks for cross-site evaluation instead of validation."""
THRESHOLD = "cross-site-threshold"
"""Evaluate-config key: the global decision threshold (binary classification; optional)."""
MIN_COUNT = "cross-site-min-count"
"""Evaluate-config key: the run's smallest reported subgroup (a site's policy may raise it)."""
PREFIX = "xsite"
REPORTED_METRICS: tuple[str, ...] = (
    "auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "threshold", "dice",
)  # fmt: skip
"""The figures sent per site and per subgroup (those the task has)."""
_GROUP_NAME = re.compile(rf"{PREFIX}-sg-(\d{{1,3}})-({'|'.join(METADATA_KEYS)})-([a-z0-9]+(?:-[a-z0-9]+)*)")
_GROUP_METRIC = re.compile(rf"{PREFIX}-sg-(\d{{1,3}})-({'|'.join(REPORTED_METRICS)})")


@dataclass(frozen=True)
class Subgroup:
    """One reported subgroup: ``key = code`` with ``n`` images and its ``metrics``."""

    key: str
    code: str
    n: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteCrossSite:
    """A site's cross-site figures: ``n`` test images, its ``metrics``, the reported ``subgroups``
    and how many were ``suppressed``."""

    n: int
    metrics: dict[str, float]
    subgroups: list[Subgroup] = field(default_factory=list)
    suppressed: int = 0


def is_cross_site(config: Mapping[str, object]) -> bool:
    """Whether an evaluate config asks for cross-site evaluation."""
    value = config.get(CROSS_SITE, 0)
    return not isinstance(value, str) and bool(value)


def encode_metrics(result: SiteCrossSite) -> dict[str, float]:
    """The metric names and values a site sends for ``result`` (see the module text)."""
    out: dict[str, float] = {f"{PREFIX}-n": float(result.n), f"{PREFIX}-suppressed": float(result.suppressed)}
    out.update({f"{PREFIX}-{k}": v for k, v in result.metrics.items()})
    for i, group in enumerate(result.subgroups):
        out[f"{PREFIX}-sg-{i}-{group.key}-{group.code}"] = float(group.n)
        out.update({f"{PREFIX}-sg-{i}-{k}": v for k, v in group.metrics.items()})
    return out


def decode_metrics(metrics: Mapping[str, object]) -> SiteCrossSite | None:
    """The inverse of :func:`encode_metrics` (the server's side); ``None`` without ``xsite-n``.

    Names that match none of the patterns are ignored (``site-index``, say), as is a subgroup
    whose count is not a whole number >= 0; ``None`` too when ``xsite-n`` is not one.
    """

    def number(value: object) -> float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")

    def count(value: object) -> int | None:
        n = number(value)
        return int(n) if math.isfinite(n) and n >= 0 and n == int(n) else None

    total = count(metrics.get(f"{PREFIX}-n"))
    if total is None:
        return None

    site = {k: number(metrics[f"{PREFIX}-{k}"]) for k in REPORTED_METRICS if f"{PREFIX}-{k}" in metrics}
    heads: dict[int, tuple[str, str, int]] = {}
    figures: dict[int, dict[str, float]] = {}
    for name, value in metrics.items():
        if (match := _GROUP_NAME.fullmatch(name)) and (n := count(value)) is not None:
            heads[int(match.group(1))] = (match.group(2), match.group(3), n)
        elif match := _GROUP_METRIC.fullmatch(name):
            figures.setdefault(int(match.group(1)), {})[match.group(2)] = number(value)
    subgroups = [Subgroup(key, code, n, figures.get(i, {})) for i, (key, code, n) in sorted(heads.items())]
    return SiteCrossSite(
        n=total,
        metrics=site,
        subgroups=subgroups,
        suppressed=count(metrics.get(f"{PREFIX}-suppressed", 0)) or 0,
    )
