"""Tiny image files (NIfTI, DICOM series) and real one-round training runs on them, for the
``medfed predict`` / ``medfed export`` tests.

The runs are real in-process pooled runs (:func:`medfed.simulations.pooled.run_pooled`, what
``medfed simulate --pooled`` runs) on a datalist of NIfTI files: they write ``checkpoints/best.pt``
and ``final.pt`` as any run does.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medfed.shared.config import RunConfig

CLS_AFFINE = np.diag([0.8, 0.8, 1.0, 1.0])
SEG_AFFINE = np.array(
    [[0.0, 0.0, 1.5, -20.0], [0.0, 1.2, 0.0, 5.0], [-0.9, 0.0, 0.0, 12.0], [0.0, 0.0, 0.0, 1.0]]
)
"""A rotated, anisotropic affine: a mask written with the identity would not match it."""


def classification_datalist(folder: Path, *, n: int = 24, side: int = 20) -> Path:
    """``n`` 2D NIfTI images (class 1: a bright square), labels alternating; the datalist path."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        image = (rng.random((side, side)) * 60).astype(np.float32)
        if i % 2:
            image[5:15, 5:15] += 120
        nib.save(nib.Nifti1Image(image, CLS_AFFINE), folder / f"c{i}.nii.gz")
        entries.append({"image": f"c{i}.nii.gz", "label": i % 2})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


def segmentation_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with one bright box, and its 0/1 mask."""
    image = (rng.random(shape) * 40).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    lo = [int(rng.integers(2, s // 2 - 1)) for s in shape]
    box = tuple(slice(a, a + s // 2) for a, s in zip(lo, shape, strict=True))
    image[box] += 150
    mask[box] = 1
    return image, mask


def segmentation_datalist(folder: Path, *, n: int = 12, shape: tuple[int, int, int] = (20, 18, 22)) -> Path:
    """``n`` 3D NIfTI volumes (not cubes, so masks must be resized back) with box masks."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        image, mask = segmentation_volume(rng, shape)
        nib.save(nib.Nifti1Image(image, SEG_AFFINE), folder / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask, SEG_AFFINE), folder / f"m{i}.nii.gz")
        entries.append({"image": f"v{i}.nii.gz", "label": f"m{i}.nii.gz"})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


def dicom_series(folder: Path, volume: np.ndarray, *, spacing: tuple[float, float, float] = (2.0, 0.7, 0.7)) -> Path:
    """Write ``volume`` ``(slices, rows, columns)`` as a CT DICOM series (one file per slice) in ``folder``."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = get_testdata_file("CT_small.dcm")
    assert template is not None, "pydicom ships CT_small.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    pixels = np.clip(volume, 0, 4000).astype(np.int16)
    for k, plane in enumerate(pixels):
        ds = pydicom.dcmread(template)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k) * spacing[0]]
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm")
    return folder


def train_one_round(datalist: Path, run_path: Path, *, model: str, image_size: int, **overrides: object) -> Path:
    """A real one-round pooled run of ``model`` on ``datalist``; its run directory."""
    from medfed.simulations.pooled import run_pooled

    cfg = RunConfig(
        dataset=str(datalist),
        image_size=image_size,
        model=model,
        num_server_rounds=1,
        local_epochs=1,
        batch_size=8,
        learning_rate=0.01,
        optimizer="adam",
        local_test_fraction=0.0,
        store="off",
        run_dir=str(run_path.parent),
        **overrides,  # type: ignore[arg-type]
    )
    return run_pooled(cfg, run_path=run_path).run_dir


@dataclass(frozen=True)
class TrainedRun:
    """A finished one-round run and the data it trained on."""

    run_dir: Path
    datalist: Path
    image_size: int


_ROOT: list[Path] = []


def _scratch() -> Path:
    """One temporary folder per test process for the cached runs (removed at exit)."""
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="medfed-trained-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


@functools.cache
def classification_run() -> TrainedRun:
    """simplecnn, 2D, 2 classes, images 20x20 resized to 16; trained once per test process."""
    root = _scratch() / "classification"
    datalist = classification_datalist(root / "data")
    return TrainedRun(train_one_round(datalist, root / "run", model="simplecnn", image_size=16), datalist, 16)


@functools.cache
def segmentation_run() -> TrainedRun:
    """unet (group norm), 3D, 2 classes, volumes 20x18x22 resized to 16^3; trained once per test process."""
    root = _scratch() / "segmentation"
    datalist = segmentation_datalist(root / "data", n=8)
    return TrainedRun(
        train_one_round(datalist, root / "run", model="unet", image_size=16, norm="group"), datalist, 16
    )
