"""MONAI datalist reader on real NIfTI / DICOM / PNG files written by the tests."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfed.shared.data.base import DataError
from medfed.shared.data.datalist import DatalistProblem, load_datalist, scan_datalist

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


# ------------------------------------------------------------------------------ helpers
def _nifti(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path.name


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _datalist(folder: Path, content: dict[str, Any], name: str = "datalist.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(content))
    return path


def _dicom(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:  # pragma: no cover - pydicom ships these files
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return str(path)


def _cls_2d(folder: Path, n: int = 10) -> list[dict[str, Any]]:
    """2D NIfTI images of varying sizes and intensity ranges, labels 0/1."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        shape = (20 + i, 24 - i % 3)
        img = (rng.random(shape) * (100 + 1000 * i) - 50).astype(np.float32)
        _nifti(folder / "img" / f"c{i}.nii.gz", img)
        entries.append({"image": f"img/c{i}.nii.gz", "label": i % 2})
    return entries


def _seg_3d(
    folder: Path, n: int = 3, shape: tuple[int, ...] = (10, 12, 14)
) -> list[dict[str, Any]]:
    """3D NIfTI volumes with a bright box and its binary mask."""
    rng = np.random.default_rng(1)
    entries = []
    for i in range(n):
        img = rng.random(shape).astype(np.float32) * 100
        mask = np.zeros(shape, dtype=np.uint8)
        mask[2:6, 3:8, 4 + i : 9 + i] = 1
        img[mask == 1] += 300
        _nifti(folder / "vol" / f"v{i}.nii.gz", img)
        _nifti(folder / "vol" / f"v{i}_mask.nii.gz", mask)
        entries.append({"image": f"vol/v{i}.nii.gz", "label": f"vol/v{i}_mask.nii.gz"})
    return entries


# ------------------------------------------------------------------------------ happy paths
def test_nifti_2d_classification_split_from_training(tmp_path: Path) -> None:
    path = _datalist(tmp_path, {"training": _cls_2d(tmp_path, 10)})
    splits = load_datalist(path, image_size=16, seed=0)
    assert splits.task == "classification" and splits.num_classes == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 2)
    for s in (splits.train, splits.val, splits.test):
        assert s.images.shape[1:] == (1, 16, 16)
        assert s.images.dtype == np.float32 and s.targets.dtype == np.int64
        assert s.images.min() >= 0.0 and s.images.max() <= 1.0
    # per-image scaling: every image spans (close to) the full [0, 1] range
    spans = splits.train.images.reshape(6, -1)
    assert (spans.max(axis=1) > 0.8).all() and (spans.min(axis=1) < 0.2).all()
    # deterministic by seed; another seed splits differently
    again = load_datalist(path, image_size=16, seed=0)
    np.testing.assert_array_equal(splits.test.images, again.test.images)
    others = [load_datalist(path, image_size=16, seed=s).test.images for s in (1, 2, 3)]
    assert any(not np.array_equal(o, splits.test.images) for o in others)


def test_nifti_3d_segmentation_with_sections(tmp_path: Path) -> None:
    entries = _seg_3d(tmp_path, 5)
    path = _datalist(
        tmp_path,
        {
            "training": entries[:3],
            "validation": entries[3:4],
            "test": entries[4:],
            "num_classes": 2,
        },
    )
    splits = load_datalist(path, image_size=8)
    assert splits.task == "segmentation" and splits.num_classes == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 1)
    assert splits.train.images.shape == (3, 1, 8, 8, 8)
    assert splits.train.targets.shape == (3, 1, 8, 8, 8)
    assert set(np.unique(splits.train.targets)) == {0, 1}  # nearest: still class indices
    # foreground voxels are the bright ones
    img, mask = splits.train.images, splits.train.targets
    assert img[mask == 1].mean() > img[mask == 0].mean() + 0.3


