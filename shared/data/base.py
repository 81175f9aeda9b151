"""In-memory image sets: the one data type the training loops consume."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.shared.config import Task

__all__ = ["ImageSet", "DataSplits", "DataError"]


class DataError(ValueError):
    """A data file or datalist entry is missing, unreadable or inconsistent.

    Messages name the file (or the datalist and entry index) and say how to fix it; they
    never contain pixel data.
    """


@dataclass(frozen=True)
class ImageSet:
    """Images with class labels or segmentation masks, held in memory.

    Parameters
    ----------
    images
        ``float32`` array of shape ``(N, C, *spatial)`` with intensities scaled to ``[0, 1]``;
        ``spatial`` has 2 or 3 entries.
    targets
        Classification: ``int64`` array of shape ``(N,)`` with values in
        ``[0, num_classes)``. Segmentation: ``int64`` array of shape ``(N, 1, *spatial)``
        with values in ``[0, num_classes)`` (``num_classes`` counts the background).
        Detection: ``object`` array of shape ``(N,)`` whose item ``i`` is a ``float32`` array
        ``(M_i, 5)`` of boxes ``[xmin, ymin, xmax, ymax, label]`` in pixels of the stored
        image (``x`` along the last axis, ``W``), ``label`` in ``[0, num_classes)``; ``M_i``
        may be 0 (see :mod:`medfed.shared.data.boxes`).
    task
        ``"classification"``, ``"segmentation"`` or ``"detection"``.
    num_classes
        Number of classes (segmentation: including background; detection: object classes,
        without background, so 1 is valid).
    metadata
        Optional per-sample metadata from a datalist (``sex``, ``age``, ``scanner``...:
        :data:`medfed.shared.data.metadata.METADATA_KEYS`), one mapping per sample, in sample
        order (an empty mapping: none given); ``None``: no metadata at all (npz, synthetic).
        It stays at the site: only subgroup metrics derived from it may leave
        (:mod:`medfed.client.cross_site`).
    sources
        Optional per-sample source (the datalist's ``"site"`` attribute: the scanner, hospital or
        slice range an image comes from), shape ``(N,)`` of strings; ``None`` when the data
        has none. ``partition = "source"`` gives each simulated site one source.
    """

    images: np.ndarray
    targets: np.ndarray
    task: Task
    num_classes: int
    metadata: tuple[Mapping[str, Any], ...] | None = None
    sources: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    """Names of the classes in label order, where the source gives them (box datalists); else ``()``."""

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5):
            raise DataError(
                f"images must have shape (N, C, H, W) or (N, C, D, H, W); got {self.images.shape}."
            )
        if len(self.images) != len(self.targets):
            raise DataError(
                f"{len(self.images)} images but {len(self.targets)} targets: they must match."
            )
        if self.task == "classification" and self.targets.ndim != 1:
            raise DataError(f"classification targets must have shape (N,); got {self.targets.shape}.")
        if self.task == "segmentation" and self.targets.shape[2:] != self.images.shape[2:]:
            raise DataError(
                f"mask shape {self.targets.shape} does not match image shape {self.images.shape}."
            )
        if self.task == "detection":
            if self.targets.ndim != 1 or self.targets.dtype != object:
                raise DataError(f"detection targets must be an object array of shape (N,); got {self.targets.shape}.")
            if self.num_classes < 1:
                raise DataError(f"num_classes must be >= 1 for detection; got {self.num_classes}.")
            return
        if self.num_classes < 2:
            raise DataError(f"num_classes must be >= 2; got {self.num_classes}.")
        if self.metadata is not None and len(self.metadata) != len(self.images):
            raise DataError(
                f"{len(self.images)} images but {len(self.metadata)} metadata entries: they must match."
            )
        if self.sources is not None and len(self.sources) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.sources)} sources: they must match.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.images.ndim - 2

    @property
    def in_channels(self) -> int:
        """Number of image channels ``C``."""
        return int(self.images.shape[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``(H, W)`` or ``(D, H, W)``."""
        return tuple(int(s) for s in self.images.shape[2:])

    def subset(self, indices: np.ndarray) -> ImageSet:
        """The samples at ``indices`` (a 1-D integer array), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        meta = None if self.metadata is None else tuple(self.metadata[int(i)] for i in idx)
        sources = self.sources[idx] if self.sources is not None else None
        return ImageSet(self.images[idx], self.targets[idx], self.task, self.num_classes, meta, sources=sources,
                        class_names=self.class_names)

    def with_num_classes(self, num_classes: int) -> ImageSet:
        """The same samples (and metadata, sources, class names) declared with ``num_classes`` classes."""
        return ImageSet(self.images, self.targets, self.task, num_classes, self.metadata, sources=self.sources,
                        class_names=self.class_names)

    def class_labels(self) -> np.ndarray:
        """Per-sample labels used for partitioning, shape ``(N,)``.

        Classification: the labels. Segmentation: 1 where the mask has any foreground, else 0.
        Detection: the image's most frequent box label (the lowest on a tie; 0 for an image
        without boxes), an image attribute a Dirichlet split can skew.
        """
        if self.task == "classification":
            return self.targets
        if self.task == "detection":
            return np.array(
                [int(np.bincount(t[:, 4].astype(np.int64)).argmax()) if len(t) else 0 for t in self.targets],
                dtype=np.int64,
            )
        flat = self.targets.reshape(len(self), -1)
        return (flat.max(axis=1) > 0).astype(np.int64)


@dataclass(frozen=True)
class DataSplits:
    """Train, validation and test sets of one dataset.

    Parameters
    ----------
    train, val, test
        The three splits.
    skipped_files
        Entries of the source left out as unusable (a datalist read with ``bad-data = "skip"``;
        ``0`` for every other reader). A count only: no names.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    skipped_files: int = 0

    @property
    def task(self) -> Task:
        """The task shared by all three splits."""
        return self.train.task

    @property
    def num_classes(self) -> int:
        """Number of classes shared by all three splits."""
        return self.train.num_classes
