"""The RetinaNet detector: forward, a training step, DP-SGD per image, and its predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.shared.detection import DetectionLoss, collate_detection, predict_boxes
from medfed.shared.models import MODELS, build_model, model_task, validate_for_dp

SIDE = 64


def _model(norm: str = "group", classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("retinanet", spatial_dims=2, in_channels=3, out_channels=classes, norm=norm, image_size=SIDE)


def _batch() -> tuple[torch.Tensor, list[torch.Tensor]]:
    images = torch.rand((3, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(0))
    boxes = [
        torch.tensor([[4.0, 8.0, 20.0, 24.0, 0.0], [30.0, 30.0, 60.0, 40.0, 1.0]]),
        torch.zeros((0, 5)),  # an image without objects
        torch.tensor([[10.0, 40.0, 26.0, 56.0, 0.0]]),
    ]
    return images, boxes


def test_registered_as_a_detection_model() -> None:
    assert model_task("retinanet") == "detection"
    assert "retinanet" in MODELS and "RetinaNet" in MODELS["retinanet"].description


def test_forward_shapes_and_predictions() -> None:
    model = _model()
    images, _ = _batch()
    out = model(images)
    anchors = out["anchors"].shape[0]
    # strides 8, 16, 32 at 64 px: 8x8 + 4x4 + 2x2 positions, 2 anchors each
    assert out["locs_per_level"] == [64, 16, 4] and anchors == 2 * 84
    assert out["classification"].shape == (3, anchors, 2) and out["box_regression"].shape == (3, anchors, 4)
    model.eval()
    predictions = predict_boxes(model(images))
    assert len(predictions) == 3
    for p in predictions:
        assert p["boxes"].shape[1] == 4 and len(p["boxes"]) == len(p["scores"]) == len(p["labels"]) <= 100


@pytest.mark.parametrize(("image_size", "fragment"), [(48, "--image-size 64"), (None, "set image-size")])
def test_image_size_checked(image_size: int | None, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        build_model("retinanet", spatial_dims=2, in_channels=3, out_channels=2, image_size=image_size)


def test_training_step_learns_the_batch() -> None:
    model = _model(norm="batch")
    images, boxes = _batch()
    loss_fn = DetectionLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        torch.manual_seed(1)  # the hard-negative sampler draws from the global generator
        optimizer.zero_grad()
        loss = loss_fn(model(images), boxes)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_loss_is_a_mean_of_per_image_losses() -> None:
    """One image's loss term does not depend on the other images in its batch (what per-sample
    clipping needs): the batch loss equals the mean of the images' losses taken alone."""
    model = _model().eval()
    images, boxes = _batch()
    loss_fn = DetectionLoss()
    with torch.no_grad():
        out = model(images)
        torch.manual_seed(3)
        batch = float(loss_fn(out, boxes))
        torch.manual_seed(3)
        alone = []
        for i in range(3):  # same draws, in the same order, as in the batch
            single = {**out, "classification": out["classification"][i : i + 1], "box_regression": out["box_regression"][i : i + 1]}
            alone.append(float(loss_fn(single, [boxes[i]])))
    assert batch == pytest.approx(np.mean(alone), rel=1e-6)


def test_opacus_per_sample_gradients_are_per_image() -> None:
    """A real Opacus DP-SGD step (hooks): the first image's per-sample gradient is the gradient of
    its own loss, whatever the other images hold; the step clips, noises and changes the weights."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = _model(norm="group")
    validate_for_dp(model)
    images, boxes = _batch()
    gsm = GradSampleModule(model)
    loss_fn = DetectionLoss()
    per_sample = []
    for other in (boxes[2], torch.tensor([[1.0, 1.0, 60.0, 60.0, 1.0]])):
        gsm.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss_fn(gsm(images[[0, 2]]), [boxes[0], other]).backward()
        per_sample.append([p.grad_sample[0].clone() for p in gsm.parameters() if p.requires_grad])
        for p in gsm.parameters():
            p.grad_sample = None
    for a, b in zip(*per_sample, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # ... and equals the gradient of the first image's loss alone (Opacus scales by the batch size)
    alone = _model(norm="group")
    alone.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    loss_fn(alone(images[[0]]), [boxes[0]]).backward()
    for a, p in zip(per_sample[0], [p for p in alone.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-5)

    before = [p.detach().clone() for p in model.parameters()]
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=3
    )
    optimizer.zero_grad()
    torch.manual_seed(0)
    loss_fn(gsm(images), boxes).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_collate_keeps_boxes_per_image() -> None:
    images, boxes = _batch()
    stacked, targets = collate_detection(list(zip(images, boxes, strict=True)))
    assert stacked.shape == (3, 3, SIDE, SIDE) and [t.shape[0] for t in targets] == [2, 0, 1]
