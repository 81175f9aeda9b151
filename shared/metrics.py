"""Evaluation metrics, computed with MONAI."""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric, compute_roc_auc
from monai.networks.utils import one_hot

__all__ = ["classification_metrics", "segmentation_metrics"]


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, *, num_classes: int
) -> dict[str, float]:
    """Accuracy and ROC AUC.

    Parameters
    ----------
    logits
        ``(N, K)`` raw scores.
    targets
        ``(N,)`` integer labels in ``[0, K)``.

    Returns
    -------
    dict
        ``accuracy``; ``auc`` (binary: AUC of the class-1 probability; more classes: macro
        one-vs-rest), omitted when ``targets`` holds a single class, where it is undefined.
    """
    probs = torch.softmax(logits.float(), dim=1)
    metrics = {"accuracy": float((probs.argmax(dim=1) == targets).float().mean())}
    if torch.unique(targets).numel() > 1:
        if num_classes == 2:
            auc = compute_roc_auc(probs[:, 1], targets)
        else:
            auc = compute_roc_auc(probs, one_hot(targets[:, None], num_classes), average="macro")
        metrics["auc"] = float(auc)
    return metrics


def segmentation_metrics(
    logits: torch.Tensor, targets: torch.Tensor, *, num_classes: int
) -> dict[str, float]:
    """Mean foreground Dice.

    Parameters
    ----------
    logits
        ``(N, K, *spatial)`` raw scores.
    targets
        ``(N, 1, *spatial)`` integer masks in ``[0, K)``.

    Returns
    -------
    dict
        ``dice``: Dice of the argmax prediction per foreground class, averaged over images
        and classes (an image with empty ground truth and empty prediction counts as 1).
    """
    pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
    truth = one_hot(targets, num_classes)
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    return {"dice": float(metric(pred, truth).nanmean())}
