"""Box datalists for object detection: the format, its reader, and converters from Pascal VOC and
the Kvasir-SEG box JSON.

A box datalist is a JSON file whose image paths are relative to the file (or absolute)::

    {"classes": ["Platelets", "RBC", "WBC"],
     "training":   [{"image": "JPEGImages/a.jpg", "boxes": [[xmin, ymin, xmax, ymax], ...],
                     "labels": [1, ...]}, ...],
     "validation": [...], "test": [...]}

Boxes are in pixels of the image file as stored, ``x`` along its width, ``xmin < xmax`` and
``ymin < ymax``; ``labels`` index ``classes``. An image may have no boxes (``[]``). The top-level
``"classes"`` list marks the file as a box datalist. Missing ``validation`` / ``test`` sections are
split off ``training`` by the seed (15% each), stratified by each image's most frequent class.

Bad boxes are never dropped silently: a box that reaches outside its image is **clipped** to the
image, one with no area left (``xmin >= xmax`` or ``ymin >= ymax`` after clipping, e.g. a point)
is **dropped**; both are counted, logged as a warning (counts only, no file names) and returned
by the converters. An unreadable image, or a label outside ``classes``, makes the entry unusable:
``bad-data = "strict"`` stops with every such entry listed by section and index, ``"skip"``
leaves them out and counts them (``DataSplits.skipped_files``).

Images are read with Pillow (PNG or JPEG), converted to RGB (``C = 3``), resized to
``image_size x image_size`` (bilinear) and scaled to ``[0, 1]``; the boxes are scaled with them.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.shared.data.base import DataError, DataSplits, ImageSet

__all__ = [
    "BoxCounts",
    "clean_boxes",
    "is_box_datalist",
    "load_box_datalist",
    "voc_to_datalist",
    "kvasir_boxes_to_datalist",
    "write_datalist",
]

logger = logging.getLogger(__name__)

SECTIONS: tuple[str, ...] = ("training", "validation", "test")
VOC_SPLITS: dict[str, str] = {"training": "train", "validation": "val", "test": "test"}
"""Box-datalist section -> ``ImageSets/Main/<name>.txt`` of a Pascal VOC folder."""


@dataclass
class BoxCounts:
    """What a conversion or a load did to the boxes: counts only."""

    images: int = 0
    boxes: int = 0
    clipped: int = 0
    dropped: int = 0

    def add(self, other: BoxCounts) -> None:
        self.images += other.images
        self.boxes += other.boxes
        self.clipped += other.clipped
        self.dropped += other.dropped

    def warn(self, what: str) -> None:
        """Log a warning when boxes were clipped or dropped (counts, never names)."""
        if self.clipped or self.dropped:
            logger.warning(
                "%s: %d box(es) reached outside their image and were clipped to it; %d box(es) had no "
                "area (a point or a line) and were dropped. %d boxes kept in %d images.",
                what,
                self.clipped,
                self.dropped,
                self.boxes,
                self.images,
            )


def clean_boxes(boxes: np.ndarray, *, width: float, height: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Clip boxes to the image; drop those with no area.

    Parameters
    ----------
    boxes
        ``(M, 4)`` ``[xmin, ymin, xmax, ymax]``.
    width, height
        The image's size in pixels.

    Returns
    -------
    tuple
        ``(boxes (M', 4), kept (M,) bool, clipped, dropped)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    limits = np.array([width, height, width, height], dtype=np.float64)
    clipped_boxes = np.clip(boxes, 0.0, limits)
    changed = np.any(clipped_boxes != boxes, axis=1)
    kept = (clipped_boxes[:, 2] > clipped_boxes[:, 0]) & (clipped_boxes[:, 3] > clipped_boxes[:, 1])
    return clipped_boxes[kept], kept, int(np.sum(changed & kept)), int(np.sum(~kept))


# --------------------------------------------------------------------------- converters
def _relative(image: Path, base: Path) -> str:
    """``image`` relative to ``base`` when possible (the datalist references images in place)."""
    try:
        return os.path.relpath(image.resolve(), base.resolve())
    except ValueError:  # another drive
        return str(image.resolve())


def write_datalist(datalist: dict[str, Any], out: Path) -> None:
    """Write a box datalist JSON (creating its folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(datalist, indent=1) + "\n")


