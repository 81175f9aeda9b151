"""The pooled baseline trains with the sites' loss (``training_criterion``), so a federated/pooled
ratio compares training regimes, not losses (issue 14: the study's pooled rows trained plain
cross-entropy while the sites trained balanced softmax)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import medfed.simulations.pooled as pooled_module
from medfed.shared.config import RunConfig
from medfed.shared.data.base import ImageSet
from medfed.shared.data.loading import load_dataset
from medfed.shared.partition import training_pool
from medfed.shared.task import training_criterion
from medfed.shared.training import LogitAdjustedLoss

SKEWED = ImageSet(
    images=np.zeros((40, 1, 4, 4), np.float32), targets=np.array([0] * 30 + [1] * 10, np.int64),
    task="classification", num_classes=2,
)


@pytest.mark.parametrize(
    ("changes", "kind", "offset"),
    [
        ({}, LogitAdjustedLoss, [math.log(0.75), math.log(0.25)]),  # loss = auto: balanced softmax
        ({"loss": "balanced-softmax"}, LogitAdjustedLoss, [math.log(0.75), math.log(0.25)]),
        ({"loss": "fedlc", "fedlc_tau": 0.5}, LogitAdjustedLoss, [-0.5 * 30 ** -0.25, -0.5 * 10 ** -0.25]),
        ({"loss": "ce"}, nn.CrossEntropyLoss, None),
        ({"dp": True}, nn.CrossEntropyLoss, None),  # auto under DP-SGD: the counts are not private
    ],
)
def test_training_criterion_takes_the_prior_from_the_data_it_trains_on(
    changes: dict[str, Any], kind: type, offset: list[float] | None
) -> None:
    criterion = training_criterion(RunConfig(**changes), SKEWED)  # type: ignore[arg-type]
    assert type(criterion) is kind
    if offset is not None:
        torch.testing.assert_close(criterion.offset, torch.tensor(offset))


@pytest.mark.parametrize("loss", ["auto", "ce"])
def test_the_pooled_baseline_trains_with_the_sites_loss_over_the_pooled_counts(
    loss: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RunConfig(dataset="synthetic", synthetic_samples=64, image_size=12, model="simplecnn", num_sites=2,
                    num_server_rounds=2, local_epochs=1, batch_size=16, run_dir=str(tmp_path / "runs"),
                    store="off", cross_site=False, personalize="off", augment=False, loss=loss)  # type: ignore[arg-type]
    seen: list[Any] = []
    real = pooled_module.train_epochs

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("criterion"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pooled_module, "train_epochs", spy)
    pooled_module.run_pooled(cfg)
    assert len(seen) == cfg.num_server_rounds
    train = load_dataset(cfg).train
    pool, _ = training_pool(train.class_labels(), seed=cfg.seed, local_test_fraction=cfg.local_test_fraction)
    counts = np.bincount(train.targets[pool], minlength=train.num_classes)
    for criterion in seen:
        if loss == "ce":
            assert type(criterion) is nn.CrossEntropyLoss
        else:
            assert isinstance(criterion, LogitAdjustedLoss) and criterion.name == "balanced-softmax"
            torch.testing.assert_close(criterion.offset, torch.log(torch.tensor(counts / counts.sum(), dtype=torch.float32)))
