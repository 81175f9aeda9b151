"""Box datalists: Pascal VOC and Kvasir conversion, bad boxes counted, the reader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.shared.data.base import DataError
from medfed.shared.data.boxes import (
    clean_boxes,
    is_box_datalist,
    kvasir_boxes_to_datalist,
    load_box_datalist,
    voc_to_datalist,
)
from medfed.shared.data.loading import load_dataset
from tests.support.boxes import write_box_datalist

_OBJECT = "<object><name>{name}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax><ymax>{3}</ymax></bndbox></object>"


def _voc(folder: Path, annotations: dict[str, list[tuple[str, tuple[int, int, int, int]]]], splits: dict[str, list[str]]) -> Path:
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "Annotations").mkdir()
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    for name, objects in annotations.items():
        Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(folder / "JPEGImages" / f"{name}.jpg")
        body = "".join(_OBJECT.format(*box, name=cls) for cls, box in objects)
        (folder / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>80</width><height>40</height>"
            f"<depth>3</depth></size>{body}</annotation>"
        )
    for split, names in splits.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return folder


@pytest.mark.parametrize(
    ("box", "expected", "clipped", "dropped"),
    [
        ([10, 5, 20, 15], [[10, 5, 20, 15]], 0, 0),
        ([-5, 5, 20, 50], [[0, 5, 20, 40]], 1, 0),  # outside: clipped to 80 x 40
        ([30, 30, 30, 30], [], 0, 1),  # a point
        ([90, 5, 95, 15], [], 0, 1),  # wholly outside: nothing left
        ([20, 5, 10, 15], [], 0, 1),  # xmin > xmax
    ],
)
def test_clean_boxes(box: list[int], expected: list[list[int]], clipped: int, dropped: int) -> None:
    kept_boxes, kept, n_clipped, n_dropped = clean_boxes(np.array([box]), width=80, height=40)
    assert kept_boxes.tolist() == expected
    assert (n_clipped, n_dropped) == (clipped, dropped)
    assert kept.tolist() == [bool(expected)]


def test_voc_conversion_counts_bad_boxes_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    voc = _voc(
        tmp_path / "voc",
        {
            "a": [("RBC", (10, 5, 30, 20)), ("WBC", (50, 10, 90, 30)), ("RBC", (12, 12, 12, 12))],
            "b": [("Platelets", (1, 1, 9, 9))],
            "c": [],
        },
        {"train": ["a", "c"], "val": ["b"], "test": ["b"]},
    )
    out = tmp_path / "lists" / "bccd.json"
    with caplog.at_level(logging.WARNING):
        datalist, counts = voc_to_datalist(voc, out)
    assert (counts.images, counts.boxes, counts.clipped, counts.dropped) == (4, 4, 1, 1)
    assert "1 box(es) reached outside" in caplog.text and "1 box(es) had no area" in caplog.text
    assert datalist["classes"] == ["Platelets", "RBC", "WBC"]
    first = datalist["training"][0]
    assert first["boxes"] == [[10, 5, 30, 20], [50, 10, 80, 30]] and first["labels"] == [1, 2]
    assert datalist["training"][1] == {"image": "../voc/JPEGImages/c.jpg", "boxes": [], "labels": []}
    assert json.loads(out.read_text()) == datalist and is_box_datalist(out)

    splits = load_box_datalist(out, image_size=32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 1, 1)
    assert splits.train.task == "detection" and splits.train.num_classes == 3
    assert splits.train.images.shape == (2, 3, 32, 32)
    # boxes scale with the image: 80 x 40 -> 32 x 32
    np.testing.assert_allclose(splits.train.targets[0], [[4, 4, 12, 16, 1], [20, 8, 32, 24, 2]])
    assert splits.train.targets[1].shape == (0, 5)
    assert splits.train.class_labels().tolist() == [1, 0]


def test_voc_unknown_image_set_entry(tmp_path: Path) -> None:
    voc = _voc(tmp_path / "voc", {"a": [("RBC", (1, 1, 5, 5))]}, {"train": ["a", "zz"]})
    with pytest.raises(DataError, match=r"names 'zz' but Annotations/zz.xml does not exist"):
        voc_to_datalist(voc, tmp_path / "x.json")


def test_kvasir_conversion_and_split(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    raw = {}
    for i in range(10):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / f"id{i}.jpg")
        raw[f"id{i}"] = {"height": 20, "width": 30, "bbox": [{"label": "polyp", "xmin": 2, "ymin": 3, "xmax": 40, "ymax": 9}]}
    (tmp_path / "boxes.json").write_text(json.dumps(raw))
    datalist, counts = kvasir_boxes_to_datalist(tmp_path / "boxes.json", images, tmp_path / "kvasir.json")
    assert datalist["classes"] == ["polyp"] and len(datalist["training"]) == 10
    assert (counts.boxes, counts.clipped, counts.dropped) == (10, 10, 0)
    assert datalist["training"][0]["boxes"] == [[2, 3, 30, 9]]
    splits = load_box_datalist(tmp_path / "kvasir.json", image_size=32, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 2)
    assert splits.num_classes == 1


def test_bad_entries_listed_or_skipped(tmp_path: Path) -> None:
    path = write_box_datalist(tmp_path, train=4, val=1, test=1, size=32)
    data = json.loads(path.read_text())
    data["training"][1]["labels"] = [7] * len(data["training"][1]["boxes"])
    data["training"][2]["image"] = "missing.png"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        load_box_datalist(path, image_size=32)
    message = str(info.value)
    assert "2 unusable entries" in message and "training[1]: a label is outside [0, 2)" in message
    assert "training[2]: image file 'missing.png' does not exist" in message and "bad-data=skip" in message
    splits = load_box_datalist(path, image_size=32, on_error="skip")
    assert len(splits.train) == 2 and splits.skipped_files == 2


def test_detection_task_without_classes_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"task": "detection", "training": [{"image": "a.png", "boxes": [], "labels": []}]}))
    assert is_box_datalist(path)
    with pytest.raises(DataError, match=r"needs a non-empty top-level \"classes\" list"):
        load_box_datalist(path, image_size=32)


def test_load_dataset_routes_box_datalists(tmp_path: Path) -> None:
    from medfed.shared.config import RunConfig

    path = write_box_datalist(tmp_path, train=3, val=1, test=1, size=32)
    splits = load_dataset(RunConfig(dataset=str(path), image_size=32))
    assert splits.task == "detection" and splits.train.class_names == ("square", "bar")