def _voc_annotation(xml_path: Path) -> tuple[str, float, float, list[tuple[str, list[float]]]]:
    root = ET.parse(xml_path).getroot()
    filename = (root.findtext("filename") or "").strip() or f"{xml_path.stem}.jpg"
    width, height = float(root.findtext("size/width") or 0), float(root.findtext("size/height") or 0)
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{xml_path.name}: an <object> has no <bndbox>; fix or remove it.")
        name = (obj.findtext("name") or "").strip()
        objects.append((name, [float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]))
    return filename, width, height, objects


def voc_to_datalist(
    voc_dir: Path, out: Path, *, classes: Sequence[str] | None = None
) -> tuple[dict[str, Any], BoxCounts]:
    """Convert a Pascal VOC folder into a box datalist written to ``out``.

    Parameters
    ----------
    voc_dir
        Holds ``JPEGImages/``, ``Annotations/*.xml`` and ``ImageSets/Main/{train,val,test}.txt``
        (the sections present become ``training`` / ``validation`` / ``test``; without
        ``train.txt`` every annotation goes to ``training``).
    out
        The datalist JSON to write; image paths in it are relative to its folder.
    classes
        Class names in label order (default: the names found, sorted).

    Returns
    -------
    tuple
        The datalist and the box counts (clipped and dropped boxes are logged as well).

    Raises
    ------
    DataError
        A missing folder, an image set naming an absent annotation, or an object class not in
        ``classes``.
    """
    voc_dir = Path(voc_dir)
    annotations, images_dir = voc_dir / "Annotations", voc_dir / "JPEGImages"
    for folder in (annotations, images_dir):
        if not folder.is_dir():
            raise DataError(f"{voc_dir}: no {folder.name}/ folder; a Pascal VOC folder holds JPEGImages/ and Annotations/.")
    sets = voc_dir / "ImageSets" / "Main"
    ids: dict[str, list[str]] = {}
    if (sets / "train.txt").exists():
        for section, name in VOC_SPLITS.items():
            if (sets / f"{name}.txt").exists():
                ids[section] = [line.strip() for line in (sets / f"{name}.txt").read_text().splitlines() if line.strip()]
    else:
        ids["training"] = sorted(p.stem for p in annotations.glob("*.xml"))
    parsed: dict[str, list[tuple[str, float, float, list[tuple[str, list[float]]]]]] = {}
    for section, names in ids.items():
        parsed[section] = []
        for name in names:
            xml_path = annotations / f"{name}.xml"
            if not xml_path.exists():
                raise DataError(
                    f"{voc_dir}: ImageSets/Main/{VOC_SPLITS[section]}.txt names {name!r} but Annotations/{name}.xml "
                    "does not exist."
                )
            parsed[section].append(_voc_annotation(xml_path))
    found = sorted({obj[0] for section in parsed.values() for ann in section for obj in ann[3]})
    class_names = list(classes) if classes else found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(f"{voc_dir}: object classes {unknown} are not in --classes {class_names}; add them.")
    index = {name: i for i, name in enumerate(class_names)}
    counts = BoxCounts()
    datalist: dict[str, Any] = {"classes": class_names}
    for section, annotations_list in parsed.items():
        entries = []
        for filename, width, height, objects in annotations_list:
            raw = np.array([box for _, box in objects], dtype=np.float64).reshape(-1, 4)
            labels = np.array([index[name] for name, _ in objects], dtype=np.int64)
            boxes, kept, clipped, dropped = clean_boxes(raw, width=width, height=height)
            counts.add(BoxCounts(images=1, boxes=len(boxes), clipped=clipped, dropped=dropped))
            entries.append(
                {
                    "image": _relative(images_dir / filename, out.parent),
                    "boxes": [[round(float(v), 2) for v in b] for b in boxes],
                    "labels": labels[kept].tolist(),
                }
            )
        datalist[section] = entries
    counts.warn(f"Pascal VOC folder {voc_dir.name}")
    write_datalist(datalist, out)
    return datalist, counts


