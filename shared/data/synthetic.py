"""SYNTHETIC demo data -- random circles/spheres, NOT medical images.

Built on MONAI's test-image helpers (:func:`monai.data.synthetic.create_test_image_2d` and
:func:`~monai.data.synthetic.create_test_image_3d`), which draw random bright discs (2D) or
balls (3D) on uniform noise and return the matching mask. Nothing here comes from patients;
results on it say nothing about clinical performance. It exists so that the whole federated
pipeline can run (and be tested) without any real data.

Tasks
-----
classification
    The class is the *number* of blobs: class ``c`` images hold ``3c + 1`` or ``3c + 2``
    blobs of random radius and brightness, which may overlap. Total brightness alone is a weak
    cue (a best threshold on the mean intensity gets ~65-75 % on two classes), while a small
    CNN trained on 240 2D samples of 32x32 reaches ~80-90 % test accuracy within 10 epochs
    (3D 32^3: ~80 %); a ridge probe on pooled pixels gets ~90 % with 600 samples.
segmentation
    Images with 2-6 blobs on noise whose intensity range overlaps the blobs'; targets are the
    blob masks (binary for ``num_classes = 2``; with more classes each blob gets a label in
    ``1 .. num_classes - 1`` and a matching intensity level).
bright blob (:func:`make_bright_blob`, for explanation sanity checks; not a run-config choice)
    Class 1 images hold one bright blob among dim ones, class 0 images only dim ones; the bright
    blob's mask is returned so that a heat map can be checked to point at it.
"""

from __future__ import annotations

import logging

import numpy as np
from monai.data.synthetic import create_test_image_2d, create_test_image_3d

from medfed.shared.config import SYNTHETIC_TASKS as TASKS
from medfed.shared.data.base import DataSplits, ImageSet, Task

__all__ = ["make_synthetic", "make_bright_blob", "SPLIT_FRACTIONS"]

logger = logging.getLogger(__name__)

SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
MIN_IMAGE_SIZE = 12


def make_synthetic(
    *,
    task: Task,
    spatial_dims: int,
    num_samples: int,
    image_size: int,
    num_classes: int = 2,
    seed: int,
) -> DataSplits:
    """Generate a SYNTHETIC (clearly not medical) dataset of blobs, split 70/15/15.

    Parameters
    ----------
    task
        ``"classification"`` (label = number-of-blobs class) or ``"segmentation"``.
    spatial_dims
        2 (discs in ``H x W`` images) or 3 (balls in ``D x H x W`` volumes).
    num_samples
        Total number of samples over the three splits (at least ``3 * num_classes`` for
        classification, 3 for segmentation).
    image_size
        Side length (``>= 12``).
    num_classes
        Classification: number of classes. Segmentation: mask classes including background.
    seed
        Same seed, same data (bit for bit).

    Returns
    -------
    DataSplits
        Images ``float32`` ``(N, 1, *spatial)`` in ``[0, 1]``; targets ``int64`` ``(N,)``
        (classification, every class in every split where sizes allow) or
        ``(N, 1, *spatial)`` masks (segmentation).

    Raises
    ------
    ValueError
        An argument is out of range (the message names it).
    """
    if task not in TASKS:
        raise ValueError(
            f"synthetic-task = {task!r} is invalid. Valid choices: {', '.join(repr(t) for t in TASKS)}."
        )
    if spatial_dims not in (2, 3):
        raise ValueError(f"synthetic-dims = {spatial_dims!r} is invalid: use 2 or 3 (--set synthetic-dims=2).")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image-size = {image_size} is invalid for the synthetic dataset: it must be >= {MIN_IMAGE_SIZE} "
            f"(--image-size {2 * MIN_IMAGE_SIZE}, or 0 for the default size)."
        )
    if num_classes < 2:
        raise ValueError(f"num_classes = {num_classes} is invalid: it must be >= 2.")
    min_samples = 3 * num_classes if task == "classification" else 3
    if num_samples < min_samples:
        raise ValueError(
            f"synthetic-samples = {num_samples} is too small: need at least {min_samples} so that "
            f"train, val and test are non-empty (--set synthetic-samples={max(min_samples, 8)})."
        )

    logger.info(
        "Generating SYNTHETIC %s data (random blobs via MONAI create_test_image_%dd, not "
        "medical images): %d samples of %s, seed %d.",
        task,
        spatial_dims,
        num_samples,
        "x".join([str(image_size)] * spatial_dims),
        seed,
    )
    rs = np.random.RandomState(seed % (2**32))
    sizes = _split_sizes(num_samples)
    sets = []
    for n in sizes:
        if task == "classification":
            # balanced labels within each split, in random order
            labels = rs.permutation(np.arange(n) % num_classes).astype(np.int64)
            images = np.stack(
                [_classification_image(int(c), spatial_dims, image_size, rs) for c in labels]
            )
            sets.append(ImageSet(images, labels, "classification", num_classes))
        else:
            pairs = [
                _segmentation_pair(spatial_dims, image_size, num_classes, rs) for _ in range(n)
            ]
            images = np.stack([p[0] for p in pairs])
            masks = np.stack([p[1] for p in pairs])
            sets.append(ImageSet(images, masks, "segmentation", num_classes))
    return DataSplits(*sets)


