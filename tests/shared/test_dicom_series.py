"""A DICOM series folder read as one volume: slice order, HU, tilt, refusals; the real GE head CT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medfed.shared.data.datalist import scan_datalist
from medfed.shared.data.dicom_series import DicomSeriesError, read_dicom_series
from medfed.shared.data.geometry import axis_codes
from tests.support.medmnist import medmnist_dir

ROWS, COLS = 6, 8


def _slice(
    path: Path,
    pixels: np.ndarray,
    *,
    position: tuple[float, float, float],
    instance: int,
    series: str,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series, instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.SliceThickness = "2"
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, count: int = 5, *, tilt_degrees: float = 0.0, gaps: list[float] | None = None) -> np.ndarray:
    """Write ``count`` slices, file names and instance numbers in the reverse of their position order.

    Returns the stored pixels ``(count, ROWS, COLS)`` in position order (slice k holds value 100 k + pixel).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    steps = gaps or [2.0] * (count - 1)
    depth = np.concatenate([[0.0], np.cumsum(steps)])
    shear = math.tan(math.radians(tilt_degrees))
    stored = []
    for k in range(count):
        pixels = 100 * k + np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS)
        stored.append(pixels)
        # Tilted: each slice is displaced along the column direction (y) as it goes up in z.
        position = (0.0, float(depth[k]) * shear, float(depth[k]))
        _slice(folder / f"{count - k:02d}.dcm", pixels, position=position, instance=count - k, series=series)
    (folder / "MD5SUMS").write_text("not dicom\n")
    return np.stack(stored)


def test_slices_are_ordered_by_position_and_rescaled_to_hu(tmp_path: Path) -> None:
    stored = _series(tmp_path / "ct")
    volume, affine, info = read_dicom_series(tmp_path / "ct")
    assert volume.shape == (COLS, ROWS, 5)
    # I along the rows (x), J along the columns (y), K by position along the normal, minus 1024 HU.
    np.testing.assert_array_equal(volume, stored.transpose(2, 1, 0).astype(np.float32) - 1024.0)
    assert (info.slices, info.ignored_files, info.tilt_degrees, info.resampled_slices) == (5, 1, 0.0, False)
    assert info.rescaled and info.modality == "CT" and info.notes() == []
    np.testing.assert_allclose(np.diag(affine), [-0.5, -0.5, 2.0, 1.0])  # LPS -> RAS: x and y negated


def test_gantry_tilt_is_measured_corrected_and_reported(tmp_path: Path) -> None:
    _series(tmp_path / "ct", tilt_degrees=14.0)
    volume, affine, info = read_dicom_series(tmp_path / "ct")
    assert info.tilt_degrees == pytest.approx(14.0, abs=0.05)
    assert "gantry tilt 14.0 degrees" in info.notes()[0]
    # Slice 4 lies 8 tan(14) mm = 3.99 pixels further along y (0.5 mm pixels): shifted back onto slice 0's grid.
    shift = 8 * math.tan(math.radians(14.0)) / 0.5
    stored = 400 + np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) - 1024.0  # rows (J) x cols (I)
    assert np.all(volume[:, :3, 4] == volume.min())  # moved in from outside the field of view: filled
    fraction = 5 - shift - 1  # output row 5 reads input row 5 - shift, between rows 1 and 2
    np.testing.assert_allclose(volume[:, 5, 4], stored[1] * (1 - fraction) + stored[2] * fraction, rtol=1e-5)
    np.testing.assert_array_equal(volume[:, :, 0], stored[:, :].T - 400)  # slice 0 is the reference: untouched
    np.testing.assert_allclose(affine[:3, 2], [0.0, 0.0, 2.0], atol=1e-6)  # an orthogonal grid


