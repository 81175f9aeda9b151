"""Classification breadth on real data: RGB fundus photos with 5 grades (RetinaMNIST) and brain MRA
volumes (VesselMNIST3D) read and train from the README's command pattern, no extra flags.

``medfed simulate --dataset ../shared/data/medmnist/X.npz --sites 4 --model simplecnn``: the config
is built by the command's own parser, the sites are planned by its pre-flight, and one local epoch
on a subset of the training split lowers the loss and yields a macro AUC on (part of) the official test
split. The figures of full short runs are in docs/images.md.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from medfed.shared.preflight import preflight
from medfed.shared.seeding import seed_everything
from medfed.shared.task import model_for, round_settings
from medfed.shared.training import evaluate, make_optimizer, make_train_loader, train_epochs
from medfed.simulations.cli import build_config
from tests.support.medmnist import medmnist_dir

CASES = [
    # file, spatial dims, channels, classes, training / test images used (3D kept small: CPU seconds)
    pytest.param("retinamnist.npz", 2, 3, 5, 192, 400, marks=pytest.mark.data("retinamnist.npz"), id="retinamnist"),
    pytest.param(
        "vesselmnist3d.npz", 3, 1, 2, 32, 64, marks=pytest.mark.data("vesselmnist3d.npz"), id="vesselmnist3d"
    ),
]


@pytest.mark.parametrize(("name", "dims", "channels", "classes", "n_train", "n_test"), CASES)
def test_readme_command_pattern_reads_and_trains_without_extra_flags(
    name: str, dims: int, channels: int, classes: int, n_train: int, n_test: int
) -> None:
    cfg = build_config(
        None, {"dataset": str(medmnist_dir() / name), "num-sites": 4, "model": "simplecnn", "local-epochs": 1}, []
    )
    checked = preflight(cfg)  # what `medfed simulate` runs first: data, model and the 4 sites' shares
    splits = checked.splits
    assert splits is not None and len(checked.train_per_site) == 4
    train = splits.train
    assert (train.spatial_dims, train.in_channels, train.num_classes) == (dims, channels, classes)
    assert set(np.unique(train.targets).tolist()) == set(range(classes))

    seed_everything(0)
    model = model_for(cfg, train)
    rng = np.random.default_rng(0)
    subset = train.subset(rng.permutation(len(train))[:n_train])
    before = evaluate(model, subset, device=torch.device("cpu"))
    # Augmentation off: this checks reading and a training step, in CPU seconds (3D augmentation doubles them).
    settings = dataclasses.replace(round_settings(cfg, server_round=1, site_index=0), augment=False)
    optimizer = make_optimizer(model.parameters(), name=settings.optimizer, learning_rate=settings.learning_rate,
                               weight_decay=settings.weight_decay)
    train_epochs(model, make_train_loader(subset, settings), optimizer, task="classification", epochs=1,
                 device=torch.device("cpu"))
    after = evaluate(model, subset, device=torch.device("cpu"))
    assert after["loss"] < before["loss"]
    test_set = splits.test.subset(rng.permutation(len(splits.test))[:n_test])
    test = evaluate(model, test_set, device=torch.device("cpu"))
    assert 0.0 <= test["auc"] <= 1.0 and not math.isnan(test["auc"])  # macro one-vs-rest for 5 grades
    assert test["num_examples"] == min(n_test, len(splits.test))
