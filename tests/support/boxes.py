"""Tiny synthetic box datalists for detection tests: bright rectangles on a dark background."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["square", "bar"]


def write_box_datalist(
    folder: Path, *, train: int = 12, val: int = 4, test: int = 4, size: int = 64, seed: int = 0
) -> Path:
    """Write ``train + val + test`` PNG images (``size`` px, RGB) with 1-2 objects each and a
    box datalist ``boxes.json`` referencing them; return its path.

    Class 0 ("square") is a bright square, class 1 ("bar") a wide bar; boxes are exact.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[dict]] = {}
    for section, count in (("training", train), ("validation", val), ("test", test)):
        entries = []
        for i in range(count):
            image = np.full((size, size, 3), 20, dtype=np.uint8)
            boxes, labels = [], []
            for _ in range(int(rng.integers(1, 3))):
                label = int(rng.integers(0, 2))
                w, h = (size // 4, size // 4) if label == 0 else (size // 2, size // 8)
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                image[y : y + h, x : x + w] = (230, 200, 60) if label == 0 else (60, 200, 230)
                boxes.append([x, y, x + w, y + h])
                labels.append(label)
            name = f"{section}-{i}.png"
            Image.fromarray(image).save(folder / name)
            entries.append({"image": name, "boxes": boxes, "labels": labels})
        sections[section] = entries
    path = folder / "boxes.json"
    path.write_text(json.dumps({"classes": CLASSES, **sections}))
    return path
