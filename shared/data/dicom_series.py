"""Read a folder holding one DICOM series as one volume, as a radiologist's viewer would.

:func:`read_dicom_series` returns the voxels in the scanner's units (CT: Hounsfield units) and a
RAS affine, ready for MONAI's ``Orientation`` / ``Spacing``:

* slices are ordered by their position along the slice normal (``ImagePositionPatient`` projected
  on ``row x column`` of ``ImageOrientationPatient``), never by file name or ``InstanceNumber``;
* ``RescaleSlope`` / ``RescaleIntercept`` are applied per slice (CT: HU);
* **gantry tilt** (the slices' offset not parallel to their normal, a sheared grid) is corrected
  the way dcm2niix does: each slice is shifted in its own plane onto an orthogonal grid (linear
  interpolation; what moves out of the field of view is lost, what moves in is filled with the
  series' minimum). The angle is reported (:attr:`SeriesInfo.tilt_degrees`; the datalist reader
  counts corrected entries in its log and ``medfed site check`` names them with the angle);
* **unequal slice spacing** (e.g. 4 mm slices through the skull base, 7 mm above) is resampled
  linearly along the normal to the median spacing, and reported (:attr:`SeriesInfo.slice_gaps`).

What it refuses, with a :class:`DicomSeriesError` saying why and what to do: a folder with no
DICOM file or with more than one series, slices without ``ImagePositionPatient`` /
``ImageOrientationPatient`` (no way to order them), slices that disagree on orientation, size or
pixel spacing, and two slices at one position (several phases or echoes in one series).
Non-DICOM files in the folder (``MD5SUMS``, ``DICOMDIR``, notes) are ignored and counted.

Privacy: messages name the folder (for the site's operator) and tag names, never patient data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DicomSeriesError", "SeriesInfo", "dicom_image_files", "read_dicom_series", "TILT_TOLERANCE_DEGREES"]

TILT_TOLERANCE_DEGREES = 0.1
"""Below this angle between slice offset and slice normal a series counts as untilted."""
_GAP_TOLERANCE = 0.01
"""Relative spread of the slice gaps below which the spacing counts as equal."""
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomSeriesError(ValueError):
    """The folder cannot be read as one DICOM series; the message says why and how to fix it."""


@dataclass(frozen=True)
class SeriesInfo:
    """What :func:`read_dicom_series` found and did.

    Parameters
    ----------
    slices
        DICOM slices read.
    ignored_files
        Files in the folder that are not DICOM (left out).
    tilt_degrees
        Angle between the slice offset and the slice normal (gantry tilt), from the positions;
        ``0.0`` when below :data:`TILT_TOLERANCE_DEGREES`. Corrected when non-zero.
    header_tilt_degrees
        ``GantryDetectorTilt`` as written in the header (``None`` when absent).
    slice_gaps
        ``(smallest, largest)`` distance between neighbouring slices along the normal, mm.
    slice_spacing
        The spacing of the returned volume along the normal, mm.
    resampled_slices
        Whether the gaps differed and the slices were interpolated onto ``slice_spacing``.
    rescaled
        Whether a ``RescaleSlope`` / ``RescaleIntercept`` was applied (CT: values are HU).
    modality
        The header's ``Modality`` (``""`` when absent).
    """

    slices: int
    ignored_files: int
    tilt_degrees: float
    header_tilt_degrees: float | None
    slice_gaps: tuple[float, float]
    slice_spacing: float
    resampled_slices: bool
    rescaled: bool
    modality: str = ""

    def notes(self) -> list[str]:
        """Human-readable notes on the corrections made (empty when none); no patient data."""
        out = []
        if self.tilt_degrees:
            header = (
                f" (header GantryDetectorTilt {self.header_tilt_degrees:g})"
                if self.header_tilt_degrees is not None
                else ""
            )
            out.append(
                f"gantry tilt {self.tilt_degrees:.1f} degrees{header}: slices shifted onto an orthogonal grid"
            )
        if self.resampled_slices:
            out.append(
                f"slice spacing varies ({self.slice_gaps[0]:.3g}-{self.slice_gaps[1]:.3g} mm): resampled to "
                f"{self.slice_spacing:.3g} mm"
            )
        return out


def dicom_image_files(folder: str | Path) -> tuple[list[Path], int]:
    """The DICOM image files directly in ``folder`` (headers only are read) and how many other files.

    ``DICOMDIR``, files pydicom cannot parse as DICOM, and DICOM files without pixel data count
    as other files; subfolders are not searched.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    images, ignored = [], 0
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        if file.name.upper() == "DICOMDIR":
            ignored += 1
            continue
        try:
            ds = pydicom.dcmread(file, defer_size=1024)  # large values (the pixels) stay on disk
        except (InvalidDicomError, OSError):
            ignored += 1
            continue
        if "PixelData" not in ds:
            ignored += 1
            continue
        images.append(file)
    return images, ignored


