"""Calibration of a classifier's probabilities: reliability bins and the expected calibration error.

Pure torch. Binary models are judged on the class-1 probability (the score the decision threshold
is applied to); models with more classes on the top-label confidence (Guo et al., ICML 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Calibration", "calibration"]


@dataclass(frozen=True)
class Calibration:
    """Reliability bins of one model on one split.

    Attributes
    ----------
    kind
        ``"class-1 probability"`` (binary) or ``"top-label confidence"`` (more classes).
    edges
        ``num_bins + 1`` bin edges over ``[0, 1]`` (equal width).
    counts
        Samples per bin, ``(num_bins,)``.
    confidence
        Mean predicted probability per bin (``nan`` for an empty bin).
    observed
        Observed frequency per bin: binary, the share of class-1 samples; more classes, the
        accuracy of the top label (``nan`` for an empty bin).
    ece
        Expected calibration error: ``sum_b n_b / N * |observed_b - confidence_b|``.
    mce
        Maximum calibration error over the non-empty bins.
    brier
        Brier score (binary: of the class-1 probability; more classes: the multi-class one,
        summed over classes, averaged over samples).
    num_examples
        ``N``.
    """

    kind: str
    edges: list[float]
    counts: list[int]
    confidence: list[float]
    observed: list[float]
    ece: float
    mce: float
    brier: float
    num_examples: int


def calibration(logits: torch.Tensor, targets: torch.Tensor, *, num_bins: int = 10) -> Calibration:
    """Reliability bins, ECE, MCE and Brier score of ``logits`` against ``targets``.

    Parameters
    ----------
    logits
        ``(N, K)`` raw scores, ``K >= 2``.
    targets
        ``(N,)`` integer labels in ``[0, K)``.
    num_bins
        Equal-width bins over ``[0, 1]``; the last bin includes 1.

    Raises
    ------
    ValueError
        If ``logits`` is not ``(N, K)`` with ``K >= 2``, ``N`` differs from ``len(targets)``, ``N``
        is 0, or ``num_bins < 1``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2; got {tuple(logits.shape)}.")
    if len(logits) != len(targets) or len(logits) == 0:
        raise ValueError(f"{len(logits)} predictions but {len(targets)} targets: both must be equal and > 0.")
    if num_bins < 1:
        raise ValueError(f"num_bins = {num_bins}: it must be >= 1.")
    probs = torch.softmax(logits.double(), dim=1)
    targets = targets.long().reshape(-1)
    if probs.shape[1] == 2:
        kind, score, hit = "class-1 probability", probs[:, 1], (targets == 1).double()
        brier = float(((score - hit) ** 2).mean())
    else:
        kind = "top-label confidence"
        score, predicted = probs.max(dim=1)
        hit = (predicted == targets).double()
        truth = torch.nn.functional.one_hot(targets, probs.shape[1]).double()
        brier = float(((probs - truth) ** 2).sum(dim=1).mean())
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    index = torch.clamp(torch.bucketize(score.contiguous(), edges[1:-1], right=True), 0, num_bins - 1)
    counts, confidence, observed = [], [], []
    ece = mce = 0.0
    n = len(score)
    for b in range(num_bins):
        mask = index == b
        count = int(mask.sum())
        counts.append(count)
        if count == 0:
            confidence.append(float("nan"))
            observed.append(float("nan"))
            continue
        conf, obs = float(score[mask].mean()), float(hit[mask].mean())
        confidence.append(conf)
        observed.append(obs)
        ece += count / n * abs(obs - conf)
        mce = max(mce, abs(obs - conf))
    return Calibration(
        kind=kind,
        edges=[float(e) for e in edges],
        counts=counts,
        confidence=confidence,
        observed=observed,
        ece=ece,
        mce=mce,
        brier=brier,
        num_examples=n,
    )
