"""Batched classification augmentation (``BatchFlipShift``) against MONAI's per-image transforms."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Affine, Compose

from medfed.shared.data.synthetic import make_synthetic
from medfed.shared.training import TrainSettings, make_train_loader
from medfed.shared.transforms import (
    FLIP_PROB,
    SHIFT_PIXELS,
    SHIFT_PROB,
    AugmentedBatches,
    BatchFlipShift,
    translate,
)

SHAPES = [(2, (7, 9)), (3, (5, 6, 7))]


def _monai_translate(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """One ``(C, *spatial)`` image through MONAI's ``Affine`` (what ``RandAffined`` applies)."""
    out = Affine(translate_params=(-shift).tolist(), mode="bilinear", padding_mode="zeros", image_only=True)(image)
    return torch.as_tensor(out)


@pytest.mark.parametrize(("dims", "size"), SHAPES)
def test_translate_equals_monai_affine_per_image(dims: int, size: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(dims)
    images = torch.rand(4, 2, *size, generator=gen)
    shifts = torch.rand(4, dims, generator=gen) * 4 - 2  # fractional, both signs
    ours = translate(images, shifts)
    ref = torch.stack([_monai_translate(images[b], shifts[b]) for b in range(4)])
    assert ours.shape == images.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("dims", "size"), SHAPES)
def test_translate_by_whole_pixels_moves_them_and_fills_zeros(dims: int, size: tuple[int, ...]) -> None:
    images = torch.arange(float(torch.tensor(size).prod())).reshape(1, 1, *size) + 1.0
    for axis in range(dims):
        shifts = torch.zeros(1, dims)
        shifts[0, axis] = 1.0
        out = translate(images, shifts)
        moved = images.narrow(2 + axis, 0, size[axis] - 1)
        torch.testing.assert_close(out.narrow(2 + axis, 1, size[axis] - 1), moved, atol=1e-4, rtol=0)
        assert out.narrow(2 + axis, 0, 1).abs().max() < 1e-4  # nothing moved in: zeros


def test_translate_rejects_shifts_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"shifts of shape \(2, 3\).*expected \(2, 2\)"):
        translate(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3))


@pytest.mark.parametrize(("dims", "size"), SHAPES)
def test_batch_equals_monai_flips_and_affine_with_the_drawn_choices(dims: int, size: tuple[int, ...]) -> None:
    """Every image of the batch is what MONAI's flip and affine give it with the same random choices."""
    images = torch.rand(24, 1, *size, generator=torch.Generator().manual_seed(5))
    out = BatchFlipShift(spatial_dims=dims, seed=11)(images)
    flips, shifted, shifts = BatchFlipShift(spatial_dims=dims, seed=11).draw(24)
    assert flips.any() and (~flips).any() and shifted.any() and (~shifted).any()  # every branch is used
    for b in range(24):
        expected = images[b]
        for axis in range(dims):
            if flips[b, axis]:
                expected = expected.flip(1 + axis)
        if shifted[b]:
            expected = _monai_translate(expected, shifts[b])
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=0)


def test_draws_follow_the_per_image_transforms_distribution() -> None:
    """Flip and shift rates and the shift range are those of ``train_transforms``'s MONAI transforms."""
    n = 20_000
    flips, shifted, shifts = BatchFlipShift(spatial_dims=3, seed=0).draw(n)
    bound = 4 * (0.25 / n) ** 0.5  # four binomial standard deviations
    assert all(abs(float(flips[:, a].float().mean()) - FLIP_PROB) < bound for a in range(3))
    assert abs(float(shifted.float().mean()) - SHIFT_PROB) < bound
    assert float(shifts.abs().max()) <= SHIFT_PIXELS
    assert abs(float(shifts.mean())) < 0.05 and abs(float(shifts.std()) - SHIFT_PIXELS / 3**0.5) < 0.05  # uniform
    corr = torch.corrcoef(torch.stack([flips[:, 0].float(), flips[:, 1].float(), shifted.float()]))
    assert (corr - torch.eye(3)).abs().max() < 0.05  # drawn independently


def test_same_seed_same_batches_other_seed_others() -> None:
    images = torch.rand(16, 1, 12, 12)
    a, b = BatchFlipShift(spatial_dims=2, seed=3), BatchFlipShift(spatial_dims=2, seed=3)
    assert all(torch.equal(a(images), b(images)) for _ in range(3))
    assert not torch.equal(BatchFlipShift(spatial_dims=2, seed=4)(images), BatchFlipShift(spatial_dims=2, seed=3)(images))


def test_empty_batch_and_wrong_shapes() -> None:
    empty = torch.zeros(0, 1, 8, 8)
    assert BatchFlipShift(spatial_dims=2)(empty) is empty
    with pytest.raises(ValueError, match=r"BatchFlipShift\(3D\) got a batch of shape \(2, 1, 8, 8\)"):
        BatchFlipShift(spatial_dims=3)(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims = 1 is invalid"):
        BatchFlipShift(spatial_dims=1)


@pytest.mark.parametrize("dims", [2, 3])
def test_classification_loader_augments_whole_batches(dims: int) -> None:
    data = make_synthetic(task="classification", spatial_dims=dims, num_samples=60, image_size=16, seed=0).train
    settings = TrainSettings(epochs=1, batch_size=8, learning_rate=0.1, augment=True, seed=2)
    loader = make_train_loader(data, settings)
    assert isinstance(loader.collate_fn, AugmentedBatches) and loader.dataset.transform is None
    plain = make_train_loader(data, TrainSettings(epochs=1, batch_size=8, learning_rate=0.1, augment=False, seed=2))
    (xa, ya), (xp, yp) = next(iter(loader)), next(iter(plain))
    assert torch.equal(ya, yp) and xa.shape == xp.shape == (8, data.images.shape[1], *([16] * dims))
    assert not torch.equal(xa, xp)  # same images, same order (same seed), augmented
    again = next(iter(make_train_loader(data, settings)))
    assert torch.equal(again[0], xa)  # reproducible from the round's seed


def test_segmentation_keeps_per_image_transforms() -> None:
    """Masks move with their images: segmentation stays on MONAI's dictionary transforms."""
    data = make_synthetic(task="segmentation", spatial_dims=2, num_samples=12, image_size=16, seed=0).train
    loader = make_train_loader(data, TrainSettings(epochs=1, batch_size=4, learning_rate=0.1, augment=True, seed=0))
    assert isinstance(loader.dataset.transform, Compose) and not isinstance(loader.collate_fn, AugmentedBatches)