def _read_headers(folder: Path) -> tuple[list[object], int]:
    """The folder's DICOM datasets (with pixels) and how many files were not DICOM images."""
    import pydicom

    files, ignored = dicom_image_files(folder)
    return [pydicom.dcmread(file) for file in files], ignored


def _vector(ds: object, tag: str, size: int, folder: Path) -> np.ndarray:
    value = getattr(ds, tag, None)
    if value is None or len(value) != size:
        raise DicomSeriesError(
            f"DICOM series {folder}: a slice has no valid {tag}, so its place in the volume is unknown. "
            "Re-export the series from the PACS with full geometry (or give one slice file per entry)."
        )
    return np.asarray([float(v) for v in value], dtype=np.float64)


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray, SeriesInfo]:
    """Read one DICOM series folder as a volume in scanner units with a RAS affine.

    Parameters
    ----------
    folder
        A folder holding the files of one series (other, non-DICOM files are ignored).

    Returns
    -------
    volume
        ``float32`` ``(I, J, K)``: ``I`` along the rows (the ``ImageOrientationPatient`` row
        direction), ``J`` along the columns, ``K`` along the slice normal in increasing
        position. Values after ``RescaleSlope`` / ``RescaleIntercept`` (CT: HU).
    affine
        ``(4, 4)`` voxel-to-world matrix in RAS millimetres (DICOM's LPS with x and y negated),
        orthogonal after tilt correction.
    info
        :class:`SeriesInfo`: slices, tilt, slice gaps, what was corrected.

    Raises
    ------
    DicomSeriesError
        No DICOM slice, several series, missing or inconsistent geometry, slices at one position.
    """
    folder = Path(folder)
    datasets, ignored = _read_headers(folder)
    if not datasets:
        raise DicomSeriesError(
            f"DICOM series {folder}: no DICOM image file found ({ignored} other file(s); subfolders are "
            "not searched). Give the folder that holds the slice files of one exported series."
        )
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DicomSeriesError(
            f"DICOM series {folder}: the folder holds {len(series)} series (SeriesInstanceUID differs). "
            "Put each series in its own folder and give each its own datalist entry."
        )
    first = datasets[0]
    rows, cols = int(first.Rows), int(first.Columns)
    orientation = _vector(first, "ImageOrientationPatient", 6, folder)
    pixel = _vector(first, "PixelSpacing", 2, folder)  # (row spacing, column spacing)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = []
    for ds in datasets:
        same = (
            int(ds.Rows) == rows
            and int(ds.Columns) == cols
            and np.allclose(_vector(ds, "ImageOrientationPatient", 6, folder), orientation, atol=1e-4)
            and np.allclose(_vector(ds, "PixelSpacing", 2, folder), pixel, atol=1e-4)
        )
        if not same:
            raise DicomSeriesError(
                f"DICOM series {folder}: slices differ in size, ImageOrientationPatient or PixelSpacing "
                "(a localizer or a reformat mixed in?). Keep only the slices of one acquisition in the folder."
            )
        positions.append(_vector(ds, "ImagePositionPatient", 3, folder))
    pos = np.stack(positions)
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    pos, depth = pos[order], depth[order]
    datasets = [datasets[i] for i in order]
    gaps = np.diff(depth)
    if len(datasets) > 1 and gaps.min() < 1e-3:
        raise DicomSeriesError(
            f"DICOM series {folder}: two slices share one position along the slice normal (several "
            "phases, echoes or repeats in one series?). Split them into one folder per volume."
        )

    slices = []
    rescaled = False
    for ds in datasets:
        data = ds.pixel_array.astype(np.float32)
        if data.shape != (rows, cols):
            raise DicomSeriesError(
                f"DICOM series {folder}: a slice holds {data.shape} pixels instead of {(rows, cols)} "
                "(a multi-frame file in a slice folder?). Give multi-frame files as single entries."
            )
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            rescaled = True
        slices.append(data * slope + intercept)
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (cols=I, rows=J, K)
    dx, dy = float(pixel[1]), float(pixel[0])  # column spacing along a row, row spacing along a column

    tilt = 0.0
    if len(datasets) > 1:
        offset = pos[-1] - pos[0]
        cosine = abs(float(offset @ normal)) / float(np.linalg.norm(offset))
        tilt = math.degrees(math.acos(min(1.0, cosine)))
        if tilt < TILT_TOLERANCE_DEGREES:
            tilt = 0.0
    if tilt:
        volume = _untilt(volume, pos - pos[0], row_dir=row_dir, col_dir=col_dir, dx=dx, dy=dy)

    spacing = float(np.median(gaps)) if len(gaps) else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    uneven = bool(len(gaps) and (gaps.max() - gaps.min()) > _GAP_TOLERANCE * spacing)
    if uneven:
        volume = _even_slices(volume, depth - depth[0], spacing)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * dx
    lps[:3, 1] = col_dir * dy
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = pos[0]
    header_tilt = getattr(first, "GantryDetectorTilt", None)
    info = SeriesInfo(
        slices=len(datasets),
        ignored_files=ignored,
        tilt_degrees=round(tilt, 2),
        header_tilt_degrees=float(header_tilt) if header_tilt is not None else None,
        slice_gaps=(float(gaps.min()), float(gaps.max())) if len(gaps) else (spacing, spacing),
        slice_spacing=spacing,
        resampled_slices=uneven,
        rescaled=rescaled,
        modality=str(getattr(first, "Modality", "")),
    )
    return volume.astype(np.float32, copy=False), _LPS_TO_RAS @ lps, info


