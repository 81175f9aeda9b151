"""The server's evaluation chooses each round's threshold on validation data by the run's
``decision-threshold`` rule (Youden's J or accuracy), never on the test split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfed.server.evaluation import make_evaluate_fn
from medfed.shared.data.base import ImageSet
from medfed.shared.metrics import choose_threshold
from medfed.shared.weights import get_weights


class _Brightness(nn.Module):
    """Logits (B, 2) from the mean intensity (one weight, so the evaluate_fn can set it)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.scale * (x.flatten(1).mean(dim=1) - 0.5)
        return torch.stack([-m, m], dim=1)


def _set(rng: np.random.Generator, n: int) -> ImageSet:
    labels = (rng.random(n) < 0.15).astype(np.int64)
    b = np.clip(0.45 + 0.1 * rng.standard_normal(n) + 0.3 * labels * (rng.random(n) < 0.3), 0, 1).astype(np.float32)
    return ImageSet(np.repeat(b[:, None, None, None], 4, axis=2).repeat(4, axis=3), labels, "classification", 2)


@pytest.mark.parametrize("rule", ["youden", "accuracy"])
def test_the_round_threshold_follows_the_rule_on_validation(rule: str) -> None:
    rng = np.random.default_rng(0)
    val, test = _set(rng, 300), _set(rng, 600)
    model = _Brightness()
    evaluate = make_evaluate_fn(model, test, val=val, device="cpu", threshold_rule=rule)
    _, metrics = evaluate(1, get_weights(model), {})
    with torch.no_grad():
        scores = torch.softmax(model(torch.as_tensor(val.images)), dim=1)[:, 1]
    assert metrics["threshold"] == pytest.approx(choose_threshold(scores, torch.as_tensor(val.targets), rule=rule))
    if rule == "accuracy":
        assert metrics["decision-accuracy"] >= metrics["majority-rate"]
