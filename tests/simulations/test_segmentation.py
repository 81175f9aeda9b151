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


def _multiclass_datalist(folder: Path, *, per_source: int = 10) -> Path:
    """PNG images with a bright square (class 1) and a grey disc (class 2) on noise; 3 sources."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    sections: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for source in ("a", "b", "c"):
        for i in range(per_source):
            img = rng.normal(40, 10, (32, 32))
            mask = np.zeros((32, 32), np.uint8)
            r, c = rng.integers(2, 18, size=2)
            img[r : r + 10, c : c + 10], mask[r : r + 10, c : c + 10] = 230, 1
            cy, cx = rng.integers(6, 26, size=2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 20
            img[disc], mask[disc] = 130, 2
            name = f"{source}{i}"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{name}.png")
            Image.fromarray(mask).save(folder / f"{name}-mask.png")
            section = "training" if i < per_source - 4 else "validation" if i < per_source - 2 else "test"
            sections[section].append({"image": f"{name}.png", "label": f"{name}-mask.png", "site": source})
    path = folder / "datalist.json"
    path.write_text(json.dumps(sections))
    return path


def test_federated_multiclass_patches_sources_and_sliding_window(tmp_path: Path, one_torch_thread: None) -> None:
    """Three sources as three sites, Dice per class (the patch sampler and a window the size of the
    image: tests/shared/test_segmentation_eval.py checks larger images)."""
    from medfed.client.site_data import simulated_site_data
    from medfed.simulations.bench.quality import federate_in_process

    cfg = RunConfig(
        dataset=str(_multiclass_datalist(tmp_path)),
        image_size=32,
        patch_size=32,
        model="unet",
        norm="instance",  # needs patches >= 32 px: the UNet's bottleneck is 1/16 of the patch
        partition="source",
        local_test_fraction=0.0,
        num_sites=3,
        num_server_rounds=3,
        local_epochs=3,
        batch_size=3,
        learning_rate=0.01,
        optimizer="adam",
        run_dir=str(tmp_path / "runs"),
        store="off",
    )
    sites = [simulated_site_data(cfg, site_index=i, num_sites=3) for i in range(3)]
    assert [sorted(set(s.train.sources)) for s in sites] == [["a"], ["b"], ["c"]]
    assert [len(s.val) for s in sites] == [2, 2, 2]
    curve = federate_in_process(cfg)
    first, last = curve.global_metrics[0], curve.global_metrics[-1]
    print("round 0:", first, "last:", last)
    assert {"dice-class-1", "dice-class-2"} <= set(last)
    assert last["dice"] == pytest.approx((last["dice-class-1"] + last["dice-class-2"]) / 2)
    assert last["dice"] > first["dice"] + 0.3, (first, last)
    assert min(last["dice-class-1"], last["dice-class-2"]) > 0.5, last
