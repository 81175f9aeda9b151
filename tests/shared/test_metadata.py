"""Datalist metadata (sex, age, scanner...): kept per entry by the loader, coded into subgroups
whose codes pass the egress rules, and never a value that looks like an identifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medfed.client.egress import allowed_name
from medfed.shared.data.base import DataError, ImageSet
from medfed.shared.data.datalist import load_datalist
from medfed.shared.data.metadata import entry_metadata, subgroup_code, subgroup_label, subgroup_rank

CODES: list[tuple[str, Any, str | None]] = [
    ("sex", "F", "f"),
    ("sex", "female", "f"),
    ("sex", " M ", "m"),
    ("sex", "X", "other"),
    ("sex", "unknown", None),
    ("sex", True, None),
    ("age", 12, "lt40"),
    ("age", 39.9, "lt40"),
    ("age", 40, "40to59"),
    ("age", 59, "40to59"),
    ("age", 60, "60plus"),
    ("age", "063Y", "60plus"),  # a DICOM age string
    ("age", "018M", "lt40"),  # 18 months
    ("age", "sixty", None),
    ("age", -3, None),
    ("age", float("nan"), None),
    ("scanner", "Siemens Skyra", "siemens-skyra"),
    ("scanner", "GE Signa 1.5T", "ge-signa-1-5t"),
    ("scanner", "SN 1234567", None),  # a serial number: a run of more than 3 digits
    ("scanner", "A1-B2-C3-D4-E5", None),  # more than 4 digits in all
    ("scanner", "a very long scanner model name", None),  # longer than 20 characters
    ("scanner", "!!!", None),
    ("scanner", {"model": "x"}, None),
    ("manufacturer", "Philips", "philips"),
]


@pytest.mark.parametrize(("key", "value", "code"), CODES)
def test_subgroup_codes(key: str, value: Any, code: str | None) -> None:
    assert subgroup_code(key, value) == code
    if code is not None:  # a code passes the egress rules inside the longest metric name a site sends
        assert allowed_name(f"xsite-sg-99-{'manufacturer'}-{code}")


def test_labels_and_order() -> None:
    assert [subgroup_label("sex", c) for c in ("f", "m", "other")] == ["F", "M", "other"]
    assert [subgroup_label("age", c) for c in ("lt40", "40to59", "60plus")] == ["<40", "40-59", "60+"]
    assert subgroup_label("scanner", "ge-signa") == "ge-signa"
    shown = [("scanner", "b"), ("age", "60+"), ("sex", "M"), ("age", "<40"), ("sex", "F"), ("scanner", "a")]
    assert sorted(shown, key=lambda kv: subgroup_rank(*kv)) == [
        ("sex", "F"), ("sex", "M"), ("age", "<40"), ("age", "60+"), ("scanner", "a"), ("scanner", "b")
    ]


def test_entry_metadata_keeps_only_the_known_keys() -> None:
    entry = {"image": "a.png", "label": 1, "sex": "F", "age": 50, "patient_id": "P123", "scanner": None}
    assert entry_metadata(entry) == {"sex": "F", "age": 50}


def _datalist(folder: Path, n: int = 24) -> Path:
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(6, 6), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        entry: dict[str, Any] = {"image": f"img/{i}.png", "label": i % 2, "age": 20 + i}
        if i % 3:
            entry["sex"] = "F" if i % 2 else "M"
        entries.append(entry)
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


def test_the_loader_keeps_each_entrys_metadata_through_the_split(tmp_path: Path) -> None:
    splits = load_datalist(_datalist(tmp_path), image_size=6, seed=0)
    seen = []
    for part in (splits.train, splits.val, splits.test):
        assert part.metadata is not None and len(part.metadata) == len(part)
        seen += [dict(m) for m in part.metadata]
    assert sorted(m["age"] for m in seen) == list(range(20, 44))  # every entry, each once
    for m in seen:  # the metadata stayed with its own entry (sex where i % 3, by label parity)
        i = m["age"] - 20
        assert ("sex" in m) == bool(i % 3) and m.get("sex", "F" if i % 2 else "M") == ("F" if i % 2 else "M")
    sub = splits.train.subset(np.array([2, 0]))
    assert sub.metadata == (splits.train.metadata[2], splits.train.metadata[0])
    assert sub.with_num_classes(3).metadata == sub.metadata


def test_image_sets_without_metadata_and_a_mismatch() -> None:
    images, targets = np.zeros((3, 1, 4, 4), np.float32), np.zeros(3, np.int64)
    plain = ImageSet(images, targets, "classification", 2)
    assert plain.metadata is None and plain.subset(np.array([1])).metadata is None
    with pytest.raises(DataError, match="3 images but 2 metadata entries"):
        ImageSet(images, targets, "classification", 2, ({}, {}))
