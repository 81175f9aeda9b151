"""Evaluation metrics, computed with MONAI."""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric, compute_roc_auc
from monai.networks.utils import one_hot

__all__ = [
    "THRESHOLD_RULES",
    "accuracy_threshold",
    "choose_threshold",
    "classification_metrics",
    "decision_metrics",
    "predicts_single_class",
    "segmentation_metrics",
    "youden_threshold",
]


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, *, num_classes: int, threshold: float | None = None
) -> dict[str, float]:
    """Accuracy, ROC AUC and the figures a clinician reads at a decision threshold.

    Parameters
    ----------
    logits
        ``(N, K)`` raw scores.
    targets
        ``(N,)`` integer labels in ``[0, K)``.
    num_classes
        ``K``.
    threshold
        Binary: the class-1 probability at or above which a sample is called positive
        (choose it on validation data: :func:`youden_threshold`); ``None``: 0.5. Ignored for
        more classes, where the prediction is the argmax.

    Returns
    -------
    dict
        ``accuracy`` (argmax); ``auc`` (binary: AUC of the class-1 probability; more classes:
        macro one-vs-rest over the classes present in ``targets``), omitted when ``targets``
        holds a single class, where it is undefined; at the threshold (binary) or argmax (more classes): ``balanced-accuracy``
        (the mean recall over the classes present), ``sensitivity`` and ``specificity``
        (binary: of class 1; more classes: macro means one-vs-rest over the classes with
        positives, respectively negatives; each omitted when undefined); ``threshold``
        (binary); ``majority-rate`` (the share of the most common class: the accuracy of a
        constant predictor) and ``predicted-classes`` (how many classes the model predicts at
        all: 1 flags a model that calls every sample the same class).
    """
    probs = torch.softmax(logits.float(), dim=1)
    targets = targets.long()
    metrics = {"accuracy": float((probs.argmax(dim=1) == targets).float().mean())}
    if torch.unique(targets).numel() > 1:
        if num_classes == 2:
            auc = float(compute_roc_auc(probs[:, 1], targets))
        else:
            # Macro one-vs-rest over the classes present (a site's split may lack a class, whose
            # one-vs-rest AUC is undefined; with every class present this is MONAI's "macro").
            truth = one_hot(targets[:, None], num_classes)
            present = [c for c in range(num_classes) if 0 < int(truth[:, c].sum()) < len(targets)]
            auc = sum(float(compute_roc_auc(probs[:, c], truth[:, c])) for c in present) / len(present)
        metrics["auc"] = auc
    if num_classes == 2:
        cut = 0.5 if threshold is None else float(threshold)
        predicted = (probs[:, 1] >= cut).long()
        metrics["threshold"] = cut
        metrics["decision-accuracy"] = float((predicted == targets).float().mean())
    else:
        predicted = probs.argmax(dim=1)
    metrics.update(decision_metrics(predicted, targets, num_classes=num_classes))
    return metrics


def decision_metrics(predicted: torch.Tensor, targets: torch.Tensor, *, num_classes: int) -> dict[str, float]:
    """Balanced accuracy, sensitivity, specificity, majority rate and predicted classes of hard predictions.

    Parameters
    ----------
    predicted, targets
        ``(N,)`` integer classes in ``[0, K)``.
    num_classes
        ``K``; for ``K = 2`` sensitivity and specificity are those of class 1 (the positive
        class), for more the macro means one-vs-rest.
    """
    n = max(len(targets), 1)
    present = [c for c in range(num_classes) if bool((targets == c).any())]
    recall = {c: float((predicted[targets == c] == c).float().mean()) for c in present}
    negatives = {c: targets != c for c in range(num_classes)}
    true_negative = {c: float((predicted[m] != c).float().mean()) for c, m in negatives.items() if bool(m.any())}
    out: dict[str, float] = {
        "majority-rate": float(torch.bincount(targets, minlength=num_classes).max()) / n,
        "predicted-classes": float(torch.unique(predicted).numel()),
    }
    if recall:
        out["balanced-accuracy"] = sum(recall.values()) / len(recall)
    if num_classes == 2:
        if 1 in recall:
            out["sensitivity"] = recall[1]
        if 1 in true_negative:
            out["specificity"] = true_negative[1]
    else:
        if recall:
            out["sensitivity"] = sum(recall.values()) / len(recall)
        if true_negative:
            out["specificity"] = sum(true_negative.values()) / len(true_negative)
    return out


