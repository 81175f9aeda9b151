"""Detection metrics: COCO-style mean average precision per class, computed with MONAI
(``monai.apps.detection.metrics``: ``matching_batch`` and ``COCOMetric``).

``map50`` is the average precision at IoU 0.5 averaged over the classes; ``map50-95`` averages
it over the IoU thresholds 0.50, 0.55, ..., 0.95 as COCO does. Average precision is COCO's
101-point interpolated area under the precision-recall curve (precision made monotone, read at
recall 0, 0.01, ..., 1), over at most 100 detections per image. A class with no ground-truth box
in the evaluated images has no AP: it is left out of the means (and its per-class keys are
absent); predictions of such a class are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

__all__ = ["detection_metrics", "class_key"]

MAX_DETECTIONS: int = 100


def class_key(name: str) -> str:
    """A class name as it appears in metric keys (lower case, spaces and ``_`` as ``-``)."""
    return "".join(c if c.isalnum() else "-" for c in name.strip().lower())


def detection_metrics(
    predictions: Sequence[dict[str, np.ndarray]],
    targets: Sequence[np.ndarray],
    *,
    class_names: Sequence[str],
) -> dict[str, float]:
    """mAP at IoU 0.5 and 0.5:0.95, overall and per class.

    Parameters
    ----------
    predictions
        Per image ``{"boxes": (P, 4), "scores": (P,), "labels": (P,)}``, boxes
        ``[xmin, ymin, xmax, ymax]``.
    targets
        Per image ``(M, 5)`` ``[xmin, ymin, xmax, ymax, label]``.
    class_names
        Names of the ``K`` classes (labels are indices into it).

    Returns
    -------
    dict
        ``map50``, ``map50-95``, and per class ``map50-<name>``, ``map50-95-<name>``
        (:func:`class_key`), plus ``detections`` (mean predicted boxes per image). ``map50`` and
        ``map50-95`` are 0 when no image has a box.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets: they must match.")
    names = [str(n) for n in class_names]
    present = sorted({int(c) for t in targets for c in np.asarray(t)[:, 4]}) if targets else []
    out: dict[str, float] = {
        "detections": float(np.mean([len(p["boxes"]) for p in predictions])) if predictions else 0.0
    }
    if not present:
        return {**out, "map50": 0.0, "map50-95": 0.0}
    # MONAI's COCOMetric averages over every class it is given; map labels so only classes with
    # ground truth take part (predictions of other classes cannot be true positives).
    remap = {c: i for i, c in enumerate(present)}

    def keep(labels: np.ndarray) -> np.ndarray:
        return np.isin(labels.astype(np.int64), present)

    pred_boxes, pred_classes, pred_scores, gt_boxes, gt_classes = [], [], [], [], []
    for pred, target in zip(predictions, targets, strict=True):
        mask = keep(np.asarray(pred["labels"]))
        pred_boxes.append(np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)[mask])
        pred_classes.append(np.array([remap[int(c)] for c in np.asarray(pred["labels"])[mask]], dtype=np.int64))
        pred_scores.append(np.asarray(pred["scores"], dtype=np.float64)[mask])
        t = np.asarray(target, dtype=np.float64).reshape(-1, 5)
        gt_boxes.append(t[:, :4])
        gt_classes.append(np.array([remap[int(c)] for c in t[:, 4]], dtype=np.int64))
    metric = COCOMetric(
        classes=[class_key(names[c]) for c in present],
        iou_list=(0.5,),
        iou_range=(0.5, 0.95, 0.05),
        max_detection=(MAX_DETECTIONS,),
        per_class=True,
    )
    matched = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=pred_boxes,
        pred_classes=pred_classes,
        pred_scores=pred_scores,
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        max_detections=MAX_DETECTIONS,
    )
    raw = metric(matched)[0]
    suffix = f"MaxDet_{MAX_DETECTIONS}"
    out["map50"] = float(raw[f"AP_IoU_0.50_{suffix}"])
    out["map50-95"] = float(raw[f"mAP_IoU_0.50_0.95_0.05_{suffix}"])
    for c in present:
        key = class_key(names[c])
        out[f"map50-{key}"] = float(raw[f"{key}_AP_IoU_0.50_{suffix}"])
        out[f"map50-95-{key}"] = float(raw[f"{key}_mAP_IoU_0.50_0.95_0.05_{suffix}"])
    return out