def test_nifti_2d_segmentation_absolute_paths_and_single_slice_volume(tmp_path: Path) -> None:
    img = np.zeros((20, 20, 1), dtype=np.float32)  # one slice stored as a volume -> 2D
    img[5:10, 5:10] = 1
    _nifti(tmp_path / "s.nii.gz", img)
    _nifti(tmp_path / "s_mask.nii.gz", (img > 0).astype(np.uint8))
    entry = {"image": str(tmp_path / "s.nii.gz"), "label": str(tmp_path / "s_mask.nii.gz")}
    sub = tmp_path / "lists"
    sub.mkdir()
    path = _datalist(sub, {"training": [entry] * 3, "validation": [entry], "test": [entry]})
    splits = load_datalist(path, image_size=10)
    assert splits.train.images.shape == (3, 1, 10, 10)
    assert splits.train.targets.shape == (3, 1, 10, 10)


def test_dicom_slices_stay_2d_and_series_folder_is_3d(tmp_path: Path) -> None:
    ct, mr = _dicom("CT_small.dcm"), _dicom("MR_small.dcm")
    path = _datalist(
        tmp_path,
        {
            "training": [{"image": ct, "label": 0}, {"image": mr, "label": 1}] * 2,
            "validation": [{"image": ct, "label": 0}],
            "test": [{"image": mr, "label": 1}],
        },
    )
    splits = load_datalist(path, image_size=32)
    assert splits.train.spatial_dims == 2
    assert splits.train.images.shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(splits.train.targets, [0, 1, 0, 1])
    assert splits.train.images.max() <= 1.0 and splits.train.images.min() >= 0.0

    from pydicom.uid import generate_uid

    series = tmp_path / "series"
    series.mkdir()
    series_uid = generate_uid()
    for i in range(4):
        ds = pydicom.dcmread(ct)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.save_as(series / f"slice{i}.dcm")
    path = _datalist(
        tmp_path,
        {"training": [{"image": "series", "label": 0}, {"image": "series", "label": 1}] * 2},
        "series.json",
    )
    splits = load_datalist(path, image_size=8, val_fraction=0.25, test_fraction=0.25)
    assert splits.train.spatial_dims == 3
    assert splits.train.images.shape[1:] == (1, 8, 8, 8)


