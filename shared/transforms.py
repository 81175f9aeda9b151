"""MONAI dictionary transforms for training-time augmentation, and the torch dataset over them."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd, Randomizable
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from medfed.shared.data.base import ImageSet

__all__ = ["train_transforms", "ImageSetDataset"]


def train_transforms(
    *, task: str, spatial_dims: int, shift_pixels: int = 2, patch_size: int = 0, augment: bool = True
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
    flips = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    shift = RandAffined(
        keys=keys,
        prob=0.5,
        translate_range=[shift_pixels] * spatial_dims,
        mode=modes,
        padding_mode="zeros",
    )
    return Compose([*crop, *flips, shift])


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
