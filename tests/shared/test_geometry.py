"""Images in one geometry: the same scan stored flipped, permuted or at another spacing loads the same."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import MetaTensor

from medfed.shared.data.datalist import load_datalist, scan_datalist
from medfed.shared.data.geometry import axis_codes, to_canonical

SHAPE = (20, 24, 17)  # x, y, z at 1 mm; 17 slices so that every second one spans the same 16 mm


def _scan() -> np.ndarray:
    """A smooth, asymmetric blob: mirroring or shifting it moves its centre of mass."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    return np.exp(-((x - 5.0) ** 2 / 18 + (y - 14.0) ** 2 / 30 + (z - 7.0) ** 2 / 40)).astype(np.float32)


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.name


def _variants(folder: Path) -> dict[str, str]:
    """The one scan as RAS 1 mm, flipped x (LAS), flipped x + y (LPS), and 2 mm slices (both orientations)."""
    data = _scan()
    ras = np.eye(4)
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[0, 3] = SHAPE[0] - 1  # voxel 0 of the flipped file is the RAS file's last x voxel
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]
    thick = np.diag([1.0, 1.0, 2.0, 1.0])
    thick_las = las @ np.diag([1.0, 1.0, 2.0, 1.0])
    return {
        "RAS 1 mm": _write(folder / "ras.nii.gz", data, ras),
        "LAS 1 mm": _write(folder / "las.nii.gz", data[::-1].copy(), las),
        "LPS 1 mm": _write(folder / "lps.nii.gz", data[::-1, ::-1].copy(), lps),
        "RAS 2 mm": _write(folder / "ras2.nii.gz", data[:, :, ::2].copy(), thick),
        "LAS 2 mm": _write(folder / "las2.nii.gz", data[::-1, :, ::2].copy(), thick_las),
    }


def _load(folder: Path, names: list[str], **kwargs) -> np.ndarray:
    datalist = folder / "datalist.json"
    entries = [{"image": n, "label": i % 2} for i, n in enumerate(names)]
    datalist.write_text(json.dumps({"training": entries, "validation": entries, "test": entries}))
    return load_datalist(datalist, image_size=0, **kwargs).test.images[:, 0]


def _centre(volume: np.ndarray) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    return np.asarray([(g * volume).sum() / volume.sum() for g in grid])


def test_one_scan_in_two_orientations_and_two_spacings_loads_as_one_array(tmp_path: Path) -> None:
    files = _variants(tmp_path)
    volumes = dict(zip(files, _load(tmp_path, list(files.values()), spacing=(1.0,)), strict=True))
    reference = volumes["RAS 1 mm"]
    assert reference.shape == SHAPE
    for name, volume in volumes.items():
        assert volume.shape == SHAPE, name
        # Linear interpolation of the 2 mm slices: within a few hundredths of the [0, 1] range.
        assert np.abs(volume - reference).max() < (1e-5 if "1 mm" in name else 0.05), name
        np.testing.assert_allclose(_centre(volume), _centre(reference), atol=0.1, err_msg=name)
    # The blob sits at x = 5 (of 0..19): a file loaded without reorientation would put it near 14.
    assert _centre(volumes["LAS 2 mm"])[0] < 6.0


def test_native_spacing_keeps_the_voxels_and_still_reorients(tmp_path: Path) -> None:
    files = _variants(tmp_path)
    las, ras = _load(tmp_path, [files["LAS 2 mm"], files["RAS 2 mm"]])
    assert las.shape == ras.shape == (20, 24, 9)
    np.testing.assert_allclose(las, ras, atol=1e-6)


def test_scan_reports_each_files_stored_orientation_and_spacing(tmp_path: Path) -> None:
    files = _variants(tmp_path)
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": [{"image": f, "label": 0} for f in files.values()]}))
    report = scan_datalist(datalist)  # image_size 0 at native spacing: 1 mm and 2 mm volumes differ in size
    kinds = {p.file: p.kind for p in report.problems}
    assert kinds == {files["RAS 2 mm"]: "shape_mismatch", files["LAS 2 mm"]: "shape_mismatch"}
    geometry = {e.file: (e.orientation, e.spacing) for e in report.entries}
    assert geometry == {
        files["RAS 1 mm"]: ("RAS", (1.0, 1.0, 1.0)),
        files["LAS 1 mm"]: ("LAS", (1.0, 1.0, 1.0)),
        files["LPS 1 mm"]: ("LPS", (1.0, 1.0, 1.0)),
    }
    assert scan_datalist(datalist, spacing=(1.0, 1.0, 1.0)).ok  # resampled to one grid, they all fit


@pytest.mark.parametrize(
    ("affine_diag", "codes"),
    [((1, 1, 1), "RAS"), ((-1, 1, 1), "LAS"), ((-1, -1, 1), "LPS"), ((1, 1, -1), "RAI")],
)
def test_axis_codes(affine_diag: tuple[int, int, int], codes: str) -> None:
    assert axis_codes(np.diag([*affine_diag, 1])) == codes


def test_a_slice_stored_as_a_volume_is_oriented_then_its_slice_axis_dropped(tmp_path: Path) -> None:
    """A coronal slice (axes R, S, A = 1) flipped in x: RAS order is (R, A, S), the A axis goes."""
    plane = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    # stored axes: x -> Left, y -> Superior, z (1 voxel) -> Anterior
    affine = np.array([[-1.0, 0, 0, 5], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    image = MetaTensor(plane[None, :, :, None].copy(), affine=affine)
    out = to_canonical(image, slice_axis=2)
    assert tuple(out.shape) == (1, 6, 5)
    np.testing.assert_array_equal(np.asarray(out[0]), plane[::-1])
    thin = to_canonical(image, slice_axis=2, spacing=(0.5,))
    assert tuple(thin.shape) == (1, 11, 9)  # in-plane resampled, the slice's thickness kept


def test_spacing_with_the_wrong_number_of_values_is_an_entry_problem(tmp_path: Path) -> None:
    files = _variants(tmp_path)
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": [{"image": files["RAS 1 mm"], "label": 0}]}))
    report = scan_datalist(datalist, spacing=(1.0, 2.0))
    assert [p.kind for p in report.problems] == ["spatial_dims"]
    assert "spacing has 2 values" in report.problems[0].reason
