"""The clinician's figures: balanced accuracy, sensitivity and specificity at a threshold chosen on
validation data (never on test), the majority rate and the single-class flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfed.shared.data.base import ImageSet
from medfed.shared.metrics import accuracy_threshold, choose_threshold, classification_metrics, youden_threshold
from medfed.shared.training import evaluate_at_validation_threshold

CPU = torch.device("cpu")


def _binary_logits(p1: list[float]) -> torch.Tensor:
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.log(torch.stack([1 - p, p], dim=1))


@pytest.mark.parametrize(
    ("p1", "targets", "threshold", "expected"),
    [
        # 0.5: predictions 1 1 0 0 1 -> TP 2, FN 0, TN 2, FP 1
        ([0.9, 0.8, 0.3, 0.2, 0.6], [1, 1, 0, 0, 0], None,
         {"sensitivity": 1.0, "specificity": 2 / 3, "balanced-accuracy": 5 / 6, "majority-rate": 0.6,
          "predicted-classes": 2, "threshold": 0.5, "accuracy": 0.8}),
        # 0.7: predictions 1 1 0 0 0 (accuracy stays the argmax one)
        ([0.9, 0.8, 0.3, 0.2, 0.6], [1, 1, 0, 0, 0], 0.7,
         {"sensitivity": 1.0, "specificity": 1.0, "balanced-accuracy": 1.0, "threshold": 0.7, "accuracy": 0.8}),
        # 0.85: predictions 1 0 0 0 0 -> sensitivity 1/2
        ([0.9, 0.8, 0.3, 0.2, 0.6], [1, 1, 0, 0, 0], 0.85,
         {"sensitivity": 0.5, "specificity": 1.0, "balanced-accuracy": 0.75}),
        # a constant predictor: accuracy = majority rate, balanced accuracy 0.5, one class predicted
        ([0.1, 0.2, 0.3, 0.1], [0, 0, 0, 1], None,
         {"accuracy": 0.75, "majority-rate": 0.75, "balanced-accuracy": 0.5, "sensitivity": 0.0,
          "specificity": 1.0, "predicted-classes": 1}),
    ],
)  # fmt: skip
def test_binary_figures_by_hand(p1, targets, threshold, expected) -> None:
    got = classification_metrics(_binary_logits(p1), torch.tensor(targets), num_classes=2, threshold=threshold)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name


def test_multiclass_is_one_vs_rest_at_the_argmax() -> None:
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    logits = torch.nn.functional.one_hot(predicted, 3).double() * 5
    got = classification_metrics(logits, targets, num_classes=3)
    recalls = [1 / 2, 1.0, 1 / 2]
    # specificity of c: of the samples not c, the share not predicted c
    specificities = [3 / 4, 3 / 4, 1.0]
    assert got["balanced-accuracy"] == pytest.approx(np.mean(recalls))
    assert got["sensitivity"] == pytest.approx(np.mean(recalls))
    assert got["specificity"] == pytest.approx(np.mean(specificities))
    assert got["predicted-classes"] == 3 and got["majority-rate"] == pytest.approx(1 / 3)
    assert "threshold" not in got and 0.0 < got["auc"] <= 1.0


@pytest.mark.parametrize(
    ("scores", "targets", "expected"),
    [
        ([0.1, 0.2, 0.6, 0.7], [0, 0, 1, 1], 0.4),  # separable: halfway between the classes
        ([0.1, 0.3, 0.35, 0.8, 0.9], [0, 0, 1, 0, 1], 0.325),  # J = 1/2 + 2/3 - 1 at 0.35 (and 0.9); lower wins
        ([0.4, 0.5], [1, 1], 0.5),  # one class: undefined, 0.5
    ],
)
def test_youden_threshold(scores, targets, expected) -> None:
    assert youden_threshold(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(expected)


class _Brightness(nn.Module):
    """Logits (B, 2) from the mean intensity: brighter images score higher for class 1."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(8.0))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.scale * (x.flatten(1).mean(dim=1) - 0.5) + self.bias
        return torch.stack([-m, m], dim=1)


def _set(brightness: np.ndarray, labels: np.ndarray) -> ImageSet:
    images = np.repeat(brightness.astype(np.float32)[:, None, None, None], 4, axis=2).repeat(4, axis=3)
    return ImageSet(images, labels.astype(np.int64), "classification", 2)


