"""Datalists for public segmentation sets, read in place: ISBI 2012 EM, Kvasir-SEG, a BraTS 2015 subset.

:func:`segmentation_datalist` writes a MONAI-style datalist (see :mod:`medfed.shared.data.datalist`)
whose entries point at the dataset's own files (absolute paths; nothing is copied), with a
``"site"`` source on every entry where the data suggests one (``partition = "source"`` gives
each simulated site one source). ``medfed data segmentation-datalist`` runs it.

Layouts (:data:`LAYOUTS`; the choices are explained in ``docs/segmentation.md``):

``isbi2012``
    ``train/image/<i>.png`` + ``train/label/<i>.png``, 30 serial EM sections of one volume
    (512 x 512). The target is the membrane: label 0 (``mask_binarize`` foreground
    ``"below"`` 128). Sources: three contiguous slice ranges (0-9, 10-19, 20-29), as three
    labs imaging neighbouring parts of a tissue block would; within each range, in slice
    order, 6 sections train, 2 validate and 2 test.
``kvasir``
    ``images/<id>.jpg`` + ``masks/<id>.jpg`` (RGB colonoscopy frames of varying size, JPEG masks
    thresholded at 128). Kvasir-SEG records no device or centre; the frame width stands in for
    the capture set-up: ``width-lt-600`` (298 images), ``width-600-623`` (514),
    ``width-ge-624`` (188). Within each source a seeded shuffle puts 70 % in training, 15 % in
    validation, 15 % in test.
``brats``
    ``brats2015TrainingData/{train,validation,test}/<patient>/`` with ``Flair_subtrMeanDivStd``
    and ``T1c_subtrMeanDivStd`` (two channels, ``"image": [flair, t1c]``) and ``OTMultiClass``
    (labels 0-4; ``"num_classes": 5``). The folders give the sections; each training patient is
    its own source (``site-a``, ``site-b``: a patient per hospital, the only split two training
    patients allow). Validation and test entries carry no source.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medfed.shared.data.base import DataError
from medfed.shared.files import write_atomically

__all__ = ["LAYOUTS", "segmentation_datalist", "write_segmentation_datalist"]

logger = logging.getLogger(__name__)

ISBI_RANGES: tuple[tuple[int, int], ...] = ((0, 10), (10, 20), (20, 30))
"""ISBI slice ranges ``[start, stop)``, one source each."""
ISBI_ROLES: tuple[str, ...] = ("training",) * 6 + ("validation",) * 2 + ("test",) * 2
"""The section of each slice of a range, in slice order."""

KVASIR_WIDTHS: tuple[tuple[str, int, int], ...] = (
    ("width-lt-600", 0, 600),
    ("width-600-623", 600, 624),
    ("width-ge-624", 624, 1 << 30),
)
"""Kvasir sources: frame width ``[low, high)`` in pixels."""
KVASIR_FRACTIONS = (0.7, 0.15)
"""Training and validation shares per source (the rest is test)."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist: is --root the dataset's folder? See docs/segmentation.md.")
    return path


def _isbi(root: Path, *, seed: int, limit: int) -> dict[str, Any]:
    images, labels = _need(root / "train" / "image", "ISBI image folder"), _need(root / "train" / "label", "ISBI label folder")
    sections: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for start, stop in ISBI_RANGES:
        for offset, index in enumerate(range(start, stop)):
            image, label = images / f"{index}.png", labels / f"{index}.png"
            _need(image, "ISBI image")
            _need(label, "ISBI label")
            sections[ISBI_ROLES[offset]].append(
                {"image": str(image), "label": str(label), "site": f"slices-{start:02d}-{stop - 1:02d}"}
            )
    return {**sections, "num_classes": 2, "mask_binarize": {"threshold": 128, "foreground": "below"}}