# ---------------------------------------------------------------------------- internals
def _split_sizes(n: int) -> tuple[int, int, int]:
    n_val = max(1, int(round(SPLIT_FRACTIONS[1] * n)))
    n_test = max(1, int(round(SPLIT_FRACTIONS[2] * n)))
    return n - n_val - n_test, n_val, n_test


def _blobs(
    spatial_dims: int,
    size: int,
    *,
    num_objs: int,
    rad_min: int,
    rad_max: int,
    noise_max: float,
    num_seg_classes: int,
    rs: np.random.RandomState,
) -> tuple[np.ndarray, np.ndarray]:
    """One MONAI test image and its mask, each ``(1, *spatial)``."""
    kwargs = dict(
        num_objs=num_objs,
        rad_max=rad_max,
        rad_min=rad_min,
        noise_max=noise_max,
        num_seg_classes=num_seg_classes,
        channel_dim=0,
        random_state=rs,
    )
    if spatial_dims == 2:
        image, mask = create_test_image_2d(size, size, **kwargs)
    else:
        image, mask = create_test_image_3d(size, size, size, **kwargs)
    return image.astype(np.float32), mask.astype(np.int64)


def _radii(spatial_dims: int, size: int) -> tuple[int, int]:
    """``(rad_min, rad_max)``; MONAI draws radii in ``[rad_min, rad_max)`` (and needs
    ``size > 2 * rad_max``). Balls are larger so that they stand out of 3D noise."""
    if spatial_dims == 2:
        return 2, max(4, size // 6)
    return 3, max(5, size // 4)


def _classification_image(
    label: int, spatial_dims: int, size: int, rs: np.random.RandomState
) -> np.ndarray:
    rad_min, rad_max = _radii(spatial_dims, size)
    num_objs = 3 * label + 1 + rs.randint(0, 2)
    image, _ = _blobs(
        spatial_dims,
        size,
        num_objs=num_objs,
        rad_min=rad_min,
        rad_max=rad_max,
        noise_max=0.3,
        num_seg_classes=1,
        rs=rs,
    )
    return image


def _segmentation_pair(
    spatial_dims: int, size: int, num_classes: int, rs: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    rad_min, rad_max = _radii(spatial_dims, size)
    image, mask = _blobs(
        spatial_dims,
        size,
        num_objs=int(rs.randint(2, 7)),
        rad_min=rad_min,
        rad_max=rad_max,
        noise_max=0.6,
        num_seg_classes=num_classes - 1,
        rs=rs,
    )
    return image, mask


def make_bright_blob(
    *, spatial_dims: int, num_samples: int, image_size: int, seed: int, distractors: int = 2
) -> tuple[ImageSet, np.ndarray]:
    """SYNTHETIC images whose class is set by one bright blob: class 1 has it, class 0 does not.

    Every image is uniform noise in ``[0, 0.25]`` with ``distractors`` dim blobs (intensity
    ``0.35-0.5``); class 1 images also hold one bright blob (intensity 1) of the same radius range,
    drawn last. Radii are ``image_size / 8`` to ``image_size / 6`` (at least 2). The bright blob is
    the only cue, so a model that learned the task must look at it.

    Parameters
    ----------
    spatial_dims
        2 (discs) or 3 (balls).
    num_samples
        Number of images (balanced, in random order; at least 2).
    image_size
        Side length (``>= 12``).
    seed
        Same seed, same data.
    distractors
        Dim blobs per image.

    Returns
    -------
    tuple
        ``(ImageSet, masks)``: images ``float32`` ``(N, 1, *spatial)`` in ``[0, 1]`` with labels
        ``(N,)`` (two classes), and ``bool`` masks ``(N, 1, *spatial)`` of the bright blob (all
        ``False`` for class 0).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims = {spatial_dims!r} is invalid: use 2 or 3.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size = {image_size} is invalid: it must be >= {MIN_IMAGE_SIZE}.")
    if num_samples < 2:
        raise ValueError(f"num_samples = {num_samples} is invalid: it must be >= 2.")
    rs = np.random.RandomState(seed % (2**32))
    labels = rs.permutation(np.arange(num_samples) % 2).astype(np.int64)
    shape = (image_size,) * spatial_dims
    grid = np.stack(np.meshgrid(*[np.arange(image_size)] * spatial_dims, indexing="ij"))
    rad_min, rad_max = max(2, image_size // 8), max(3, image_size // 6)
    images = np.empty((num_samples, 1, *shape), dtype=np.float32)
    masks = np.zeros((num_samples, 1, *shape), dtype=bool)

    def disc() -> np.ndarray:
        radius = rs.uniform(rad_min, rad_max)
        centre = rs.uniform(radius, image_size - 1 - radius, size=spatial_dims)
        offsets = grid - centre.reshape(-1, *([1] * spatial_dims))
        return (offsets**2).sum(0) <= radius**2

    for i, label in enumerate(labels):
        image = rs.uniform(0.0, 0.25, size=shape).astype(np.float32)
        for _ in range(distractors):
            image[disc()] = rs.uniform(0.35, 0.5)
        if label == 1:
            blob = disc()
            image[blob] = 1.0
            masks[i, 0] = blob
        images[i, 0] = image
    return ImageSet(images, labels, "classification", 2), masks