def test_the_threshold_is_chosen_on_validation_and_test_labels_do_not_move_it() -> None:
    rng = np.random.default_rng(0)
    val = _set(rng.random(40), (rng.random(40) > 0.5).astype(int))
    test_x = rng.random(30)
    test = _set(test_x, (test_x > 0.5).astype(int))
    flipped = _set(test_x, 1 - test.targets)
    model = _Brightness()
    a = evaluate_at_validation_threshold(model, test, val=val, device=CPU)
    b = evaluate_at_validation_threshold(model, flipped, val=val, device=CPU)
    assert a["threshold"] == b["threshold"]  # the test labels never choose it
    assert a["sensitivity"] != b["sensitivity"]  # but they are what is scored
    # the validation labels do choose it: a validation split whose positives are the dark images
    val_x = rng.random(40)
    dark = evaluate_at_validation_threshold(model, test, val=_set(val_x, (val_x < 0.3).astype(int)), device=CPU)
    assert dark["threshold"] != a["threshold"]
    expected = youden_threshold(torch.sigmoid(2 * model(torch.from_numpy(val.images)))[:, 1].detach(),
                                torch.from_numpy(val.targets))
    assert a["threshold"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("scale", "bias", "flagged"),
    [
        (8.0, 0.0, 0.0),  # informative, both classes predicted
        (0.0, 3.0, 1.0),  # constant: every sample class 1
        (0.0, -3.0, 1.0),  # constant: every sample class 0
        (8.0, -40.0, 1.0),  # ranks well (a validation threshold would split it) but its argmax is always 0
    ],
)
def test_a_model_that_predicts_one_class_is_flagged(scale: float, bias: float, flagged: float) -> None:
    rng = np.random.default_rng(1)
    x = rng.random(40)
    data = _set(x, (x > 0.5).astype(int))
    model = _Brightness(bias)
    with torch.no_grad():
        model.scale.fill_(scale)
    got = evaluate_at_validation_threshold(model, data, val=data, device=CPU)
    assert got["single-class"] == flagged
    if scale == 0.0:  # a constant predictor's accuracy is a class's rate
        assert got["accuracy"] in (pytest.approx(got["majority-rate"]), pytest.approx(1 - got["majority-rate"]))
        assert got["predicted-classes"] == 1 and got["balanced-accuracy"] == 0.5


def test_multiclass_auc_is_the_macro_over_the_classes_present() -> None:
    from monai.metrics import compute_roc_auc
    from monai.networks.utils import one_hot

    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 4, generator=rng)
    full = torch.arange(60) % 4
    everything = classification_metrics(logits, full, num_classes=4)["auc"]
    assert everything == pytest.approx(float(compute_roc_auc(torch.softmax(logits, 1), one_hot(full[:, None], 4))))
    lacking = full.clone()
    lacking[lacking == 3] = 0  # a site's split without class 3: MONAI's macro would be NaN
    got = classification_metrics(logits, lacking, num_classes=4)["auc"]
    probs = torch.softmax(logits, 1)
    expected = np.mean([float(compute_roc_auc(probs[:, c], (lacking == c).long())) for c in range(3)])
    assert got == pytest.approx(expected) and np.isfinite(got)


@pytest.mark.parametrize(
    ("scores", "targets", "expected"),
    [
        ([0.1, 0.2, 0.6, 0.7], [0, 0, 1, 1], 0.4),  # separable: halfway between the classes
        # 4 of 5 negative, the positive ranked below two negatives: any cut calling it positive costs
        # accuracy, so the best is "all negative" (4/5 correct), the cut above every score
        ([0.1, 0.2, 0.5, 0.6, 0.4], [0, 0, 0, 0, 1], 0.8),
        # ties of accuracy (3/4 at 0.05 and at 0.5) go to the cut nearest 0.5
        ([0.1, 0.2, 0.8, 0.9], [1, 0, 1, 1], 0.5),
        ([0.4, 0.5], [1, 1], 0.5),  # one class: 0.5
    ],
)  # fmt: skip
def test_accuracy_threshold(scores, targets, expected) -> None:
    assert accuracy_threshold(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(expected)


def test_the_two_rules_differ_where_youden_trades_accuracy_for_the_minority() -> None:
    scores, targets = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.4]), torch.tensor([0, 0, 0, 0, 1])
    # Youden: J = 1 + 2/4 - 1 at 0.3 (accuracy 3/5); accuracy: all negative (4/5)
    assert choose_threshold(scores, targets, rule="youden") == pytest.approx(youden_threshold(scores, targets))
    assert choose_threshold(scores, targets, rule="youden") == pytest.approx(0.3)
    assert choose_threshold(scores, targets, rule="accuracy") == pytest.approx(0.8)
    with pytest.raises(ValueError, match="decision-threshold = 'f1'.*'youden', 'accuracy'"):
        choose_threshold(scores, targets, rule="f1")


def test_an_accuracy_threshold_beats_the_majority_rate_where_youden_does_not() -> None:
    """A weak ranker on a 15%-minority set (as a DP model on VesselMNIST3D; test AUC about 0.62,
    30% of the minority bright, the rest like the majority): Youden's J calls many majority samples
    minority and falls below the majority rate on test; the accuracy rule, chosen on validation,
    calls the minority only where the ranker is sure and beats the majority rate."""
    rng = np.random.default_rng(0)

    def split(n: int) -> ImageSet:
        labels = (rng.random(n) < 0.15).astype(int)
        brightness = np.clip(0.45 + 0.1 * rng.standard_normal(n) + 0.3 * labels * (rng.random(n) < 0.3), 0, 1)
        return _set(brightness, labels)

    val, test, model = split(400), split(2000), _Brightness()
    youden = evaluate_at_validation_threshold(model, test, val=val, device=CPU, threshold_rule="youden")
    accurate = evaluate_at_validation_threshold(model, test, val=val, device=CPU, threshold_rule="accuracy")
    assert youden["decision-accuracy"] < youden["majority-rate"]
    assert accurate["decision-accuracy"] > accurate["majority-rate"] + 0.02
    assert accurate["predicted-classes"] == 2 and accurate["threshold"] > youden["threshold"]
    assert accurate["accuracy"] == youden["accuracy"]  # the argmax figure does not depend on the rule
