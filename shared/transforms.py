"""Training-time augmentation: MONAI dictionary transforms per image (segmentation, detection) or
the same flips and shifts drawn per image and applied to a whole batch (classification), and the
torch dataset over them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd, Randomizable
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, default_collate

from medfed.shared.data.base import ImageSet

__all__ = ["AugmentedBatches", "BatchFlipShift", "ImageSetDataset", "train_transforms", "translate"]

FLIP_PROB = 0.5
"""Probability that an image is flipped along one spatial axis (each axis drawn on its own)."""
SHIFT_PROB = 0.5
"""Probability that an image is translated."""
SHIFT_PIXELS = 2
"""Largest translation, in pixels, along each spatial axis."""


def train_transforms(
    *, task: str, spatial_dims: int, shift_pixels: int = SHIFT_PIXELS, patch_size: int = 0, augment: bool = True
) -> Compose:
    """Random flips along every spatial axis and small translations; random patches (segmentation).

    Parameters
    ----------
    task
        ``"segmentation"`` also moves the ``"label"`` mask, with nearest-neighbour sampling.
    spatial_dims
        2 or 3.
    shift_pixels
        Largest translation, in pixels, along each spatial axis.
    patch_size
        Segmentation: first crop a random ``patch_size`` patch per axis
        (``RandCropByPosNegLabeld``: its centre is a foreground voxel or a background one, with
        equal odds), so a CPU trains on images larger than it could take whole; 0: no crop.
    augment
        Flips and translations (``False``: the crop alone).

    Returns
    -------
    Compose
        Transforms over ``{"image": (C, *spatial), "label": ...}`` dictionaries.
    """
    keys = ["image", "label"] if task == "segmentation" else ["image"]
    modes = ["bilinear", "nearest"] if task == "segmentation" else ["bilinear"]
    crop: list[RandCropByPosNegLabeld] = []
    if patch_size and task == "segmentation":
        crop = [
            RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=[patch_size] * spatial_dims, pos=1.0, neg=1.0,
                num_samples=1, allow_smaller=True,
            )
        ]
    if not augment:
        return Compose(crop)
    flips = [RandFlipd(keys=keys, prob=FLIP_PROB, spatial_axis=axis) for axis in range(spatial_dims)]
    shift = RandAffined(
        keys=keys,
        prob=SHIFT_PROB,
        translate_range=[shift_pixels] * spatial_dims,
        mode=modes,
        padding_mode="zeros",
    )
    return Compose([*crop, *flips, shift])


def translate(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Images moved by a (fractional) number of pixels each, bilinear, zeros where nothing moves in.

    Parameters
    ----------
    images
        ``(B, C, *spatial)`` float images, 2 or 3 spatial axes.
    shifts
        ``(B, D)`` pixels per spatial axis, in the array's axis order (``D`` spatial axes):
        ``out[b, :, i] = images[b, :, i - shifts[b]]`` (interpolated between pixels). This is MONAI's
        ``Affine(translate_params=-shifts[b], mode="bilinear", padding_mode="zeros")`` applied to one
        image (tested equal), computed for the batch with one ``affine_grid`` / ``grid_sample``.

    Returns
    -------
    torch.Tensor
        ``(B, C, *spatial)``, the dtype of ``images``.
    """
    count, dims = shifts.shape
    sizes = images.shape[2:]
    if len(sizes) != dims or count != images.shape[0]:
        raise ValueError(f"translate: shifts of shape {tuple(shifts.shape)} do not fit images of shape "
                         f"{tuple(images.shape)} (expected ({images.shape[0]}, {len(sizes)})).")
    theta = torch.zeros(count, dims, dims + 1, dtype=images.dtype, device=images.device)
    theta[:, :, :dims] = torch.eye(dims, dtype=images.dtype, device=images.device)
    for k in range(dims):  # grid coordinate k (x, y, z) is the array's spatial axis dims - 1 - k
        axis = dims - 1 - k
        # the grid gives where each output pixel reads the input: shifted by -shift, in units of 2 / size
        theta[:, k, dims] = -2.0 * shifts[:, axis].to(images.dtype) / sizes[axis]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class BatchFlipShift:
    """The classification augmentation of :func:`train_transforms`, drawn per image and applied to
    a whole batch at once.

    Each image is flipped along each spatial axis with probability :data:`FLIP_PROB`, then with
    probability :data:`SHIFT_PROB` translated by a shift drawn uniformly from ``[-shift_pixels,
    shift_pixels]`` per axis (bilinear, zero padding): the distribution of MONAI's ``RandFlipd`` and
    ``RandAffined(translate_range=...)`` in :func:`train_transforms`. MONAI applies them one image at
    a time, with a metadata-tracking tensor and an affine grid per image: on 16^3 volumes and 28x28
    images that costs more than the model's forward and backward passes (BENCHMARKS.md, "Batched
    augmentation"). Here one flip per axis and one ``grid_sample`` serve the batch.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    shift_pixels
        Largest translation, in pixels, along each spatial axis.
    seed
        Seeds this object's own generator: the same seed and batches give the same augmentation.

    Notes
    -----
    ``__call__`` maps images ``(B, C, *spatial)`` to augmented images of the same shape and dtype;
    a batch of zero images (Opacus's Poisson sampling can draw one) is returned as it is.
    """

    def __init__(self, *, spatial_dims: int, shift_pixels: float = SHIFT_PIXELS, seed: int = 0) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims = {spatial_dims} is invalid: batched augmentation takes 2 or 3.")
        if shift_pixels < 0:
            raise ValueError(f"shift_pixels = {shift_pixels} is invalid: it must be >= 0.")
        self.spatial_dims = spatial_dims
        self.shift_pixels = float(shift_pixels)
        self.generator = torch.Generator().manual_seed(seed % (2**63))

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random choices for ``count`` images: flips ``(B, D)`` bool, shifted ``(B,)`` bool and
        shifts ``(B, D)`` pixels (used where ``shifted``)."""
        flips = torch.rand(count, self.spatial_dims, generator=self.generator) < FLIP_PROB
        shifted = torch.rand(count, generator=self.generator) < SHIFT_PROB
        shifts = (torch.rand(count, self.spatial_dims, generator=self.generator) * 2 - 1) * self.shift_pixels
        return flips, shifted, shifts

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augment ``images`` ``(B, C, *spatial)``; returns a new tensor of the same shape."""
        if images.dim() != self.spatial_dims + 2:
            raise ValueError(f"BatchFlipShift({self.spatial_dims}D) got a batch of shape {tuple(images.shape)}; "
                             f"expected (B, C, {', '.join(['size'] * self.spatial_dims)}).")
        count = images.shape[0]
        if count == 0:
            return images
        flips, shifted, shifts = self.draw(count)
        out = images
        expand = (-1,) + (1,) * (images.dim() - 1)
        for axis in range(self.spatial_dims):
            if flips[:, axis].any():
                out = torch.where(flips[:, axis].view(expand), out.flip(2 + axis), out)
        chosen = shifted.nonzero().flatten()
        if chosen.numel():
            out = out.clone() if out is images else out
            out[chosen] = translate(out[chosen], shifts[chosen])
        return out