def _kvasir(root: Path, *, seed: int, limit: int) -> dict[str, Any]:
    from PIL import Image

    images, masks = _need(root / "images", "Kvasir image folder"), _need(root / "masks", "Kvasir mask folder")
    files = sorted(images.glob("*.jpg"))
    if not files:
        raise DataError(f"Kvasir image folder {images} holds no .jpg files.")
    by_source: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in KVASIR_WIDTHS}
    for image in files:
        mask = _need(masks / image.name, "Kvasir mask")
        with Image.open(image) as im:
            width = im.size[0]
        name = next(n for n, low, high in KVASIR_WIDTHS if low <= width < high)
        by_source[name].append({"image": str(image), "label": str(mask), "site": name})
    rng = np.random.default_rng(seed)
    sections: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for name, entries in by_source.items():
        order = rng.permutation(len(entries))
        if limit:
            order = order[: max(3, round(limit * len(entries) / len(files)))]
        n_train = round(KVASIR_FRACTIONS[0] * len(order))
        n_val = max(1, round(KVASIR_FRACTIONS[1] * len(order)))
        for position, i in enumerate(order):
            section = "training" if position < n_train else "validation" if position < n_train + n_val else "test"
            sections[section].append(entries[i])
    return {**sections, "num_classes": 2, "mask_binarize": {"threshold": 128, "foreground": "above"}}


def _brats(root: Path, *, seed: int, limit: int) -> dict[str, Any]:
    base = root / "brats2015TrainingData" if (root / "brats2015TrainingData").is_dir() else root
    sections: dict[str, list[dict[str, Any]]] = {}
    for section, folder in (("training", "train"), ("validation", "validation"), ("test", "test")):
        patients = sorted(p for p in _need(base / folder, "BraTS folder").iterdir() if p.is_dir())
        entries = []
        for k, patient in enumerate(patients):
            files = [_need(patient / f"{m}_subtrMeanDivStd.nii.gz", "BraTS channel") for m in ("Flair", "T1c")]
            entry: dict[str, Any] = {
                "image": [str(f) for f in files],
                "label": str(_need(patient / "OTMultiClass.nii.gz", "BraTS label")),
            }
            if section == "training":
                entry["site"] = f"site-{chr(ord('a') + k)}"
            entries.append(entry)
        sections[section] = entries
    return {**sections, "num_classes": 5}


LAYOUTS: dict[str, Callable[..., dict[str, Any]]] = {"isbi2012": _isbi, "kvasir": _kvasir, "brats": _brats}
"""Layout name -> datalist builder."""


def segmentation_datalist(layout: str, *, root: str | Path, seed: int = 0, limit: int = 0) -> dict[str, Any]:
    """The datalist of one public segmentation set, as a JSON-ready dict (absolute file paths).

    Parameters
    ----------
    layout
        One of :data:`LAYOUTS`.
    root
        The dataset's folder (e.g. ``../shared/data/segmentation/kvasir-seg``).
    seed
        Kvasir: seeds the per-source split into sections.
    limit
        Kvasir: keep about this many images in all (each source keeps its share, at least 3);
        0: all. Other layouts ignore it.

    Raises
    ------
    DataError
        Unknown layout (listing the valid ones) or missing files (naming the path).
    """
    if layout not in LAYOUTS:
        raise DataError(f"layout {layout!r} is unknown. Valid layouts: {', '.join(LAYOUTS)}.")
    root = Path(root).expanduser().resolve()
    _need(root, "dataset folder")
    return LAYOUTS[layout](root, seed=seed, limit=limit)


def write_segmentation_datalist(
    layout: str, *, root: str | Path, out: str | Path, seed: int = 0, limit: int = 0
) -> dict[str, int]:
    """Write :func:`segmentation_datalist` to ``out``; returns the entries per section."""
    data = segmentation_datalist(layout, root=root, seed=seed, limit=limit)
    text = json.dumps(data, indent=1) + "\n"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda fh: fh.write(text.encode()), mode=0o644)
    counts = {s: len(data[s]) for s in ("training", "validation", "test")}
    logger.info("wrote %s datalist: %s", layout, counts)
    return counts