def test_uneven_slice_gaps_are_resampled_to_the_median(tmp_path: Path) -> None:
    _series(tmp_path / "ct", count=5, gaps=[2.0, 2.0, 4.0, 2.0])
    volume, _, info = read_dicom_series(tmp_path / "ct")
    assert info.resampled_slices and info.slice_gaps == (2.0, 4.0) and info.slice_spacing == 2.0
    assert volume.shape[2] == 6  # 0..10 mm every 2 mm
    # The new slice at 6 mm lies halfway between the slices at 4 and 8 mm (values 200 and 300 apart by 100).
    np.testing.assert_allclose(volume[:, :, 3], (volume[:, :, 2] + volume[:, :, 4]) / 2)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("two_series", "holds 2 series"),
        ("same_position", "share one position"),
        ("no_position", "no valid ImagePositionPatient"),
        ("empty", "no DICOM image file"),
    ],
)
def test_what_is_not_one_series_is_refused_with_the_reason(tmp_path: Path, spoil: str, message: str) -> None:
    folder = tmp_path / "ct"
    pixels = np.zeros((ROWS, COLS), dtype=np.uint16)
    folder.mkdir()
    if spoil == "two_series":
        _slice(folder / "a.dcm", pixels, position=(0, 0, 0), instance=1, series=generate_uid())
        _slice(folder / "b.dcm", pixels, position=(0, 0, 2), instance=2, series=generate_uid())
    elif spoil == "same_position":
        uid = generate_uid()
        _slice(folder / "a.dcm", pixels, position=(0, 0, 0), instance=1, series=uid)
        _slice(folder / "b.dcm", pixels, position=(0, 0, 0), instance=2, series=uid)
    elif spoil == "no_position":
        _series(folder, count=3)
        from pydicom import dcmread

        ds = dcmread(folder / "02.dcm")
        del ds.ImagePositionPatient
        ds.save_as(folder / "02.dcm")
    else:
        (folder / "notes.txt").write_text("x")
    with pytest.raises(DicomSeriesError, match=message):
        read_dicom_series(folder)


def test_a_datalist_entry_names_a_series_folder_and_the_report_says_what_was_corrected(tmp_path: Path) -> None:
    _series(tmp_path / "ct", tilt_degrees=10.0)
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": [{"image": "ct", "label": 1}]}))
    report = scan_datalist(datalist)
    assert report.ok and report.spatial_dims == 3
    (entry,) = report.entries
    assert entry.orientation == "LPS" and entry.shape == (COLS, ROWS, 5)
    assert entry.notes and "gantry tilt 10.0 degrees" in entry.notes[0]


def test_a_folder_with_one_image_reads_as_that_file(tmp_path: Path) -> None:
    """A 2D DICOM is used as stored, in a folder or not (no reorientation of a radiograph or one slice)."""
    (tmp_path / "one").mkdir()
    pixels = np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS)
    _slice(tmp_path / "one" / "x.dcm", pixels, position=(0, 0, 0), instance=1, series=generate_uid())
    _slice(tmp_path / "x.dcm", pixels, position=(0, 0, 0), instance=1, series=generate_uid())
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": [{"image": "one", "label": 0}, {"image": "x.dcm", "label": 1}]}))
    report = scan_datalist(datalist)
    assert report.ok and report.spatial_dims == 2
    assert [(e.shape, e.orientation) for e in report.entries] == [((COLS, ROWS), None)] * 2


@pytest.mark.data
def test_the_real_ge_head_ct_loads_as_one_volume_in_hu_with_its_tilt_reported() -> None:
    folder = medmnist_dir().parent / "dicom" / "ct-head-ge"
    if not folder.is_dir():
        pytest.skip(f"needs the GE head CT series in {folder} (the project's shared/data/dicom beside the clone)")
    volume, affine, info = read_dicom_series(folder)
    assert info.slices == 28 and info.ignored_files == 1  # MD5SUMS
    assert info.tilt_degrees == pytest.approx(18.5, abs=0.05) and info.header_tilt_degrees == 18.5
    # 4 mm slices through the skull base, then 7 mm: resampled to the median, 4 mm.
    assert info.resampled_slices and info.slice_spacing == pytest.approx(4.0, abs=0.01)
    assert volume.shape == (512, 512, 37)
    assert volume.min() == -1500.0  # the padding value, in HU
    air, brain = np.percentile(volume[volume > -1500], [5, 60])
    assert air < -900 and 0 < brain < 80  # air and soft tissue where HU puts them
    assert axis_codes(affine) == "LPS"
    columns = affine[:3, :3]  # orthogonal (tilt corrected), oblique like the slices: 18.5 degrees from z
    np.testing.assert_allclose(np.linalg.norm(columns, axis=0), [0.48828, 0.48828, 4.0], atol=0.01)
    np.testing.assert_allclose(columns.T @ columns, np.diag(np.diag(columns.T @ columns)), atol=1e-6)
    normal = columns[:, 2] / np.linalg.norm(columns[:, 2])
    assert math.degrees(math.acos(abs(normal[2]))) == pytest.approx(18.5, abs=0.05)