def _untilt(
    volume: np.ndarray, offsets: np.ndarray, *, row_dir: np.ndarray, col_dir: np.ndarray, dx: float, dy: float
) -> np.ndarray:
    """Shift each slice ``(I, J)`` of ``volume (I, J, K)`` by its in-plane offset from slice 0.

    Slice ``k``'s pixel ``(i, j)`` lies at ``offsets[k] + i dx row + j dy col`` (plus the normal
    part); on the orthogonal grid it belongs at ``i + offsets[k].row / dx``, ``j + offsets[k].col / dy``.
    """
    fill = float(volume.min())
    out = np.empty_like(volume)
    for k in range(volume.shape[2]):
        plane = _shift(volume[:, :, k], float(offsets[k] @ row_dir) / dx, axis=0, fill=fill)
        out[:, :, k] = _shift(plane, float(offsets[k] @ col_dir) / dy, axis=1, fill=fill)
    return out


def _shift(plane: np.ndarray, by: float, *, axis: int, fill: float) -> np.ndarray:
    """``out[x] = plane[x - by]`` along ``axis``, linearly interpolated; ``fill`` outside."""
    if abs(by) < 1e-6:
        return plane
    size = plane.shape[axis]
    source = np.arange(size) - by
    low = np.floor(source).astype(np.int64)
    frac = (source - low).astype(np.float32)
    padded = np.concatenate(
        [np.full_like(np.take(plane, [0], axis=axis), fill), plane, np.full_like(np.take(plane, [0], axis=axis), fill)],
        axis=axis,
    )
    lo = np.clip(low, -1, size) + 1  # -1 and size read the fill
    hi = np.clip(low + 1, -1, size) + 1
    shape = [1, 1]
    shape[axis] = size
    frac = frac.reshape(shape)
    return np.take(padded, lo, axis=axis) * (1 - frac) + np.take(padded, hi, axis=axis) * frac


def _even_slices(volume: np.ndarray, depth: np.ndarray, spacing: float) -> np.ndarray:
    """Interpolate ``volume (I, J, K)`` with slices at ``depth`` (mm, increasing) onto a grid of ``spacing``."""
    count = int(round(float(depth[-1]) / spacing)) + 1
    target = np.arange(count) * spacing
    upper = np.clip(np.searchsorted(depth, target, side="right"), 1, len(depth) - 1)
    lower = upper - 1
    weight = np.clip((target - depth[lower]) / (depth[upper] - depth[lower]), 0.0, 1.0).astype(np.float32)
    return volume[:, :, lower] * (1.0 - weight) + volume[:, :, upper] * weight
