"""Federated segmentation: 2D and 3D MONAI UNets learn on synthetic image/mask data."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.shared.config import RunConfig
from medfed.simulations.simulate import run_federated

CASES = [
    # spatial dims, image side, samples, rounds, local epochs
    pytest.param(2, 32, 96, 3, 2, id="unet-2d"),
    pytest.param(3, 32, 48, 3, 2, id="unet-3d"),
]


@pytest.mark.parametrize(("dims", "size", "samples", "rounds", "epochs"), CASES)
def test_federated_unet_dice_improves(
    tmp_path: Path, dims: int, size: int, samples: int, rounds: int, epochs: int
) -> None:
    cfg = RunConfig(
        dataset="synthetic",
        synthetic_task="segmentation",
        synthetic_dims=dims,
        synthetic_samples=samples,
        image_size=size,
        model="unet",
        norm="instance",
        num_sites=3,
        num_server_rounds=rounds,
        local_epochs=epochs,
        batch_size=8,
        learning_rate=0.01,
        optimizer="adam",
        run_dir=str(tmp_path),
    )
    result = run_federated(cfg)
    dice = [r.global_metrics["dice"] for r in result.rounds]
    print(f"{dims}D UNet global Dice per round: {[round(d, 3) for d in dice]}")
    assert len(dice) == rounds + 1
    # "Clearly exceeds": at least 0.2 above the untrained model and above 0.5 in absolute terms.
    assert dice[-1] > dice[0] + 0.2, dice
    assert dice[-1] > 0.5, dice
    assert result.rounds[-1].eval_metrics["dice"] > 0.5  # the sites' own validation agrees
