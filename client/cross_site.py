"""A site's part of cross-site evaluation: the final global model on its own local test split.

At the end of a run (and on demand for a checkpoint) the server sends every site one more
evaluate message with ``cross-site = 1`` in its config (:mod:`medfed.server.cross_site`). The site
scores the global model on its local test split (simulation: drawn with the site's class mix,
``local-test-fraction``; deployment: its datalist's ``test`` section) and answers with metrics
only: nothing about a single image, no metadata value that looks like an identifier.

Binary classification is scored at the server's threshold (``cross-site-threshold`` in the
config: the one chosen on the validation split of the global model's evaluation); without one
(deployment: the server holds no data) at the threshold chosen on the site's own validation split.

Subgroups: for each metadata key of the test entries (:mod:`medfed.shared.data.metadata`) each
subgroup (``sex`` F / M, ``age`` bands, ``scanner``...) with at least ``min_count`` images is
scored on its own. A smaller subgroup sends nothing, not its count either; and where the
subgroups left out of a key (suppressed, or samples without a usable value) add up to between 1
and ``min_count - 1`` images, the next smallest reported subgroup is suppressed too, so that no
count of fewer than ``min_count`` images can be derived from the total. A key with more than
:data:`MAX_GROUPS_PER_KEY` distinct values at the site looks like a per-patient field and is
left out whole. The site's log says what was left out (keys and counts, never values).

The metric names a site sends are those of :mod:`medfed.shared.cross_site` (they pass the egress
rules of :mod:`medfed.client.egress`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from medfed.shared.cross_site import PREFIX, REPORTED_METRICS, THRESHOLD, SiteCrossSite, Subgroup, encode_metrics
from medfed.shared.data.base import ImageSet
from medfed.shared.data.metadata import METADATA_KEYS, subgroup_code
from medfed.shared.metrics import classification_metrics, segmentation_metrics, youden_threshold
from medfed.shared.training import predict

__all__ = ["MAX_GROUPS_PER_KEY", "cross_site_metrics", "site_cross_site"]

logger = logging.getLogger(__name__)

MAX_GROUPS_PER_KEY = 8
"""A metadata key with more distinct values at a site is left out (it looks per-patient)."""


def _figures(logits: torch.Tensor, targets: torch.Tensor, *, task: str, num_classes: int,
             threshold: float | None) -> dict[str, float]:
    if task == "segmentation":
        metrics = segmentation_metrics(logits, targets, num_classes=num_classes)
    else:
        metrics = classification_metrics(logits, targets, num_classes=num_classes, threshold=threshold)
    return {k: float(metrics[k]) for k in REPORTED_METRICS if k in metrics}


def _groups(metadata: Sequence[Mapping[str, object]], *, min_count: int) -> tuple[list[tuple[str, str, list[int]]], int]:
    """The reported subgroups ``(key, code, sample indices)`` and the number suppressed."""
    out: list[tuple[str, str, list[int]]] = []
    suppressed = 0
    n = len(metadata)
    for key in METADATA_KEYS:
        present = [i for i, m in enumerate(metadata) if key in m]
        if not present:
            continue
        members: dict[str, list[int]] = {}
        unusable = 0
        for i in present:
            code = subgroup_code(key, metadata[i][key])
            if code is None:
                unusable += 1
            else:
                members.setdefault(code, []).append(i)
        if unusable:
            logger.warning(
                "cross-site evaluation: %d test sample(s) have a %s value that is not usable or looks like "
                "an identifier; they count in no %s subgroup (docs/evaluation.md says which values are used).",
                unusable, key, key,
            )
        if len(members) > MAX_GROUPS_PER_KEY:
            logger.warning(
                "cross-site evaluation: metadata %s has %d distinct values here (more than %d): it looks "
                "like a per-patient field and is left out of the subgroups.",
                key, len(members), MAX_GROUPS_PER_KEY,
            )
            suppressed += len(members)
            continue
        kept = {code: idx for code, idx in members.items() if len(idx) >= min_count}
        dropped = len(members) - len(kept)
        # Secondary suppression: the images outside the reported groups of this key must not
        # be a small, derivable count.
        left_out = n - sum(len(idx) for idx in kept.values())
        while kept and 0 < left_out < min_count:
            smallest = min(kept, key=lambda c: (len(kept[c]), c))
            left_out += len(kept.pop(smallest))
            dropped += 1
        suppressed += dropped
        if dropped:
            logger.info(
                "cross-site evaluation: %d %s subgroup(s) below cross-site-min-count = %d (or needed to hide "
                "them) are not reported.", dropped, key, min_count,
            )
        out += [(key, code, kept[code]) for code in sorted(kept)]
    return out, suppressed


def cross_site_metrics(
    model: nn.Module,
    test: ImageSet,
    *,
    val: ImageSet | None,
    threshold: float | None,
    min_count: int,
    device: torch.device,
) -> tuple[float, SiteCrossSite]:
    """Score ``model`` on the site's local ``test`` split, as a whole and per subgroup.

    Parameters
    ----------
    test
        Images ``(N, C, *spatial)`` with targets and optional :attr:`ImageSet.metadata`.
    val
        The site's validation split: binary classification chooses the threshold on it when
        ``threshold`` is ``None``.
    threshold
        The global decision threshold (binary classification), or ``None``.
    min_count
        The smallest subgroup reported (>= 2).

    Returns
    -------
    tuple
        ``(mean loss on test, SiteCrossSite)``.
    """
    if min_count < 2:
        raise ValueError(f"min_count = {min_count} is invalid: it must be >= 2.")
    logits, targets, loss = predict(model, test, device=device)
    if threshold is None and test.task == "classification" and test.num_classes == 2 and val is not None and len(val):
        val_logits, val_targets, _ = predict(model, val, device=device)
        threshold = youden_threshold(torch.softmax(val_logits, dim=1)[:, 1], val_targets)
    score = dict(task=test.task, num_classes=test.num_classes, threshold=threshold)
    subgroups: list[Subgroup] = []
    groups, suppressed = _groups(test.metadata, min_count=min_count) if test.metadata else ([], 0)
    for key, code, idx in groups:
        index = torch.as_tensor(idx, dtype=torch.long)
        subgroups.append(Subgroup(key, code, len(idx), _figures(logits[index], targets[index], **score)))
    return loss, SiteCrossSite(len(test), _figures(logits, targets, **score), subgroups, suppressed)


def site_cross_site(
    model: nn.Module,
    *,
    test: ImageSet | None,
    val: ImageSet | None,
    config: Mapping[str, object],
    min_count: int,
    device: torch.device,
) -> tuple[float, int, dict[str, float]]:
    """What :meth:`~medfed.client.site_client.SiteClient.evaluate` returns for a cross-site request:
    ``(loss, num_examples, metrics)`` (metrics without ``site-index``; no test split: ``xsite-n = 0``)."""
    if test is None or len(test) == 0:
        logger.warning("cross-site evaluation: this site has no local test split; it reports none.")
        return 0.0, 0, {f"{PREFIX}-n": 0.0, f"{PREFIX}-suppressed": 0.0}
    raw = config.get(THRESHOLD)
    threshold = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
    loss, result = cross_site_metrics(model, test, val=val, threshold=threshold, min_count=min_count, device=device)
    logger.info(
        "cross-site evaluation: %d test images, %d subgroup(s) reported, %d suppressed",
        result.n, len(result.subgroups), result.suppressed,
    )
    return loss, result.n, encode_metrics(result)
