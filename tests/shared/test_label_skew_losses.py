"""Label-skew corrections (``loss``): balanced softmax (Ren et al. 2020) and FedLC (Zhang et al.
2022) equal their hand-computed values and push the minority class's logit up harder than
plain cross-entropy does."""

from __future__ import annotations

import math

import pytest
import torch

from medfed.shared.training import LogitAdjustedLoss, make_loss

COUNTS = [90.0, 10.0]
LOGITS = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
TARGETS = torch.tensor([1, 0])


def _ce(adjusted: list[list[float]], targets: list[int]) -> float:
    total = 0.0
    for row, t in zip(adjusted, targets, strict=True):
        total += -row[t] + math.log(sum(math.exp(v) for v in row))
    return total / len(targets)


@pytest.mark.parametrize(
    ("name", "offset"),
    [
        ("balanced-softmax", [math.log(0.9), math.log(0.1)]),
        ("fedlc", [-0.5 * 90.0 ** -0.25, -0.5 * 10.0 ** -0.25]),
    ],
)
def test_the_loss_equals_the_hand_computed_value(name: str, offset: list[float]) -> None:
    loss = make_loss("classification", name=name, counts=COUNTS, tau=0.5)
    adjusted = [[float(v) + o for v, o in zip(row, offset, strict=True)] for row in LOGITS]
    assert float(loss(LOGITS, TARGETS)) == pytest.approx(_ce(adjusted, TARGETS.tolist()), rel=1e-6)


@pytest.mark.parametrize("name", ["balanced-softmax", "fedlc"])
def test_a_minority_example_pushes_its_logit_up_harder_than_plain_ce(name: str) -> None:
    logits = torch.zeros(1, 2, requires_grad=True)
    make_loss("classification", name=name, counts=COUNTS)(logits, torch.tensor([1])).backward()
    adjusted_grad = logits.grad[0, 1].item()
    plain = torch.zeros(1, 2, requires_grad=True)
    make_loss("classification")(plain, torch.tensor([1])).backward()
    assert adjusted_grad < plain.grad[0, 1].item() < 0  # descent raises the minority logit more
    # and a majority example pushes its own logit up less than plain CE does
    logits.grad = None
    plain.grad = None
    make_loss("classification", name=name, counts=COUNTS)(logits, torch.tensor([0])).backward()
    make_loss("classification")(plain, torch.tensor([0])).backward()
    assert plain.grad[0, 0].item() < logits.grad[0, 0].item() < 0


def test_a_class_the_site_never_saw_gets_a_finite_offset() -> None:
    loss = LogitAdjustedLoss(name="balanced-softmax", counts=[0, 50])
    assert torch.isfinite(loss.offset).all()
    assert float(loss(LOGITS, TARGETS)) == pytest.approx(
        _ce([[float(v) + o for v, o in zip(row, [math.log(1 / 51), math.log(50 / 51)], strict=True)] for row in LOGITS],
            TARGETS.tolist()), rel=1e-6,
    )


def test_segmentation_refuses_a_label_skew_loss_and_counts_are_required() -> None:
    with pytest.raises(ValueError, match="segmentation"):
        make_loss("segmentation", name="fedlc", counts=COUNTS)
    with pytest.raises(ValueError, match="class counts"):
        make_loss("classification", name="balanced-softmax")