def kvasir_boxes_to_datalist(boxes_json: Path, images_dir: Path, out: Path) -> tuple[dict[str, Any], BoxCounts]:
    """Convert Kvasir-SEG's ``kavsir_bboxes.json`` (``{id: {height, width, bbox: [{label, xmin,
    ymin, xmax, ymax}]}}``) into a box datalist (one ``training`` section; validation and test
    are split off by the seed when it is loaded), images ``<images_dir>/<id>.jpg``.

    Raises
    ------
    DataError
        The JSON is not in that shape, or an image it names is missing.
    """
    boxes_json, images_dir = Path(boxes_json), Path(images_dir)
    try:
        raw = json.loads(boxes_json.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{boxes_json.name}: cannot read it as JSON ({err}).") from None
    if not isinstance(raw, dict):
        raise DataError(f"{boxes_json.name}: expected an object {{id: {{height, width, bbox: [...]}}}}.")
    names = sorted({str(b.get("label", "polyp")) for item in raw.values() for b in item.get("bbox", [])}) or ["polyp"]
    index = {name: i for i, name in enumerate(names)}
    counts = BoxCounts()
    entries = []
    for key in sorted(raw):
        item = raw[key]
        image = images_dir / f"{key}.jpg"
        if not image.exists():
            raise DataError(f"{boxes_json.name}: entry {key!r} has no image {image.name} in {images_dir}.")
        bbox = item.get("bbox", [])
        raw_boxes = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in bbox], dtype=np.float64)
        labels = np.array([index[str(b.get("label", "polyp"))] for b in bbox], dtype=np.int64)
        boxes, kept, clipped, dropped = clean_boxes(raw_boxes, width=float(item["width"]), height=float(item["height"]))
        counts.add(BoxCounts(images=1, boxes=len(boxes), clipped=clipped, dropped=dropped))
        entries.append(
            {
                "image": _relative(image, out.parent),
                "boxes": [[round(float(v), 2) for v in b] for b in boxes],
                "labels": labels[kept].tolist(),
            }
        )
    counts.warn(f"Kvasir box file {boxes_json.name}")
    datalist = {"classes": names, "training": entries}
    write_datalist(datalist, out)
    return datalist, counts


# --------------------------------------------------------------------------- reader
def is_box_datalist(path: Path) -> bool:
    """Whether ``path`` is a JSON object with a top-level ``"classes"`` list or ``"task":
    "detection"`` (a box datalist; without ``"classes"`` its reader says what is missing)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (isinstance(data.get("classes"), list) or data.get("task") == "detection")


def _read_image(path: Path, image_size: int) -> tuple[np.ndarray, int, int]:
    """``(3, S, S)`` float32 in ``[0, 1]`` and the original width and height."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        rgb = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.transpose(2, 0, 1)), width, height