class AugmentedBatches:
    """A ``DataLoader`` ``collate_fn``: the default collation of ``(image, target)`` items, then
    ``augment`` (e.g. :class:`BatchFlipShift`) on the stacked images ``(B, C, *spatial)``.

    Opacus's Poisson loader wraps it like any ``collate_fn`` (empty batches never reach it)."""

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.augment = augment

    def __call__(self, batch: Sequence[Any]) -> list[torch.Tensor]:
        images, targets = default_collate(batch)
        return [self.augment(images), targets]


class ImageSetDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A torch dataset over an :class:`ImageSet`, optionally augmented.

    Items are ``(image, target)`` tuples: image ``float32 (C, *spatial)``; target ``int64 ()``
    for classification or ``int64 (1, *spatial)`` for segmentation. Tuples (not dicts) keep
    Opacus's Poisson data loader able to build empty batches.

    Parameters
    ----------
    data
        The samples.
    transform
        MONAI dictionary transforms applied to ``{"image", "label"}``; ``None`` for none.
    seed
        Seeds the transforms' random state, so augmentation is reproducible.
    """

    def __init__(self, data: ImageSet, *, transform: Compose | None = None, seed: int = 0) -> None:
        self.data = data
        self.transform = transform
        self._flip_rng = np.random.default_rng(seed % (2**32))
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=seed % (2**32))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.data.images[index]
        target = self.data.targets[index]
        if self.data.task == "detection":
            return self._detection_item(image, target)
        if self.transform is not None:
            item = {"image": image}
            if self.data.task == "segmentation":
                item["label"] = target.astype(np.float32)
            item = self.transform(item)
            if isinstance(item, list):  # a patch sampler returns a list of (here one) samples
                item = item[0]
            image = item["image"]
            if self.data.task == "segmentation":
                target = item["label"]
        image_t = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
        target_t = convert_to_tensor(np.asarray(target) if np.isscalar(target) or isinstance(target, np.generic) else target, track_meta=False)
        if target_t.is_floating_point():
            target_t = target_t.round()
        target_t = target_t.to(torch.int64)
        return image_t, target_t

    def _detection_item(self, image: np.ndarray, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Detection: ``(image (C, H, W), boxes (M, 5))``; with a transform, random horizontal and
        vertical flips (each with probability 0.5) applied to the image and its boxes together
        (box-aware: MONAI's image transforms would move the pixels but not the boxes)."""
        image_t = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)
        boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 5)).clone()
        if self.transform is not None:
            height, width = image_t.shape[-2:]
            if self._flip_rng.random() < 0.5:
                image_t = image_t.flip(-1)
                boxes_t[:, [0, 2]] = width - boxes_t[:, [2, 0]]
            if self._flip_rng.random() < 0.5:
                image_t = image_t.flip(-2)
                boxes_t[:, [1, 3]] = height - boxes_t[:, [3, 1]]
        return image_t, boxes_t
