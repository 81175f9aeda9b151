"""Pick the reader for a run's ``dataset`` setting: synthetic, MedMNIST npz or datalist JSON."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from medfed.shared.config import RunConfig
from medfed.shared.data.base import DataError, DataSplits

__all__ = ["load_dataset", "SYNTHETIC_IMAGE_SIZE"]

logger = logging.getLogger(__name__)

SYNTHETIC_IMAGE_SIZE = {2: 32, 3: 32}
"""Side length of synthetic images when ``image-size`` is 0."""


def load_dataset(cfg: RunConfig) -> DataSplits:
    """Load (and cache, per process) the dataset a run config names.

    Parameters
    ----------
    cfg
        Uses ``dataset``, ``image_size``, ``seed``, ``bad_data`` (datalists: ``"skip"`` leaves
        unusable entries out and counts them in ``DataSplits.skipped_files``), ``spacing``
        (datalists: NIfTI/DICOM voxel size after reorientation to RAS) and, for
        synthetic data, the ``synthetic_*`` fields.

    Raises
    ------
    DataError
        If the path does not exist or its suffix is neither ``.npz`` nor ``.json``, or (with
        ``bad_data = "strict"``) a datalist has unusable entries: the message lists them.
    """
    return _load_cached(
        cfg.dataset,
        cfg.image_size,
        cfg.seed,
        cfg.synthetic_task,
        cfg.synthetic_dims,
        cfg.synthetic_samples,
        cfg.bad_data,
        cfg.spacing_mm,
    )


@functools.lru_cache(maxsize=4)
def _load_cached(
    dataset: str,
    image_size: int,
    seed: int,
    synthetic_task: str,
    synthetic_dims: int,
    synthetic_samples: int,
    bad_data: str = "strict",
    spacing: tuple[float, ...] = (),
) -> DataSplits:
    if dataset == "synthetic":
        from medfed.shared.data.synthetic import make_synthetic

        return make_synthetic(
            task=synthetic_task,
            spatial_dims=synthetic_dims,
            num_samples=synthetic_samples,
            image_size=image_size or SYNTHETIC_IMAGE_SIZE[synthetic_dims],
            seed=seed,
        )
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DataError(
            f"dataset {dataset!r} does not exist. Give 'synthetic', a MedMNIST .npz file or a "
            "datalist .json file."
        )
    if path.suffix == ".npz":
        from medfed.shared.data.npz import load_npz

        return load_npz(path, image_size=image_size)
    if path.suffix == ".json":
        from medfed.shared.data.boxes import is_box_datalist, load_box_datalist
        from medfed.shared.data.datalist import load_datalist

        if is_box_datalist(path):  # a top-level "classes" list: object detection
            return load_box_datalist(
                path, image_size=image_size, seed=seed, on_error="skip" if bad_data == "skip" else "raise"
            )

        if image_size <= 0:
            raise DataError(
                f"dataset {path.name}: a datalist needs image-size > 0 (every image is resized to it)."
            )
        return load_datalist(
            path,
            image_size=image_size,
            seed=seed,
            on_error="skip" if bad_data == "skip" else "raise",
            spacing=spacing,
        )
    raise DataError(
        f"dataset {path.name}: unknown file type {path.suffix!r}. Valid: .npz (MedMNIST) or .json (datalist)."
    )
