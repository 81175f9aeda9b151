"""``medfed predict``'s library: which images an input path names, the prediction loop, the output files.

Outputs in the chosen folder::

    predictions.csv    one row per image
    predictions.json   {"model": {...}, "predictions": [the same rows]}
    masks/mask-NNNN.nii.gz   segmentation: one mask per image (row NNNN), on the input's grid and affine

Classification rows: ``index``, ``image``, ``label`` (at the validation-chosen threshold for binary
models, else the argmax), ``threshold``, ``probability-0`` .. ``probability-{K-1}`` (summing to 1).
Segmentation rows: ``index``, ``image``, ``mask`` (file name under ``masks/``), ``voxels-0`` ..
``voxels-{K-1}`` (mask voxels per class).

Privacy: rows name the images as the user gave them (they stay in the user's output folder); log
lines name only counts and row indices, never file names or pixel data.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import Inferer

from medfed.shared.data.base import DataError
from medfed.shared.data.datalist import SECTIONS, ModelImage, image_file_kind
from medfed.shared.inference import LoadedModel, ModelShape, Prediction, predict_image

__all__ = [
    "InputImage",
    "PredictionRun",
    "find_inputs",
    "predict_inputs",
    "predict_with",
]

logger = logging.getLogger(__name__)

MASK_DIR = "masks"


@dataclass(frozen=True)
class InputImage:
    """One image to predict.

    Parameters
    ----------
    index
        Row number (0-based), in input order.
    path
        The file or DICOM series folder to read.
    name
        How the input names it: a datalist's ``"image"`` entry, or the path below the input folder.
    """

    index: int
    path: Path
    name: str


@dataclass(frozen=True)
class PredictionRun:
    """What :func:`predict_inputs` wrote."""

    rows: list[dict[str, Any]]
    csv_path: Path
    json_path: Path


def find_inputs(path: str | Path) -> list[InputImage]:
    """The images an input path names, in a stable order.

    Parameters
    ----------
    path
        A datalist ``.json`` (the ``"image"`` of every entry of ``"training"``, ``"validation"``
        and ``"test"``, in that order; labels are not needed), one image file, a DICOM series folder
        (all its files one series), or a folder of images: each NIfTI / PNG / JPEG / single-image
        DICOM file is one image, each subfolder of DICOM files one series. Extensionless files
        count as DICOM when they have the ``DICM`` preamble (as for MONAI's series reader); other
        files are left out, with a warning giving their number.

    Raises
    ------
    DataError
        Naming the path: missing, an unreadable datalist, no images, or a folder mixing DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist. Give a datalist .json, an image file or a folder of images.")
    if path.is_file() and path.suffix.lower() == ".json":
        return _datalist_inputs(path)
    if path.is_file():
        if image_file_kind(path) is None:
            raise DataError(
                f"input {path} is not an image medfed reads. Give NIfTI (.nii, .nii.gz), DICOM (.dcm or a "
                "series folder), PNG/JPEG, or a datalist .json."
            )
        return [InputImage(0, path, str(path))]
    return _folder_inputs(path)


def predict_inputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[InputImage],
    out_dir: str | Path,
    *,
    read: Callable[[Path], ModelImage],
    shape: ModelShape,
    threshold: float | None,
    device: torch.device | str = "cpu",
    model_info: dict[str, Any] | None = None,
    on_image: Callable[[int], None] | None = None,
    inferer: Inferer | None = None,
) -> PredictionRun:
    """Predict every input and write ``predictions.csv``, ``predictions.json`` and masks.

    Parameters
    ----------
    forward
        The network (maps ``(B, C, *shape.spatial_shape)`` to logits).
    inputs
        From :func:`find_inputs`.
    out_dir
        Created if missing.
    read
        Reads and preprocesses one input (:meth:`medfed.shared.inference.Preprocessing.read`, or a
        bundle's preprocessing).
    shape, threshold, device
        As in :func:`medfed.shared.inference.predict_image`.
    model_info
        Written as ``"model"`` in ``predictions.json``.
    on_image
        Called with the row index after each image (a progress bar).
    inferer
        How ``forward`` is applied (default :func:`medfed.shared.inference.make_inferer`).

    Raises
    ------
    DataError
        An input cannot be read or does not fit the model: names its row and file (the whole call
        fails; nothing is left out silently).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shape.task == "segmentation":
        (out / MASK_DIR).mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    for item in inputs:
        try:
            image = read(item.path)
        except DataError as err:
            logger.error("predict: image %d of %d could not be used.", item.index, len(inputs))
            raise DataError(f"input image {item.index} ({item.name}): {err}") from None
        pred = predict_image(forward, image, shape=shape, threshold=threshold, device=device, inferer=inferer)
        rows.append(_row(item, pred, shape=shape, threshold=threshold, out=out))
        if on_image is not None:
            on_image(item.index)
    csv_path, json_path = out / "predictions.csv", out / "predictions.json"
    columns = list(rows[0]) if rows else ["index", "image"]
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"model": model_info or {}, "predictions": rows}, indent=2) + "\n", encoding="utf-8")
    logger.info("predict: %d image(s) predicted.", len(rows))
    return PredictionRun(rows=rows, csv_path=csv_path, json_path=json_path)


def predict_with(
    loaded: LoadedModel,
    inputs: Sequence[InputImage],
    out_dir: str | Path,
    *,
    sliding_window: bool = False,
    on_image: Callable[[int], None] | None = None,
    keep_images: list[np.ndarray] | None = None,
) -> PredictionRun:
    """:func:`predict_inputs` with a checkpoint's model, preprocessing and threshold.

    ``sliding_window``: segmentation only; windows of the training shape over the image at its own
    resolution instead of over the image resized to the training shape. ``keep_images``: receives
    each input's preprocessed ``(C, *spatial)`` model input, in input order (``medfed predict
    --explain`` explains exactly these, without reading the files again).

    Raises
    ------
    ValueError
        ``sliding_window`` with a classification model.
    """
    if sliding_window and loaded.task != "segmentation":
        raise ValueError(
            "sliding-window inference is for segmentation models; this is a classification model, "
            "which sees whole images resized to the training size. Leave out --sliding-window."
        )
    segmentation = loaded.task == "segmentation"

    def read(path: Path) -> ModelImage:
        item = loaded.preprocessing.read(path, keep_size=sliding_window, with_affine=segmentation)
        if keep_images is not None:
            keep_images.append(item.image)
        return item

    info = {
        "checkpoint": loaded.path.name,
        "model": loaded.config.model,
        "round": loaded.round,
        "task": loaded.task,
        "num_classes": loaded.num_classes,
        "input_shape": [loaded.shape.in_channels, *loaded.shape.spatial_shape],
        "threshold": loaded.threshold,
        "threshold_source": loaded.threshold_source,
        "inference": "sliding-window" if sliding_window else "resize",
    }
    return predict_inputs(
        loaded.model, inputs, out_dir, read=read, shape=loaded.shape, threshold=loaded.threshold,
        device=loaded.device, model_info=info, on_image=on_image,
    )


# ---------------------------------------------------------------------------- internals
def _row(item: InputImage, pred: Prediction, *, shape: ModelShape, threshold: float | None, out: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"index": item.index, "image": item.name}
    if shape.task == "classification":
        row["label"] = pred.label
        row["threshold"] = threshold if shape.num_classes == 2 else None
        row.update({f"probability-{k}": float(p) for k, p in enumerate(pred.probabilities)})
        return row
    assert pred.mask is not None
    name = f"mask-{item.index:04d}.nii.gz"
    affine = pred.affine if pred.affine is not None else np.eye(4)
    nib.save(nib.Nifti1Image(pred.mask.astype(np.int16), affine), out / MASK_DIR / name)
    row["mask"] = f"{MASK_DIR}/{name}"
    counts = np.bincount(pred.mask.ravel(), minlength=shape.num_classes)
    row.update({f"voxels-{k}": int(c) for k, c in enumerate(counts)})
    return row


def _datalist_inputs(path: Path) -> list[InputImage]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"Datalist {path} is not valid JSON ({err}). Fix the file.") from None
    if not isinstance(data, dict) or not any(isinstance(data.get(s), list) for s in SECTIONS):
        raise DataError(
            f'Datalist {path} needs a list of {{"image": ...}} entries under "training", "validation" or "test".'
        )
    inputs: list[InputImage] = []
    for section in SECTIONS:
        entries = data.get(section) or []
        if not isinstance(entries, list):
            raise DataError(f'Datalist {path}: "{section}" must be a list of entries.')
        for position, entry in enumerate(entries):
            image = entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(image, str) or not image:
                raise DataError(f'Datalist {path}: entry {section}[{position}] has no "image" path. Fix the entry.')
            file = Path(image)
            inputs.append(InputImage(len(inputs), file if file.is_absolute() else path.parent / file, image))
    if not inputs:
        raise DataError(f"Datalist {path} lists no images.")
    return inputs


def _folder_inputs(folder: Path) -> list[InputImage]:
    children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in children if p.is_file()]
    dicom = [p for p in files if image_file_kind(p) == "DICOM" and (p.suffix or _is_dicom(p))]
    others = [p for p in files if image_file_kind(p) not in (None, "DICOM")]
    series_dirs = [d for d in children if d.is_dir() and any(image_file_kind(f) == "DICOM" for f in d.iterdir() if f.is_file())]
    if dicom and not others and not series_dirs and len(dicom) > 1:
        uids = _series_uids(dicom)
        if len(set(uids)) == 1:
            return [InputImage(0, folder, str(folder))]  # the folder is one DICOM series
        if len(set(uids)) != len(uids):
            raise DataError(
                f"input folder {folder} holds {len(set(uids))} DICOM series in {len(uids)} files. Put each series "
                "in its own subfolder (each subfolder is then one image), or give one series folder."
            )
    skipped = [p for p in files if p not in dicom and p not in others]  # e.g. README.txt, an MD5SUMS file
    if skipped:
        logger.warning("predict: %d file(s) in the input folder are not images and were left out.", len(skipped))
    chosen = sorted([*dicom, *others, *series_dirs])
    if not chosen:
        raise DataError(
            f"input folder {folder} holds no images (NIfTI, DICOM, PNG/JPEG) nor DICOM series subfolders."
        )
    return [InputImage(i, p, str(p.relative_to(folder))) for i, p in enumerate(chosen)]


def _is_dicom(file: Path) -> bool:
    """Whether an extensionless file is DICOM (has the ``DICM`` preamble), as MONAI's series reader decides."""
    import pydicom

    return bool(pydicom.misc.is_dicom(file))


def _series_uids(files: Sequence[Path]) -> list[str]:
    import pydicom

    uids = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # an unreadable file: reading it as an image will name it
            uids.append(f"?{file.name}")
            continue
        uids.append(str(getattr(ds, "SeriesInstanceUID", f"?{file.name}")))
    return uids