def load_box_datalist(
    path: Path,
    *,
    image_size: int,
    seed: int = 0,
    on_error: str = "raise",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> DataSplits:
    """Read a box datalist into detection :class:`ImageSet` s (``task = "detection"``).

    Parameters
    ----------
    path
        The datalist JSON.
    image_size
        Every image is resized to ``image_size x image_size`` (boxes scaled with it).
    seed
        Splits off absent validation / test sections.
    on_error
        ``"raise"``: unusable entries stop the load, all listed; ``"skip"``: left out and counted.

    Raises
    ------
    DataError
        Not a box datalist, no usable training entry, or (``"raise"``) unusable entries.
    """
    from medfed.shared.partition import split_train_val_test

    path = Path(path)
    if image_size <= 0:
        raise DataError(f"dataset {path.name}: a box datalist needs image-size > 0 (e.g. --image-size 256).")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"Datalist {path.name}: cannot read it as JSON ({err}).") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes:
        raise DataError(f"Datalist {path.name}: a box datalist needs a non-empty top-level \"classes\" list.")
    loaded: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    problems: list[str] = []
    counts = BoxCounts()
    for section in SECTIONS:
        entries = data.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise DataError(f"Datalist {path.name}: section {section!r} must be a list of entries.")
        images, targets = [], []
        for i, entry in enumerate(entries):
            try:
                image, target, entry_counts = _load_entry(path.parent, entry, image_size, len(classes))
            except _EntryProblem as err:
                problems.append(f"{section}[{i}]: {err}")
                continue
            counts.add(entry_counts)
            images.append(image)
            targets.append(target)
        loaded[section] = (images, targets)
    if problems and on_error != "skip":
        listed = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(
            f"Datalist {path.name}: {len(problems)} unusable entr{'y' if len(problems) == 1 else 'ies'}:\n"
            f"{listed}{more}\nFix them, or train on the rest with --set bad-data=skip."
        )
    if problems:
        logger.warning("bad-data = skip: %d unusable box-datalist entries left out.", len(problems))
    counts.warn(f"Datalist {path.name}")
    if not loaded.get("training", ([], []))[0]:
        raise DataError(f"Datalist {path.name}: no usable \"training\" entries.")

    def image_set(images: list[np.ndarray], targets: list[np.ndarray]) -> ImageSet:
        stacked = np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.float32)
        boxes = np.empty(len(targets), dtype=object)
        for j, t in enumerate(targets):
            boxes[j] = t
        return ImageSet(stacked, boxes, "detection", len(classes), class_names=tuple(str(c) for c in classes))

    train = image_set(*loaded["training"])
    sets = {"training": train}
    missing = [s for s in ("validation", "test") if s not in loaded]
    if missing:
        tr, va, te = split_train_val_test(
            train.class_labels(),
            val_fraction=val_fraction if "validation" in missing else 0.0,
            test_fraction=test_fraction if "test" in missing else 0.0,
            seed=seed,
        )
        logger.info(
            "Datalist %s has no %s section: split %d training entries into %d/%d/%d (seed %d).",
            path.name, " or ".join(missing), len(train), len(tr), len(va), len(te), seed,
        )
        sets = {"training": train.subset(tr)}
        if "validation" in missing:
            sets["validation"] = train.subset(va)
        if "test" in missing:
            sets["test"] = train.subset(te)
    for section in ("validation", "test"):
        if section not in sets:
            sets[section] = image_set(*loaded[section])
    return DataSplits(train=sets["training"], val=sets["validation"], test=sets["test"], skipped_files=len(problems))


class _EntryProblem(Exception):
    """One unusable entry (the message names the problem, not the file's path)."""


def _load_entry(base: Path, entry: Any, image_size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, BoxCounts]:
    if not isinstance(entry, dict) or "image" not in entry:
        raise _EntryProblem("not an object with an \"image\" key")
    boxes_raw, labels_raw = entry.get("boxes", []), entry.get("labels", [])
    if not isinstance(boxes_raw, list) or not isinstance(labels_raw, list) or len(boxes_raw) != len(labels_raw):
        raise _EntryProblem("\"boxes\" and \"labels\" must be lists of the same length")
    try:
        boxes = np.asarray(boxes_raw, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(labels_raw, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError):
        raise _EntryProblem("each box must be 4 numbers [xmin, ymin, xmax, ymax] and each label an integer") from None
    if not np.all(np.isfinite(boxes)):
        raise _EntryProblem("a box has a non-finite coordinate")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _EntryProblem(f"a label is outside [0, {num_classes}) (the \"classes\" list)")
    image_path = Path(entry["image"])
    if not image_path.is_absolute():
        image_path = base / image_path
    if not image_path.is_file():
        raise _EntryProblem(f"image file {image_path.name!r} does not exist")
    try:
        image, width, height = _read_image(image_path, image_size)
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise _EntryProblem(f"image {image_path.name!r} cannot be read as PNG/JPEG ({type(err).__name__})") from None
    kept_boxes, kept, clipped, dropped = clean_boxes(boxes, width=width, height=height)
    scale = np.array([image_size / width, image_size / height] * 2)
    target = np.concatenate([kept_boxes * scale, labels[kept, None].astype(np.float64)], axis=1).astype(np.float32)
    return image, target.reshape(-1, 5), BoxCounts(images=1, boxes=len(kept_boxes), clipped=clipped, dropped=dropped)
