"""Reliability bins, ECE, MCE and Brier score, on cases whose answers are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medfed.shared.calibration import calibration


def _binary(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([torch.log1p(-p.clamp(max=1 - 1e-12)), torch.log(p.clamp(min=1e-12))], dim=1)


@pytest.mark.parametrize(
    ("probs", "labels", "ece", "mce", "brier"),
    [
        # calibrated: a quarter of the 0.25s and three quarters of the 0.75s are positive
        ([0.25] * 8 + [0.75] * 8, [1, 1] + [0] * 6 + [1] * 6 + [0, 0], 0.0, 0.0, 0.1875),
        # over-confident: always 0.95, half positive
        ([0.95] * 4, [1, 0, 1, 0], 0.45, 0.45, (0.05**2 + 0.95**2) / 2),
        # two bins, one off by 0.3 (half the samples), one exact
        ([0.15] * 2 + [0.55] * 2, [0, 0, 1, 1], 0.5 * 0.15 + 0.5 * 0.45, 0.45, (2 * 0.15**2 + 2 * 0.45**2) / 4),
    ],
    ids=["calibrated", "over-confident", "two bins"],
)
def test_binary_calibration(probs, labels, ece, mce, brier) -> None:
    result = calibration(_binary(probs), torch.tensor(labels))
    assert result.kind == "class-1 probability"
    assert result.ece == pytest.approx(ece, abs=1e-9)
    assert result.mce == pytest.approx(mce, abs=1e-9)
    assert result.brier == pytest.approx(brier, abs=1e-9)
    assert sum(result.counts) == result.num_examples == len(probs)


def test_multiclass_uses_the_top_label_confidence() -> None:
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]], dtype=torch.float64)
    result = calibration(probs.log(), torch.tensor([0, 1, 0, 2]))  # two of four top labels right
    assert result.kind == "top-label confidence"
    assert result.counts[8] == 4 and result.confidence[8] == pytest.approx(0.8)
    assert result.observed[8] == pytest.approx(0.5) and result.ece == pytest.approx(0.3)
    expected_brier = (2 * (0.2**2 + 0.01 + 0.01) + 2 * (0.64 + 0.81 + 0.01)) / 4
    assert result.brier == pytest.approx(expected_brier)


def test_the_edges_fall_in_the_first_and_last_bins_and_empty_bins_are_nan() -> None:
    result = calibration(_binary([0.0, 1.0]), torch.tensor([0, 1]), num_bins=4)
    assert result.edges == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result.counts == [1, 0, 0, 1]
    assert math.isnan(result.confidence[1]) and math.isnan(result.observed[2])
    assert result.ece == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("logits", "targets", "bins", "message"),
    [
        (torch.zeros(3), torch.zeros(3), 10, "shape"),
        (torch.zeros(3, 1), torch.zeros(3), 10, "K >= 2"),
        (torch.zeros(3, 2), torch.zeros(2), 10, "3 predictions but 2 targets"),
        (torch.zeros(0, 2), torch.zeros(0), 10, "> 0"),
        (torch.zeros(3, 2), torch.zeros(3), 0, "num_bins"),
    ],
)
def test_bad_inputs_are_refused(logits, targets, bins, message) -> None:
    with pytest.raises(ValueError, match=message):
        calibration(logits, targets, num_bins=bins)