def _scores_by_class(
    scores: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(candidates, positives, negatives)``: the distinct scores and each class's scores, all
    sorted ascending in float64 on the CPU; ``None`` when ``targets`` hold a single class."""
    scores = scores.detach().double().cpu()
    targets = targets.detach().long().cpu()
    pos, neg = torch.sort(scores[targets == 1]).values, torch.sort(scores[targets != 1]).values
    if len(pos) == 0 or len(neg) == 0:
        return None
    return torch.unique(scores), pos, neg


def youden_threshold(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The class-1 probability threshold that maximises Youden's J (sensitivity + specificity - 1).

    Choose it on validation data, never on the test split. A sample is positive when its score
    is at or above the threshold; the threshold lies halfway between the chosen score and the
    next lower one (ties of J go to the lower threshold: the more sensitive one).

    Parameters
    ----------
    scores
        ``(N,)`` class-1 probabilities.
    targets
        ``(N,)`` labels in ``{0, 1}``.

    Returns
    -------
    float
        The threshold; 0.5 when ``targets`` hold a single class (J is undefined).
    """
    split = _scores_by_class(scores, targets)
    if split is None:
        return 0.5
    candidates, pos, neg = split
    sensitivity = 1.0 - torch.searchsorted(pos, candidates, right=False).double() / len(pos)
    specificity = torch.searchsorted(neg, candidates, right=False).double() / len(neg)
    best = int(torch.argmax(sensitivity + specificity))  # the first (lowest) maximum
    if best == 0:
        return float(candidates[0]) / 2.0
    return float(candidates[best - 1] + candidates[best]) / 2.0


def accuracy_threshold(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The class-1 probability threshold that maximises accuracy on ``scores`` / ``targets``.

    Choose it on validation data, never on the test split. Where Youden's J
    (:func:`youden_threshold`) weighs both classes' recalls alike (it maximises balanced
    accuracy), this one weighs every sample alike, so on an imbalanced set it calls the minority
    class only where the model's ranking is sure enough to beat the majority rate (it returns a
    threshold that predicts the majority class everywhere when nothing does better). A sample is
    positive when its score is at or above the threshold; the threshold lies halfway between the
    chosen score and the next lower one (ties of accuracy go to the threshold nearest 0.5).

    Parameters
    ----------
    scores
        ``(N,)`` class-1 probabilities.
    targets
        ``(N,)`` labels in ``{0, 1}``.

    Returns
    -------
    float
        The threshold; 0.5 when ``targets`` hold a single class.
    """
    split = _scores_by_class(scores, targets)
    if split is None:
        return 0.5
    candidates, pos, neg = split  # threshold i calls scores >= candidates[i] positive
    true_pos = len(pos) - torch.searchsorted(pos, candidates, right=False).double()
    true_neg = torch.searchsorted(neg, candidates, right=False).double()
    # cuts between consecutive candidates, plus one below all (all positive) and one above all (all negative)
    cuts = torch.cat([
        candidates[:1] / 2.0,
        (candidates[:-1] + candidates[1:]) / 2.0,
        (candidates[-1:] + 1.0) / 2.0,
    ])
    correct = torch.cat([true_pos + true_neg, torch.tensor([float(len(neg))], dtype=torch.float64)])
    best = correct == correct.max()
    distance = torch.where(best, (cuts - 0.5).abs(), torch.full_like(cuts, float("inf")))
    return float(cuts[int(torch.argmin(distance))])


THRESHOLD_RULES = {"youden": youden_threshold, "accuracy": accuracy_threshold}
"""How a binary model's decision threshold is chosen on validation data (run-config key
``decision-threshold``): ``"youden"`` maximises Youden's J (balanced accuracy), ``"accuracy"``
maximises accuracy."""


def choose_threshold(scores: torch.Tensor, targets: torch.Tensor, *, rule: str = "youden") -> float:
    """The decision threshold of ``rule`` (:data:`THRESHOLD_RULES`) on validation ``scores`` ``(N,)``
    and ``targets`` ``(N,)``.

    Raises
    ------
    ValueError
        ``rule`` is not one of :data:`THRESHOLD_RULES` (naming the valid ones).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"decision-threshold = {rule!r} is invalid. Valid choices: "
                         f"{', '.join(repr(r) for r in THRESHOLD_RULES)}.")
    return THRESHOLD_RULES[rule](scores, targets)


def predicts_single_class(global_metrics: dict[str, float], site_metrics: dict[str, float] | None = None) -> bool:
    """Whether a round's global model predicts a single class (the figures say so).

    Parameters
    ----------
    global_metrics
        The server's evaluation (``single-class``, else ``predicted-classes``).
    site_metrics
        The sites' aggregated validation metrics: ``predicted-classes-max = 1`` means every
        site saw its validation split called one class.
    """
    if global_metrics.get("single-class", 0.0) >= 1.0 or global_metrics.get("predicted-classes", 2.0) == 1.0:
        return True
    return bool(site_metrics) and site_metrics.get("predicted-classes-max", 2.0) == 1.0  # type: ignore[union-attr]


def segmentation_metrics(
    logits: torch.Tensor, targets: torch.Tensor, *, num_classes: int
) -> dict[str, float]:
    """Dice per foreground class and their mean (MONAI ``DiceMetric``).

    Parameters
    ----------
    logits
        ``(N, K, *spatial)`` raw scores.
    targets
        ``(N, 1, *spatial)`` integer masks in ``[0, K)``.

    Returns
    -------
    dict
        ``dice-class-k`` for each foreground class ``k`` (``1..K-1``) present in ``targets``:
        the Dice of the argmax prediction, averaged over the images whose ground truth holds
        class ``k`` (``DiceMetric(include_background=False, reduction="mean_batch",
        ignore_empty=True)``); a class absent from every image is left out (its Dice is
        undefined, and a prediction of it shows in the other classes). ``dice``: the mean of
        the ``dice-class-k`` given. With no foreground in any image, ``dice`` is 1.0 when
        nothing is predicted either, else 0.0 (``ignore_empty=False``).
    """
    pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
    truth = one_hot(targets.long(), num_classes)
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
    metric(pred, truth)
    per_class, images = metric.aggregate()  # (K - 1,) each; images = 0: no ground truth of the class
    out = {
        f"dice-class-{k}": float(v)
        for k, (v, n) in enumerate(zip(per_class.tolist(), images.tolist(), strict=True), start=1)
        if n > 0
    }
    if out:
        out["dice"] = sum(out.values()) / len(out)
    else:
        empty = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
        out["dice"] = float(empty(pred, truth).nanmean())
    return out
