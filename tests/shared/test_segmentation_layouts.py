"""``medfed data segmentation-datalist`` on the real ISBI 2012, Kvasir-SEG and BraTS subset folders (data tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.data.base import DataError
from medfed.shared.data.datalist import load_datalist
from medfed.shared.data.layouts import segmentation_datalist
from tests.support.segmentation_data import needs, segmentation_dir

pytestmark = pytest.mark.data


@needs("isbi2012-em")
def test_isbi_datalist_by_slice_range_with_membranes_as_foreground(tmp_path: Path) -> None:
    out = tmp_path / "isbi.json"
    result = CliRunner().invoke(app, ["data", "segmentation-datalist", "--layout", "isbi2012", "--root",
                                      str(segmentation_dir() / "isbi2012-em"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "18 training, 6 validation, 6 test" in result.output
    splits = load_datalist(out, image_size=64)
    assert sorted(set(splits.train.sources)) == ["slices-00-09", "slices-10-19", "slices-20-29"]
    assert list(splits.val.sources) == ["slices-00-09"] * 2 + ["slices-10-19"] * 2 + ["slices-20-29"] * 2
    membrane = float(splits.train.targets.mean())  # label 0 (dark) is the foreground: about a fifth of the pixels
    assert 0.1 < membrane < 0.4


@needs("kvasir-seg")
def test_kvasir_datalist_thresholded_masks_and_width_sources() -> None:
    data = segmentation_datalist("kvasir", root=segmentation_dir() / "kvasir-seg")
    sections = [data[s] for s in ("training", "validation", "test")]
    assert [len(s) for s in sections] == [701, 150, 149]
    entries = [e for s in sections for e in s]
    sizes = {name: sum(e["site"] == name for e in entries) for name in ("width-lt-600", "width-600-623", "width-ge-624")}
    assert sizes == {"width-lt-600": 298, "width-600-623": 514, "width-ge-624": 188}
    assert len({e["image"] for e in entries}) == 1000 and all(Path(e["label"]).is_file() for e in entries[:5])
    assert data["mask_binarize"] == {"threshold": 128, "foreground": "above"}  # JPEG masks: tested in test_segmentation_data


@needs("brats2015-subset")
def test_brats_datalist_two_channels_five_classes_one_source_per_training_patient() -> None:
    data = segmentation_datalist("brats", root=segmentation_dir() / "brats2015-subset")
    assert [len(data[s]) for s in ("training", "validation", "test")] == [2, 2, 2]
    assert data["num_classes"] == 5
    assert all(len(e["image"]) == 2 and "Flair" in e["image"][0] and "T1c" in e["image"][1]
               for s in ("training", "validation", "test") for e in data[s])  # fmt: skip
    assert [e["site"] for e in data["training"]] == ["site-a", "site-b"]
    assert all("site" not in e for e in data["test"])


def test_an_unknown_layout_or_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Valid layouts: isbi2012, kvasir, brats"):
        segmentation_datalist("drive", root=tmp_path)
    with pytest.raises(DataError, match="ISBI image folder .* does not exist"):
        segmentation_datalist("isbi2012", root=tmp_path)
    result = CliRunner().invoke(app, ["data", "segmentation-datalist", "--layout", "kvasir", "--root", str(tmp_path),
                                      "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert result.exit_code == 2 and "Kvasir image folder" in result.output
