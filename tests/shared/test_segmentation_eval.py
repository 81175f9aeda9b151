"""Per-class Dice, random training patches and sliding-window evaluation of segmentation models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfed.shared.data.base import ImageSet
from medfed.shared.metrics import segmentation_metrics
from medfed.shared.training import TrainSettings, evaluate, make_train_loader, predict


def _logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``pred`` ``(N, 1, H, W)``."""
    return torch.nn.functional.one_hot(pred[:, 0], num_classes).permute(0, 3, 1, 2).float()


def test_per_class_dice_on_a_hand_made_case() -> None:
    truth = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    truth[0, 0, :2, :2] = 1  # image 0: 4 pixels of class 1
    truth[1, 0, 2:, 2:] = 2  # image 1: 4 pixels of class 2; class 3 nowhere
    pred = truth.clone()
    pred[1, 0, 2:, 2] = 0  # 2 of class 2's pixels missed: Dice 2*2 / (2 + 4) = 2/3
    pred[0, 0, 3, 3] = 3  # a false class-3 pixel in image 0 (class 3 has no ground truth: no Dice)
    metrics = segmentation_metrics(_logits(pred, 4), truth, num_classes=4)
    # image 1 holds no class 1 and image 0 no class 2: each class is averaged over the images that hold it
    assert metrics == pytest.approx({"dice-class-1": 1.0, "dice-class-2": 2 / 3, "dice": (1.0 + 2 / 3) / 2})


@pytest.mark.parametrize(
    ("pred_value", "dice"), [(0, 1.0), (1, 0.0)]  # no foreground anywhere: empty prediction 1, any prediction 0
)
def test_dice_without_any_foreground(pred_value: int, dice: float) -> None:
    truth = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    metrics = segmentation_metrics(_logits(torch.full_like(truth, pred_value), 2), truth, num_classes=2)
    assert metrics == {"dice": dice}


def _seg_set(n: int, size: int, dims: int = 2) -> ImageSet:
    rng = np.random.default_rng(0)
    images = rng.random((n, 2, *(size,) * dims)).astype(np.float32)
    targets = (images[:, :1] > 0.7).astype(np.int64)
    return ImageSet(images, targets, "segmentation", 2)


def test_sliding_window_equals_the_direct_forward_on_an_image_the_size_of_the_window() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    data = _seg_set(3, 16)
    windowed, _, loss_w = predict(model, data, device=torch.device("cpu"), roi_size=16)
    direct, _, loss_d = predict(model, data, device=torch.device("cpu"), roi_size=0)
    torch.testing.assert_close(windowed, direct)
    assert loss_w == pytest.approx(loss_d)


def test_sliding_window_covers_a_larger_image_with_overlapping_windows() -> None:
    # A per-pixel model (1x1 convolution): every window gives each pixel the same logits, so the
    # averaged windows equal the direct forward exactly, while a 3D image 3x the window is covered.
    torch.manual_seed(0)
    model = nn.Conv3d(2, 2, 1)
    data = _seg_set(2, 24, dims=3)
    windowed, _, _ = predict(model, data, device=torch.device("cpu"), roi_size=8)
    direct, _, _ = predict(model, data, device=torch.device("cpu"))
    assert windowed.shape == (2, 2, 24, 24, 24)
    torch.testing.assert_close(windowed, direct)
    assert evaluate(model, data, device=torch.device("cpu"), roi_size=8)["dice"] == pytest.approx(
        evaluate(model, data, device=torch.device("cpu"))["dice"]
    )


@pytest.mark.parametrize("augment", [True, False])
def test_training_batches_are_random_patches_holding_foreground_half_the_time(augment: bool) -> None:
    images = np.zeros((8, 1, 32, 32), np.float32)
    targets = np.zeros((8, 1, 32, 32), np.int64)
    targets[:, 0, 2:6, 2:6] = 1  # a small corner object: a random crop would rarely hold it
    data = ImageSet(images, targets, "segmentation", 2)
    settings = TrainSettings(epochs=1, batch_size=8, learning_rate=0.1, augment=augment, seed=3, patch_size=8)
    batches = [next(iter(make_train_loader(data, settings.__class__(**{**settings.__dict__, "seed": s}))))
               for s in range(6)]  # fmt: skip
    assert all(b[0].shape == (8, 1, 8, 8) and b[1].shape == (8, 1, 8, 8) for b in batches)
    with_foreground = np.mean([float((t.flatten(1).amax(1) > 0).float().mean()) for _, t in batches])
    assert 0.3 < with_foreground < 0.8  # pos = neg = 1: about half the patches centre on foreground
