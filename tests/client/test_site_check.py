"""``medfed site check``: every planted problem in a datalist is found and named."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfed.client.site_check import check_site, format_report
from tests.support.deploy_support import MEDFED


def _nifti(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...] = (0.8, 0.8, 1.0), value: float = 1.0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).random(shape).astype(np.float32) * value
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0][:3] + [1.0])), str(path))
    return path.name


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A classification datalist with one of each planted problem among good entries."""
    root = tmp_path / "site"
    good = [_nifti(root / f"good{i}.nii.gz", (16, 16)) for i in range(6)]
    _nifti(root / "other-size.nii.gz", (20, 16))
    _nifti(root / "thick.nii.gz", (16, 16), spacing=(2.5, 2.5, 1.0))
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a NIfTI file")
    entries = [{"image": name, "label": i % 2} for i, name in enumerate(good)]
    entries += [
        {"image": "missing.nii.gz", "label": 0},
        {"image": "corrupt.nii.gz", "label": 1},
        {"image": good[0], "label": 7},  # label out of range (num_classes = 2)
        {"image": "other-size.nii.gz", "label": 0},  # inconsistent shape
        {"image": "thick.nii.gz", "label": 1},
    ]
    validation = [{"image": _nifti(root / f"val{i}.nii.gz", (16, 16)), "label": i} for i in range(2)]
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": validation, "num_classes": 2}))
    return path


def _by_kind(report) -> dict[str, list]:
    kinds: dict[str, list] = {}
    for finding in report.findings:
        kinds.setdefault(finding.kind, []).append(finding)
    return kinds


def test_every_planted_problem_is_found_and_named(planted: Path) -> None:
    report = check_site(planted)
    kinds = _by_kind(report)
    assert not report.ok
    assert [(f.where, f.file) for f in kinds["missing_file"]] == [("training[6]", "missing.nii.gz")]
    assert [(f.where, f.file) for f in kinds["unreadable"]] == [("training[7]", "corrupt.nii.gz")]
    assert [(f.where, f.file) for f in kinds["label_out_of_range"]] == [("training[8]", "good0.nii.gz")]
    assert "7" in kinds["label_out_of_range"][0].message
    assert [(f.where, f.file) for f in kinds["shape_mismatch"]] == [("training[9]", "other-size.nii.gz")]
    assert "(20, 16)" in kinds["shape_mismatch"][0].message
    assert {f.severity for f in report.errors} == {"error"} and len(report.errors) == 4

    text = format_report(report)
    for name in ("missing.nii.gz", "corrupt.nii.gz", "good0.nii.gz", "other-size.nii.gz"):
        assert name in text
    assert "NOT OK" in text


def test_report_counts_classes_shapes_and_spacings(planted: Path) -> None:
    report = check_site(planted)
    assert report.task == "classification" and report.spatial_dims == 2 and report.num_classes == 2
    assert report.entries_total == 13 and report.entries_ok == 9
    assert report.splits["training"] == {"entries": 7, "class 0": 3, "class 1": 4}
    assert report.splits["validation"] == {"entries": 2, "class 0": 1, "class 1": 1}
    assert report.shapes == {"16x16": 9}
    assert report.spacings == {"0.8 x 0.8": 8, "2.5 x 2.5": 1}
    spacing = _by_kind(report)["inconsistent_spacing"]
    assert [(f.severity, f.file) for f in spacing] == [("warning", "thick.nii.gz")]


def test_resized_runs_turn_other_sizes_into_named_warnings(planted: Path) -> None:
    report = check_site(planted, image_size=16)
    kinds = _by_kind(report)
    assert "shape_mismatch" not in kinds
    assert [(f.severity, f.file) for f in kinds["inconsistent_shape"]] == [("warning", "other-size.nii.gz")]


def test_conflicting_duplicates_and_federation_classes(tmp_path: Path) -> None:
    root = tmp_path / "site"
    names = [_nifti(root / f"img{i}.nii.gz", (8, 8)) for i in range(4)]
    entries = [{"image": n, "label": i % 2} for i, n in enumerate(names)]
    entries.append({"image": names[0], "label": 1})  # same file, other label
    entries.append({"image": names[2], "label": 0})  # same file, same label
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    report = check_site(path, num_classes=2)
    kinds = _by_kind(report)
    assert [(f.file, f.where) for f in kinds["conflicting_labels"]] == [("img0.nii.gz", "training[0], training[4]")]
    assert [(f.severity, f.file) for f in kinds["duplicate_entry"]] == [("warning", "img2.nii.gz")]
    assert check_site(path, num_classes=2).ok is False

    single = root / "single.json"
    single.write_text(json.dumps({"training": [{"image": n, "label": 1} for n in names[:2]]}))
    # A federation with 3 classes: class 2 never appears here (a warning, not an error).
    report = check_site(single, num_classes=3)
    assert report.ok
    assert "missing_class" in _by_kind(report)


def test_segmentation_reports_mask_presence_and_values_above_num_classes(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    entries = []
    for i in range(3):
        image = _nifti(root / f"ct{i}.nii.gz", (8, 8, 4), spacing=(1.0, 1.0, 3.0))
        mask = np.zeros((8, 8, 4), dtype=np.float32)
        if i:
            mask[2:4, 2:4, 1] = i  # mask 2 holds class 2
        nib.save(nib.Nifti1Image(mask, np.diag([1.0, 1.0, 3.0, 1.0])), str(root / f"ct{i}-mask.nii.gz"))
        entries.append({"image": image, "label": f"ct{i}-mask.nii.gz"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    report = check_site(path, num_classes=2)
    assert report.task == "segmentation" and report.spatial_dims == 3
    assert report.splits["training"] == {"entries": 3, "background only": 1, "with foreground": 2}
    assert report.spacings == {"1 x 1 x 3": 3}
    out_of_range = _by_kind(report)["label_out_of_range"]
    assert [f.file for f in out_of_range] == ["ct2.nii.gz"]


def test_missing_datalist_is_one_clear_error(tmp_path: Path) -> None:
    report = check_site(tmp_path / "nope.json")
    assert not report.ok and report.findings[0].kind == "datalist"
    assert "does not exist" in report.findings[0].message


def test_cli_prints_the_report_and_fails_on_errors(planted: Path, tmp_path: Path) -> None:
    site_toml = tmp_path / "site.toml"
    site_toml.write_text(f'site-name = "a"\ndatalist = "{planted}"\n')
    proc = subprocess.run([MEDFED, "site", "check", "--config", str(site_toml)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    for name in ("missing.nii.gz", "corrupt.nii.gz", "other-size.nii.gz", "label_out_of_range"):
        assert name in proc.stdout
    payload = json.loads(check_site(planted).to_json())  # what --json prints
    assert payload["ok"] is False and payload["entries_ok"] == 9
    assert {f["file"] for f in payload["findings"] if f["severity"] == "error"} == {
        "missing.nii.gz", "corrupt.nii.gz", "good0.nii.gz", "other-size.nii.gz"
    }
