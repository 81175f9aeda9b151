"""Segmentation datalists: multi-channel images, binarized JPEG/0-255 masks, per-entry sources; partition = source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfed.shared.data.base import DataError
from medfed.shared.data.datalist import load_datalist, scan_datalist
from medfed.shared.partition import site_partitions


def _nifti(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path.name


def _write(folder: Path, content: dict[str, Any]) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def _two_channel_volumes(tmp_path: Path, n: int = 4) -> list[dict[str, Any]]:
    """``n`` entries of two NIfTI channels (channel 0 dark everywhere, channel 1 bright) and a 0-2 mask."""
    entries = []
    for i in range(n):
        a = np.zeros((8, 8, 8), np.float32)
        b = np.full((8, 8, 8), 10.0, np.float32)
        b[:4] = 5.0
        mask = np.zeros((8, 8, 8), np.float32)
        mask[2:4, 2:4, 2:4] = 1
        mask[5:7, 5:7, 5:7] = 2
        _nifti(tmp_path / f"p{i}" / "flair.nii.gz", a)
        _nifti(tmp_path / f"p{i}" / "t1c.nii.gz", b)
        _nifti(tmp_path / f"p{i}" / "seg.nii.gz", mask)
        entries.append({"image": [f"p{i}/flair.nii.gz", f"p{i}/t1c.nii.gz"], "label": f"p{i}/seg.nii.gz"})
    return entries


def test_multichannel_image_list_stacks_the_files_in_order(tmp_path: Path) -> None:
    entries = _two_channel_volumes(tmp_path)
    path = _write(tmp_path, {"training": entries[:2], "validation": entries[2:3], "test": entries[3:],
                             "num_classes": 3})  # fmt: skip
    splits = load_datalist(path, image_size=8)
    assert splits.train.images.shape == (2, 2, 8, 8, 8)
    assert splits.train.in_channels == 2 and splits.num_classes == 3
    # one ScaleIntensityd over both channels: flair (0) is the minimum, t1c (5 / 10) the top
    assert splits.train.images[0, 0].max() == 0.0
    assert splits.train.images[0, 1].max() == pytest.approx(1.0)
    assert set(np.unique(splits.train.targets).tolist()) == {0, 1, 2}
    assert splits.train.sources is None


def test_multichannel_files_of_different_grids_are_reported(tmp_path: Path) -> None:
    entries = _two_channel_volumes(tmp_path, n=2)
    _nifti(tmp_path / "p1" / "t1c.nii.gz", np.zeros((8, 8, 6), np.float32))
    report = scan_datalist(_write(tmp_path, {"training": entries}), image_size=8)
    assert [(p.where, p.kind, p.file) for p in report.problems] == [("training[1]", "shape_mismatch", "p1/t1c.nii.gz")]


@pytest.mark.parametrize(
    ("foreground", "expected_share"),
    [("above", 0.25), ("below", 0.75)],  # a bright quarter: foreground above, or the dark rest (membranes)
)
def test_mask_binarize_turns_rgb_jpeg_masks_into_class_masks(tmp_path: Path, foreground: str, expected_share: float) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(3):
        img = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        mask = np.full((16, 16, 3), 3, np.uint8)  # JPEG-like noise around 0 and 255
        mask[:8, :8] = 251
        Image.fromarray(img).save(tmp_path / f"i{i}.jpg")
        Image.fromarray(mask).save(tmp_path / f"m{i}.jpg", quality=90)
        entries.append({"image": f"i{i}.jpg", "label": f"m{i}.jpg", "site": f"s{i % 2}"})
    content = {"training": entries[:1], "validation": entries[1:2], "test": entries[2:],
               "mask_binarize": {"threshold": 128, "foreground": foreground}}  # fmt: skip
    splits = load_datalist(_write(tmp_path, content), image_size=16)
    assert splits.train.images.shape == (1, 3, 16, 16)  # RGB kept
    targets = splits.test.targets
    assert set(np.unique(targets).tolist()) == {0, 1}
    assert targets.mean() == pytest.approx(expected_share, abs=0.03)
    assert splits.val.sources.tolist() == ["s1"] and splits.train.subset(np.array([0])).sources.tolist() == ["s0"]


def test_without_mask_binarize_a_jpeg_mask_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "i.jpg")
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(tmp_path / "m.jpg")
    report = scan_datalist(_write(tmp_path, {"training": [{"image": "i.jpg", "label": "m.jpg"}]}), image_size=8)
    assert [p.kind for p in report.problems] == ["bad_mask"]


@pytest.mark.parametrize(
    "spec", [128, {"threshold": "x"}, {"threshold": 1, "foreground": "left"}, {"threshold": 1, "extra": 2}]
)
def test_bad_mask_binarize_names_the_key_and_fix(tmp_path: Path, spec: Any) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "i.png")
    with pytest.raises(DataError, match='"mask_binarize".*"threshold": 128'):
        load_datalist(_write(tmp_path, {"training": [{"image": "i.png", "label": "i.png"}], "mask_binarize": spec}),
                      image_size=8)  # fmt: skip


def test_source_partition_gives_each_site_one_source() -> None:
    train_sources = np.array(["b", "a", "c", "a", "b", "c", "a"], dtype=object)
    val_sources = np.array(["c", "a", "b"], dtype=object)
    labels = np.ones(7, np.int64)
    parts = site_partitions(labels, np.ones(3, np.int64), num_sites=3, method="source", alpha=0.5, seed=0,
                            train_sources=train_sources, val_sources=val_sources)  # fmt: skip
    assert [p.tolist() for p in parts.train] == [[1, 3, 6], [0, 4], [2, 5]]  # a, b, c
    assert [p.tolist() for p in parts.val] == [[1], [2], [0]]
    with pytest.raises(ValueError, match=r"3 sources \(a, b, c\) but num-sites = 2. Use --sites 3"):
        site_partitions(labels, np.ones(3, np.int64), num_sites=2, method="source", alpha=0.5, seed=0,
                        train_sources=train_sources)  # fmt: skip
    with pytest.raises(ValueError, match='give every datalist entry a "site"'):
        site_partitions(labels, np.ones(3, np.int64), num_sites=3, method="source", alpha=0.5, seed=0)
