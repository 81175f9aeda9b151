"""mAP per class (MONAI's COCO metric) against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.shared.detection_metrics import class_key, detection_metrics


def _pred(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, np.ndarray]:
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores, float), "labels": np.array(labels)}


def test_hand_computed_average_precision() -> None:
    """Class "a": 2 boxes in 2 images; detections by score: TP (IoU 1), FP, TP (IoU 100/110).

    Precision/recall after each: (1, 1/2), (1/2, 1/2), (2/3, 1). COCO's 101-point AP with
    monotone precision: recall 0..0.50 (51 points) at precision 1, 0.51..1 (50 points) at 2/3:
    AP50 = (51 + 50 * 2/3) / 101. At IoU thresholds above 100/110 = 0.909 (only 0.95) the third
    detection is a false positive: AP = 51 / 101 there; mAP50:95 = (9 * AP50 + 51/101) / 10.
    Class "b" has a perfect detection; class "c" has no ground truth and is left out.
    """
    targets = [np.array([[0, 0, 10, 10, 0], [20, 20, 40, 40, 1]], float), np.array([[0, 0, 10, 10, 0]], float)]
    predictions = [
        _pred([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 40, 40], [0, 0, 5, 5]], [0.9, 0.8, 0.6, 0.99], [0, 0, 1, 2]),
        _pred([[0, 0, 10, 11]], [0.7], [0]),
    ]
    metrics = detection_metrics(predictions, targets, class_names=["a", "B", "c"])
    ap50_a = (51 + 50 * 2 / 3) / 101
    ap_a = (9 * ap50_a + 51 / 101) / 10
    assert metrics["map50-a"] == pytest.approx(ap50_a)
    assert metrics["map50-95-a"] == pytest.approx(ap_a)
    assert metrics["map50-b"] == pytest.approx(1.0) and metrics["map50-95-b"] == pytest.approx(1.0)
    assert metrics["map50"] == pytest.approx((ap50_a + 1) / 2)
    assert metrics["map50-95"] == pytest.approx((ap_a + 1) / 2)
    assert "map50-c" not in metrics
    assert metrics["detections"] == pytest.approx(2.5)


def test_missed_and_empty() -> None:
    targets = [np.array([[0, 0, 10, 10, 0]], float), np.zeros((0, 5))]
    none = [_pred([], [], []), _pred([], [], [])]
    assert detection_metrics(none, targets, class_names=["a"])["map50"] == 0.0
    empty = detection_metrics(none, [np.zeros((0, 5))] * 2, class_names=["a"])
    assert empty["map50"] == 0.0 and empty["map50-95"] == 0.0
    with pytest.raises(ValueError, match="must match"):
        detection_metrics(none, targets[:1], class_names=["a"])


@pytest.mark.parametrize(("name", "key"), [("RBC", "rbc"), ("White cell", "white-cell"), ("a_b", "a-b")])
def test_class_key(name: str, key: str) -> None:
    assert class_key(name) == key