def test_png_grey_and_spatial_dims_argument(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    entries = []
    for i in range(6):
        _png(tmp_path / "png" / f"p{i}.png", rng.integers(0, 256, size=(30, 40), dtype=np.uint8))
        entries.append({"image": f"png/p{i}.png", "label": i % 3})
    path = _datalist(tmp_path, {"training": entries, "num_classes": 4})
    splits = load_datalist(path, image_size=12, spatial_dims=2, val_fraction=0.2, test_fraction=0.2)
    assert splits.num_classes == 4  # declared wins over max label + 1
    assert splits.train.images.shape[1:] == (1, 12, 12)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 6
    with pytest.raises(DataError, match=r"png/p0\.png.*2D but the dataset is 3D"):
        load_datalist(path, image_size=12, spatial_dims=3)


def test_image_size_zero_keeps_size_if_uniform(tmp_path: Path) -> None:
    entries = _seg_3d(tmp_path, 3)
    path = _datalist(
        tmp_path, {"training": entries, "validation": entries[:1], "test": entries[:1]}
    )
    splits = load_datalist(path, image_size=0)
    assert splits.train.images.shape == (3, 1, 10, 12, 14)
    varying = _datalist(tmp_path, {"training": _cls_2d(tmp_path, 4)}, "varying.json")
    with pytest.raises(DataError, match=r"c1\.nii\.gz.*has size.*image-size > 0.*--image-size"):
        load_datalist(varying, image_size=0)


# ------------------------------------------------------------------------------ problems
@pytest.fixture()
def broken(tmp_path: Path) -> tuple[Path, set[tuple[str, int, str, str]]]:
    """A datalist with good entries and one planted problem of each kind.

    Returns the datalist and the expected ``(section, index, file basename, kind)`` set.
    """
    good = _cls_2d(tmp_path, 8)
    (tmp_path / "img" / "corrupt.nii.gz").write_bytes(os.urandom(400))
    raw = (tmp_path / "img" / "c0.nii.gz").read_bytes()
    (tmp_path / "img" / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "img" / "text.dcm").write_text("this is not DICOM")
    _nifti(tmp_path / "img" / "vol.nii.gz", np.random.rand(6, 6, 6).astype(np.float32))
    _png(tmp_path / "img" / "rgb.png", np.zeros((20, 20, 3), dtype=np.uint8) + 7)
    training = good[:6] + [
        {"image": "img/missing.nii.gz", "label": 0},  # 6
        {"image": "img/corrupt.nii.gz", "label": 1},  # 7
        {"image": "img/trunc.nii.gz", "label": 0},  # 8
        {"image": "img/text.dcm", "label": 1},  # 9
        {"image": "img/c1.nii.gz", "label": 5},  # 10 out of range
        {"image": "img/c2.nii.gz", "label": "1"},  # 11 not an int
        {"image": "img/vol.nii.gz", "label": 0},  # 12 3D among 2D
        {"image": "img/rgb.png", "label": 0},  # 13 3 channels among 1
        {"image": "img/c3.nii.gz"},  # 14 no label
        {"image": "img/notes.txt", "label": 0},  # 15 unsupported
    ]
    validation = [good[6], {"image": "img/c4.nii.gz", "label": -1}]
    test = [{"image": "img/gone.nii.gz", "label": 1}, good[7]]
    path = _datalist(
        tmp_path,
        {"training": training, "validation": validation, "test": test, "num_classes": 2},
        "broken.json",
    )
    (tmp_path / "img" / "notes.txt").write_text("hello")
    expected = {
        ("training", 6, "missing.nii.gz", "missing_file"),
        ("training", 7, "corrupt.nii.gz", "unreadable"),
        ("training", 8, "trunc.nii.gz", "unreadable"),
        ("training", 9, "text.dcm", "unreadable"),
        ("training", 10, "c1.nii.gz", "label_out_of_range"),
        ("training", 11, "c2.nii.gz", "bad_label"),
        ("training", 12, "vol.nii.gz", "spatial_dims"),
        ("training", 13, "rgb.png", "channels"),
        ("training", 14, "c3.nii.gz", "bad_entry"),
        ("training", 15, "notes.txt", "unsupported_file"),
        ("validation", 1, "c4.nii.gz", "label_out_of_range"),
        ("test", 0, "gone.nii.gz", "missing_file"),
    }
    return path, expected


def test_scan_reports_each_planted_problem(broken: tuple[Path, set]) -> None:
    path, expected = broken
    report = scan_datalist(path, image_size=16)
    found = {
        (p.section, p.index, Path(p.file).name if p.file else "", p.kind) for p in report.problems
    }
    assert found == expected
    assert report.entries_ok == 8
    assert report.entries_total == 8 + len(expected)
    assert not report.ok
    assert all(isinstance(p, DatalistProblem) for p in report.problems)
    for p in report.problems:
        if p.file:
            assert p.file in p.reason  # each reason names its file
    # the summary is for logs: counts and positions, no file names
    summary = report.summary()
    assert "12 problem(s)" in summary and "training[6]" in summary
    assert ".nii" not in summary and ".dcm" not in summary


@pytest.mark.parametrize(
    ("name", "index", "section", "phrase"),
    [
        ("missing.nii.gz", 6, "training", "not found"),
        ("corrupt.nii.gz", 7, "training", "could not be read as NIfTI"),
        ("trunc.nii.gz", 8, "training", "could not be read as NIfTI"),
        ("text.dcm", 9, "training", "could not be read as DICOM"),
        ("c1.nii.gz", 10, "training", "out of range"),
        ("gone.nii.gz", 0, "test", "not found"),
    ],
)
def test_raise_names_datalist_entry_file_and_fix(
    broken: tuple[Path, set], name: str, index: int, section: str, phrase: str
) -> None:
    path, _ = broken
    with pytest.raises(DataError) as info:
        load_datalist(path, image_size=16)
    message = str(info.value)
    assert str(path) in message
    line = next(ln for ln in message.splitlines() if f"{section}[{index}]" in ln)
    assert name in line and phrase in line
    assert "--set bad-data=skip" in message and "on_error" not in message  # the key a user types


def test_skip_mode_skips_exactly_the_bad_entries(
    broken: tuple[Path, set], caplog: pytest.LogCaptureFixture
) -> None:
    path, expected = broken
    with caplog.at_level(logging.WARNING, logger="medfed.shared.data.datalist"):
        splits = load_datalist(path, image_size=16, on_error="skip")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 1, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"8 of {8 + len(expected)} entries ok, {len(expected)} problem(s)" in warnings[0]
    assert "missing.nii.gz" not in warnings[0]  # no patient file names in logs


def test_segmentation_mask_problems(tmp_path: Path) -> None:
    entries = _seg_3d(tmp_path, 3)
    _nifti(tmp_path / "vol" / "small_mask.nii.gz", np.zeros((5, 5, 5), dtype=np.uint8))
    _nifti(tmp_path / "vol" / "frac_mask.nii.gz", np.full((10, 12, 14), 0.5, dtype=np.float32))
    _nifti(tmp_path / "vol" / "three_mask.nii.gz", np.full((10, 12, 14), 3, dtype=np.uint8))
    bad = [
        {"image": "vol/v0.nii.gz", "label": "vol/small_mask.nii.gz"},
        {"image": "vol/v1.nii.gz", "label": "vol/frac_mask.nii.gz"},
        {"image": "vol/v2.nii.gz", "label": "vol/three_mask.nii.gz"},
        {"image": "vol/v2.nii.gz", "label": 1},
        {"image": "vol/v2.nii.gz", "label": "vol/none_mask.nii.gz"},
    ]
    path = _datalist(tmp_path, {"training": entries + bad, "num_classes": 2})
    report = scan_datalist(path, image_size=8)
    got = [(p.index, p.kind, Path(p.file).name) for p in report.problems]
    assert got == [
        (3, "shape_mismatch", "small_mask.nii.gz"),
        (4, "bad_mask", "frac_mask.nii.gz"),
        (5, "label_out_of_range", "three_mask.nii.gz"),
        (6, "bad_label", "v2.nii.gz"),
        (7, "missing_file", "none_mask.nii.gz"),
    ]
    assert report.task == "segmentation" and report.spatial_dims == 3
    with pytest.raises(DataError, match=r"small_mask\.nii\.gz.*spatial shape"):
        load_datalist(path, image_size=8)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ('{"validation": []}', '"training" list'),
        ('{"training": [{"image": "a.nii.gz", "label": 0}], "num_classes": 1}', "num_classes"),
        ('{"training": [{"image": "a.nii.gz", "label": [0, 1]}]}', "cannot infer the task"),
        ('{"training": [{"image": "a.nii.gz", "label": "1"}]}', "cannot infer the task"),
    ],
)
def test_datalist_level_errors(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "dl.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        load_datalist(path, image_size=8)
    assert "dl.json" in str(info.value)


def test_all_entries_of_a_section_bad_in_skip_mode(tmp_path: Path) -> None:
    good = _cls_2d(tmp_path, 4)
    path = _datalist(
        tmp_path, {"training": good, "test": [{"image": "img/nope.nii.gz", "label": 0}]}
    )
    with pytest.raises(DataError, match="no usable entries left in section 'test'"):
        load_datalist(path, image_size=8, on_error="skip")
