"""MONAI-style datalist JSON -> :class:`~medfed.shared.data.base.DataSplits`.

A datalist looks like::

    {
      "training":   [{"image": "img/a.nii.gz", "label": 1}, ...],
      "validation": [...],            # optional
      "test":       [...],            # optional
      "num_classes": 2                # optional
    }

* ``"image"`` is a path relative to the JSON file's folder (absolute paths work too): NIfTI
  (``.nii``, ``.nii.gz``), DICOM (one ``.dcm`` file, or a folder holding one series), or
  PNG/JPEG. A list of paths (``["flair.nii.gz", "t1c.nii.gz"]``) is one multi-channel image:
  the files' channels are stacked in list order; they must share one spatial shape.
* ``"site"`` (optional, a string) names the source of the entry (scanner, hospital, slice
  range); ``partition = "source"`` gives each simulated site one source
  (:attr:`~medfed.shared.data.base.ImageSet.sources`).
* ``"mask_binarize"`` (optional, top level): ``{"threshold": 128, "foreground": "above"}``
  turns masks that are not stored as class indices (JPEG masks, 0/255 label images) into
  binary class masks: foreground (1) where the value (averaged over the mask's channels) is at
  or above the threshold (``"above"``) or below it (``"below"``, e.g. dark membranes on a
  white label image).
* ``"label"`` is an integer class (classification) or the path of a mask file with integer
  class indices, 0 = background (segmentation). The task is inferred from the first training
  entry unless given.
* A missing (or empty) ``"validation"`` / ``"test"`` section is carved out of ``"training"``
  with a seeded, class-stratified split.

Images are read with MONAI ``LoadImage(image_only=True, ensure_channel_first=True)`` (a DICOM
folder with :func:`~medfed.shared.data.dicom_series.read_dicom_series`: slices ordered along
their normal, rescaled to HU, gantry tilt and uneven slice spacing corrected and reported).
NIfTI files and DICOM volumes are then brought to one geometry
(:func:`~medfed.shared.data.geometry.to_canonical`): MONAI ``Orientation`` to RAS, always, and
``Spacing`` to ``spacing`` mm when asked (masks nearest-neighbour); PNG/JPEG and 2D DICOM are
used as stored (``docs/images.md``). Then a MONAI dictionary ``Compose``: ``ScaleIntensityd``
(per image, to ``[0, 1]``) and ``Resized`` to ``image_size`` per side (masks with
``mode="nearest"``). A 3D file holding a single slice (``H x W x 1``) counts as 2D, as does a
single DICOM slice.

Every entry is checked (:func:`scan_datalist`): missing or unreadable files, labels that are
not integers or out of range, masks that do not match their image, inconsistent spatial
dimensions or channel counts. :func:`load_datalist` either raises one :class:`DataError`
listing every problem (``on_error="raise"``) or leaves the bad entries out with a warning
(``on_error="skip"``).

Privacy: messages never contain pixel values. Exceptions and :class:`DatalistProblem` name the
offending files (the site operator needs them to fix the data, and they stay on the site);
log lines name only sections, entry indices and problem kinds, never patient file names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import Compose, LoadImage, Resized, ScaleIntensityd, Spacing
from monai.utils import convert_to_numpy

from medfed.shared.config import TASKS
from medfed.shared.data.base import DataError, DataSplits, ImageSet, Task
from medfed.shared.data.dicom_series import DicomSeriesError, dicom_image_files, read_dicom_series
from medfed.shared.data.geometry import axis_codes, to_canonical
from medfed.shared.data.metadata import entry_metadata
from medfed.shared.partition import split_train_val_test

__all__ = [
    "SECTIONS",
    "DatalistProblem",
    "DatalistReport",
    "EntryInfo",
    "UnusableEntriesError",
    "load_datalist",
    "scan_datalist",
]

logger = logging.getLogger(__name__)

SECTIONS: tuple[str, ...] = ("training", "validation", "test")
_SPLIT_NAMES = {"training": "train", "validation": "val", "test": "test"}
_MAX_LISTED = 20  # problems spelled out in one exception message

ProblemKind = Literal[
    "bad_entry",
    "missing_file",
    "unsupported_file",
    "unreadable",
    "bad_label",
    "label_out_of_range",
    "bad_mask",
    "shape_mismatch",
    "spatial_dims",
    "channels",
]


@dataclass(frozen=True)
class DatalistProblem:
    """One datalist entry that cannot be used.

    Parameters
    ----------
    index
        Position of the entry in its section (0-based).
    section
        ``"training"``, ``"validation"`` or ``"test"``.
    file
        The offending file as written in the datalist (image or mask; ``""`` when the entry
        names none).
    reason
        What is wrong and how to fix it (names the file; no pixel data).
    kind
        Short machine-readable category, safe to log (no file names).
    """

    index: int
    section: str
    file: str
    reason: str
    kind: ProblemKind = "bad_entry"

    @property
    def where(self) -> str:
        """``"training[3]"``: section and index, without file names."""
        return f"{self.section}[{self.index}]"

    def __str__(self) -> str:
        return f"{self.where} ({self.file or 'no file'}): {self.reason}"


@dataclass(frozen=True)
class EntryInfo:
    """What one usable entry holds, as read from disk (before any resizing).

    Parameters
    ----------
    index, section, file
        Where the entry is and its image file as written in the datalist.
    shape
        Spatial shape of the image file as stored, in the file's axis order (``(H, W)`` or
        ``(D, H, W)``; before reorientation, resampling and resizing).
    channels
        Image channels.
    spacing
        Voxel / pixel spacing from the file's header, in the file's axis order (``None`` when
        it has none).
    label
        Classification: the class. Segmentation: ``None``.
    mask_classes
        Segmentation: the class indices present in the mask (0 = background). Else ``()``.
    orientation
        The file's axis codes as stored (``"LPS"``, ``"RAS"``, ...; a slice has three too):
        NIfTI and DICOM volumes, which are loaded in RAS. ``None``: no patient axes (PNG/JPEG,
        2D DICOM), used as stored.
    notes
        Corrections made while reading (a DICOM series' gantry tilt or uneven slice spacing).
    """

    index: int
    section: str
    file: str
    shape: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...] | None = None
    label: int | None = None
    mask_classes: tuple[int, ...] = ()
    orientation: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatalistReport:
    """Result of checking every entry of a datalist.

    Parameters
    ----------
    entries_ok
        Entries that load and pass every check.
    problems
        One :class:`DatalistProblem` per unusable entry, in datalist order.
    datalist
        The datalist file.
    task, spatial_dims, num_classes
        What the usable entries amount to (``None`` / ``0`` when nothing loaded).
    entries
        One :class:`EntryInfo` per usable entry (shapes, spacings, labels), in datalist order.
    """

    entries_ok: int
    problems: list[DatalistProblem] = field(default_factory=list)
    datalist: str = ""
    task: Task | None = None
    spatial_dims: int | None = None
    num_classes: int = 0
    entries: list[EntryInfo] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every entry is usable."""
        return not self.problems

    @property
    def entries_total(self) -> int:
        """Usable plus unusable entries."""
        return self.entries_ok + len(self.problems)

    def kind_counts(self) -> dict[str, int]:
        """Unusable entries per problem kind (sorted by kind); no file names."""
        kinds: dict[str, int] = {}
        for p in self.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        return dict(sorted(kinds.items()))

    def summary(self) -> str:
        """One line with counts and problem kinds only (no file names), safe to log."""
        if not self.problems:
            return f"{self.entries_ok} entries ok, no problems."
        detail = ", ".join(f"{k}: {v}" for k, v in self.kind_counts().items())
        return (
            f"{self.entries_ok} of {self.entries_total} entries ok, {len(self.problems)} "
            f"problem(s) ({detail}) at {', '.join(p.where for p in self.problems)}."
        )


class UnusableEntriesError(DataError):
    """:func:`load_datalist` found unusable entries (``on_error="raise"``).

    The message names the datalist and each entry's section, index, file and problem;
    :attr:`report` holds the full :class:`DatalistReport` (counts by kind are safe to log).
    """

    def __init__(self, message: str, report: DatalistReport) -> None:
        super().__init__(message)
        self.report = report


def scan_datalist(
    path: str | Path,
    *,
    image_size: int = 0,
    spatial_dims: int | None = None,
    task: Task | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    spacing: Sequence[float] = (),
) -> DatalistReport:
    """Load and check every entry of a datalist; report the problems instead of raising.

    Parameters
    ----------
    path
        The datalist JSON file.
    image_size, spatial_dims, task, num_classes, in_channels, spacing
        As in :func:`load_datalist` (``image_size = 0``: images keep their size and must all
        share it).

    Returns
    -------
    DatalistReport
        Counts and one :class:`DatalistProblem` per unusable entry.

    Raises
    ------
    DataError
        The datalist itself is missing, not JSON, or lacks a ``"training"`` list.
    """
    report, _ = _scan(
        Path(path),
        image_size=image_size,
        spatial_dims=spatial_dims,
        task=task,
        num_classes=num_classes,
        in_channels=in_channels,
        spacing=spacing,
    )
    return report


def load_datalist(
    path: str | Path,
    *,
    image_size: int,
    spatial_dims: int | None = None,
    task: Task | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    on_error: Literal["raise", "skip"] = "raise",
    num_classes: int | None = None,
    in_channels: int | None = None,
    spacing: Sequence[float] = (),
) -> DataSplits:
    """Read a MONAI-style datalist into train/val/test image sets.

    Parameters
    ----------
    path
        The datalist JSON file; relative image paths are resolved against its folder.
    image_size
        Side length every image (and mask) is resized to; ``0`` keeps the files' size, which
        then must be the same for all.
    spatial_dims
        2 or 3; ``None`` takes it from the first image.
    task
        ``"classification"`` or ``"segmentation"``; ``None`` infers it from the first
        training entry's label (integer or mask path).
    val_fraction, test_fraction
        Shares of ``"training"`` used for a missing (or empty) ``"validation"`` / ``"test"``
        section.
    seed
        Seed of that split.
    on_error
        ``"raise"``: any unusable entry raises a :class:`DataError` listing them all.
        ``"skip"``: unusable entries are left out and counted in a warning (sections, indices
        and problem kinds, no file names) and in ``DataSplits.skipped_files``; see
        :func:`scan_datalist` for the details.
    num_classes
        The model's class count (a federation's ``num-classes``), used when the datalist
        declares no ``"num_classes"``: labels (mask values) at or above it make their entry
        unusable instead of widening the dataset. ``None``: ``max(label) + 1``.
    in_channels
        The channel count every image must have (a federation's ``in-channels``). ``None``:
        the first readable image's.
    spacing
        Voxel size in mm to resample NIfTI and DICOM images to, after they are brought to RAS
        (one value for every axis, or one per axis); ``()`` keeps each file's own spacing.
        PNG/JPEG images have no physical spacing and are left as they are. See
        ``docs/images.md``.

    Returns
    -------
    DataSplits
        Images ``float32`` ``(N, C, *spatial)`` in ``[0, 1]``; targets ``int64`` ``(N,)``
        (classification) or ``(N, 1, *spatial)`` (segmentation). ``num_classes`` is the
        datalist's ``"num_classes"``, else the ``num_classes`` argument, else
        ``max(label) + 1`` (at least 2). ``skipped_files`` counts the entries left out.

    Raises
    ------
    DataError
        Naming the datalist, each bad entry (section and index), its file and the fix.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error = {on_error!r} is invalid. Valid choices: 'raise', 'skip'.")
    path = Path(path)
    report, loaded = _scan(
        path,
        image_size=image_size,
        spatial_dims=spatial_dims,
        task=task,
        num_classes=num_classes,
        in_channels=in_channels,
        spacing=spacing,
    )

    if report.problems and on_error == "raise":
        lines = [f"  {p}" for p in report.problems[:_MAX_LISTED]]
        if len(report.problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(report.problems) - _MAX_LISTED} more.")
        raise UnusableEntriesError(
            f"Datalist {path} has {len(report.problems)} unusable entr"
            f"{'y' if len(report.problems) == 1 else 'ies'}:\n" + "\n".join(lines) + "\n"
            "Fix these entries, or leave them out with bad-data = \"skip\" (--set bad-data=skip, or "
            "bad-data = \"skip\" in the site's site.toml); `medfed site check` lists them.",
            report,
        )
    if report.problems:
        logger.warning(
            "Datalist %s: skipped %d unusable entr%s. %s",
            path.name,
            len(report.problems),
            "y" if len(report.problems) == 1 else "ies",
            report.summary(),
        )

    corrected = [f"{e.section}[{e.index}]" for e in report.entries if e.notes]
    if corrected:
        logger.warning(
            "Datalist %s: %d DICOM series corrected while reading (gantry tilt or uneven slice spacing) at %s; "
            "`medfed site check` says how.",
            path.name,
            len(corrected),
            ", ".join(corrected[:_MAX_LISTED]) + (" ..." if len(corrected) > _MAX_LISTED else ""),
        )
    assert report.task is not None and report.spatial_dims is not None
    split_task: Task = report.task
    sections: dict[str, list[_Item]] = {s: loaded.get(s, []) for s in SECTIONS}
    if not sections["training"]:
        raise DataError(
            f"Datalist {path}: no usable training entries. Fix the entries listed by scan_datalist."
        )
    sections = _carve_missing(path, sections, loaded, split_task, val_fraction, test_fraction, seed)

    sets: dict[str, ImageSet] = {}
    for section in SECTIONS:
        items = sections[section]
        if not items:
            raise DataError(
                f"Datalist {path}: no usable entries left in section {section!r}. Fix its "
                "entries, or remove the section to split it off the training entries."
            )
        images = np.stack([it.image for it in items]).astype(np.float32, copy=False)
        if split_task == "classification":
            targets = np.asarray([it.target for it in items], dtype=np.int64)
        else:
            targets = np.stack([it.target for it in items]).astype(np.int64, copy=False)
        meta = tuple(it.metadata for it in items) if any(it.metadata for it in items) else None
        sources = None
        if any(it.source is not None for it in items):
            sources = np.asarray([it.source or "" for it in items], dtype=object)
        sets[section] = ImageSet(images, targets, split_task, report.num_classes, meta, sources=sources)

    logger.info(
        "Loaded datalist %s: %s, %dD, %d classes, %d/%d/%d train/val/test samples.",
        path.name,
        split_task,
        report.spatial_dims,
        report.num_classes,
        len(sets["training"]),
        len(sets["validation"]),
        len(sets["test"]),
    )
    return DataSplits(
        sets["training"], sets["validation"], sets["test"], skipped_files=len(report.problems)
    )


# ---------------------------------------------------------------------------- internals
@dataclass
class _Item:
    """One usable entry: image ``(C, *spatial)`` float32 and label or mask ``(1, *spatial)``."""

    index: int
    image: np.ndarray
    target: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    """The entry's optional ``sex``, ``age``, ``scanner``... (:mod:`medfed.shared.data.metadata`)."""
    source: str | None = None


class _EntryProblem(Exception):
    """Raised inside the per-entry check; becomes a :class:`DatalistProblem`."""

    def __init__(self, kind: ProblemKind, file: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.file, self.reason = kind, file, reason


@lru_cache(maxsize=1)
def _loader() -> LoadImage:
    """One shared ``LoadImage``; readers are passed per call so the choice is explicit.

    Building it registers all of MONAI's default readers, one of which (nvImageCodec DICOM)
    warns when the optional GPU codec is absent; that noise is silenced here.
    """
    codec_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = codec_logger.level
    codec_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True, ensure_channel_first=True)
    finally:
        codec_logger.setLevel(level)


@cache
def _reader(kind: str) -> ImageReader:
    return {"NIfTI": NibabelReader, "DICOM": PydicomReader, "PNG/JPEG": PILReader}[kind]()


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir() or name.endswith((".dcm", ".dicom")) or "." not in name:
        return "DICOM"
    if name.endswith((".nii", ".nii.gz")):
        return "NIfTI"
    if name.endswith((".png", ".jpg", ".jpeg")):
        return "PNG/JPEG"
    return None


def _read(
    base: Path,
    written: str,
    role: str,
    info: dict[str, Any] | None = None,
    *,
    spacing: tuple[float, ...] = (),
    mask: bool = False,
) -> np.ndarray:
    """Load one file as ``float32`` ``(C, *spatial)`` with 2 or 3 spatial axes, in one geometry.

    NIfTI files and DICOM volumes are brought to RAS and, with ``spacing``, resampled to it
    (:func:`medfed.shared.data.geometry.to_canonical`; ``mask``: nearest neighbour); a DICOM
    folder is read as one series (:func:`medfed.shared.data.dicom_series.read_dicom_series`).
    ``info``, when given, receives the file's ``"shape"``, ``"spacing"`` and ``"orientation"`` as
    stored (from its header, ``None`` when it has none) and ``"notes"`` on corrections made while
    reading (a DICOM series: the shape and spacing of the corrected volume).
    """
    file = Path(written)
    full = file if file.is_absolute() else base / file
    if not full.exists():
        raise _EntryProblem(
            "missing_file",
            written,
            f"{role} file {written!r} not found (looked for {full}). Fix the path; relative "
            "paths are resolved against the datalist's folder.",
        )
    kind = _file_kind(full)
    if kind is None:
        raise _EntryProblem(
            "unsupported_file",
            written,
            f"{role} file {written!r} has an unsupported type. Use NIfTI (.nii, .nii.gz), "
            "DICOM (.dcm or a series folder) or PNG/JPEG.",
        )
    notes: tuple[str, ...] = ()
    try:
        if kind == "DICOM" and full.is_dir():
            images, _ = dicom_image_files(full)
            if len(images) == 1:  # one image in the folder (a radiograph, a slice): read as that file is
                full = images[0]
        if kind == "DICOM" and full.is_dir():
            volume, affine, series = read_dicom_series(full)
            img = MetaTensor(torch.from_numpy(volume[None]), affine=torch.as_tensor(affine))
            notes = tuple(series.notes())
        else:
            img = _loader()(str(full), reader=_reader(kind))
    except DicomSeriesError as err:
        raise _EntryProblem("unreadable", written, f"{role} {written!r}: {err}") from None
    except Exception as err:  # readers raise many types; the message names the file
        detail = str(err).strip().splitlines()
        raise _EntryProblem(
            "unreadable",
            written,
            f"{role} file {written!r} could not be read as {kind} ({type(err).__name__}"
            f"{': ' + detail[0][:160] if detail else ''}). It is corrupt, truncated or not "
            f"{kind}: re-export it.",
        ) from None
    pixdim = getattr(img, "pixdim", None)
    stored_spacing = tuple(float(v) for v in np.asarray(pixdim).ravel()) if pixdim is not None else None
    spatial = img.ndim - 1
    stored_shape = tuple(int(s) for s in img.shape[1:])
    # Patient axes: every NIfTI, and DICOM volumes; 2D DICOM and PNG/JPEG are used as stored.
    patient_axes = kind == "NIfTI" or (kind == "DICOM" and spatial == 3)
    orientation = axis_codes(img.affine) if patient_axes and spatial in (2, 3) else None
    source_affine = np.asarray(convert_to_numpy(img.affine), dtype=np.float64) if hasattr(img, "affine") else None
    try:
        if patient_axes and spatial in (2, 3):
            if spatial == 2:  # a 2D NIfTI: the slice of a volume, its third axis implied
                img = img.unsqueeze(-1)
            img = to_canonical(img, spacing=spacing, slice_axis=2 if img.shape[-1] == 1 else None, mask=mask)
        elif spacing and kind == "DICOM" and spatial == 2:
            if len(spacing) not in (1, 2):
                raise ValueError(f"spacing has {len(spacing)} values but the image is 2D: give one value or 2.")
            img = Spacing(pixdim=list(spacing), mode="nearest" if mask else "bilinear")(img)
    except ValueError as err:
        raise _EntryProblem(
            "spatial_dims", written, f"{role} file {written!r}: {err} (the run's or site's spacing)."
        ) from None
    arr = convert_to_numpy(img, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[-1] == 1:  # a single slice stored as a volume (no patient axes)
        arr = arr[..., 0]
    if stored_spacing is not None and len(stored_spacing) > arr.ndim - 1:
        stored_spacing = stored_spacing[: arr.ndim - 1]  # a slice stored as a volume: its in-plane size
    if info is not None:
        info["shape"] = stored_shape[: arr.ndim - 1]  # a slice stored as a volume: its in-plane size
        info["spacing"] = stored_spacing
        info["orientation"] = orientation
        info["notes"] = notes
        info["source_affine"] = source_affine  # the file's grid as stored
        info["affine"] = (  # the grid of the array returned (after reorientation / resampling)
            np.asarray(convert_to_numpy(img.affine), dtype=np.float64) if hasattr(img, "affine") else None
        )
    if arr.ndim not in (3, 4) or 0 in arr.shape:
        raise _EntryProblem(
            "spatial_dims",
            written,
            f"{role} file {written!r} has shape {tuple(arr.shape)} (channels first); expected "
            "a 2D image or a 3D volume. Split 4D/time series into separate files.",
        )
    return arr


class _Scanner:
    """State shared across the entries of one datalist: references for consistency checks."""

    def __init__(
        self,
        path: Path,
        *,
        image_size: int,
        spatial_dims: int | None,
        task: Task,
        num_classes: int | None,
        declared: bool = True,
        in_channels: int | None = None,
        spacing: tuple[float, ...] = (),
    ) -> None:
        self.base = path.parent
        self.spacing = spacing  # mm per axis after reorientation to RAS; () keeps the native spacing
        self.image_size = image_size
        self.spatial_dims = spatial_dims
        self.task = task
        self.num_classes = num_classes
        self.declared = declared  # num_classes from the datalist (else from the caller's model)
        self.channels: int | None = in_channels
        self.channels_given = in_channels is not None
        self.shape: tuple[int, ...] | None = None  # reference size when image_size == 0
        self._compose: Compose | None = None
        self.last: EntryInfo | None = None  # the last entry that passed every check
        self.last_source: str | None = None  # and its "site"
        self.binarize: Any = None  # mask -> binary class mask (the datalist's "mask_binarize")

    def transforms(self) -> Compose:
        """``ScaleIntensityd`` then ``Resized`` (built once the spatial dims are known)."""
        if self._compose is None:
            keys = ["image"] if self.task == "classification" else ["image", "label"]
            steps: list[Any] = [ScaleIntensityd(keys="image")]
            if self.image_size:
                assert self.spatial_dims is not None
                linear = "bilinear" if self.spatial_dims == 2 else "trilinear"
                modes = [linear] if self.task == "classification" else [linear, "nearest"]
                steps.append(
                    Resized(
                        keys=keys,
                        spatial_size=(self.image_size,) * self.spatial_dims,
                        mode=modes,
                        anti_aliasing=[True, False][: len(keys)],
                    )
                )
            self._compose = Compose(steps)
        return self._compose

    def entry(self, entry: Any) -> tuple[np.ndarray, Any]:
        """Check and load one entry: ``(image (C, *spatial), label or mask (1, *spatial))``.

        Raises ``_EntryProblem`` on the first check it fails.
        """
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            named = entry.get("image") if isinstance(entry, dict) else None
            raise _EntryProblem(
                "bad_entry",
                named if isinstance(named, str) else "",
                'entry must be an object with "image" and "label" keys'
                + (f" (the entry of {named!r} has no label)." if isinstance(named, str) else "."),
            )
        image_field = entry["image"]
        image_files = image_field if isinstance(image_field, list) else [image_field]
        if not image_files or not all(isinstance(f, str) and f for f in image_files):
            raise _EntryProblem(
                "bad_entry",
                "",
                f'"image" must be a file path (a string) or a list of them (the channels of one '
                f"image); got {image_field!r:.60}.",
            )
        image_written: str = image_files[0]
        source = entry.get("site")
        if source is not None and (not isinstance(source, str) or not source):
            raise _EntryProblem(
                "bad_entry", image_written, f'"site" of {image_written!r} must be a non-empty string; got {source!r:.40}.'
            )
        label = entry["label"]
        target: Any
        if self.task == "classification":
            if isinstance(label, bool) or not isinstance(label, int):
                raise _EntryProblem(
                    "bad_label",
                    image_written,
                    f"label {label!r:.60} of {image_written!r} is not an integer class, but the "
                    "task is classification (given, or inferred from the first training entry). "
                    "Use integer labels for every entry, or pass task='segmentation' with mask "
                    "paths.",
                )
            self._check_class(label, image_written, "label")
            target = label
        else:
            if not isinstance(label, str) or not label:
                raise _EntryProblem(
                    "bad_label",
                    image_written,
                    f"label {label!r:.60} of {image_written!r} is not a mask file path, but the "
                    "task is segmentation (given, or inferred from the first training entry). "
                    "Give the mask file of every image, or pass task='classification' with "
                    "integer labels.",
                )

        read_info: dict[str, Any] = {}
        image = _read(self.base, image_written, "image", read_info, spacing=self.spacing)
        if len(image_files) > 1:
            channels = [image]
            for other in image_files[1:]:
                extra = _read(self.base, other, "image", spacing=self.spacing)
                if extra.shape[1:] != image.shape[1:]:
                    raise _EntryProblem(
                        "shape_mismatch",
                        other,
                        f"image channel file {other!r} has spatial shape {extra.shape[1:]} but "
                        f"{image_written!r} has {image.shape[1:]}. The files of one image must "
                        "share one grid.",
                    )
                channels.append(extra)
            image = np.concatenate(channels, axis=0)
        self._check_geometry(image, image_written)
        mask_classes: tuple[int, ...] = ()

        if self.task == "segmentation":
            mask = _read(self.base, label, "mask", spacing=self.spacing, mask=True)
            if self.binarize is not None:
                mask = self.binarize(mask)
            if mask.shape[0] != 1:
                raise _EntryProblem(
                    "bad_mask",
                    label,
                    f"mask {label!r} has {mask.shape[0]} channels; a mask needs one channel of "
                    "class indices. Save it single-channel.",
                )
            if mask.shape[1:] != image.shape[1:]:
                raise _EntryProblem(
                    "shape_mismatch",
                    label,
                    f"mask {label!r} has spatial shape {mask.shape[1:]} but its image "
                    f"{image_written!r} has {image.shape[1:]}. Give each image its own mask of "
                    "the same size.",
                )
            if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)) or mask.min() < 0:
                raise _EntryProblem(
                    "bad_mask",
                    label,
                    f"mask {label!r} holds values that are not class indices (non-integer or "
                    "negative). Store 0 for background and 1..K-1 for the classes.",
                )
            top = int(mask.max())
            if top == 255 and set(np.unique(mask).tolist()) <= {0.0, 255.0}:
                raise _EntryProblem(
                    "bad_mask",
                    label,
                    f"mask {label!r} uses 0/255; store class indices instead (0 = background, "
                    "1 = foreground).",
                )
            self._check_class(top, label, "mask value")
            mask_classes = tuple(int(v) for v in np.unique(mask))
            data = self.transforms()({"image": image, "label": mask})
            target = convert_to_numpy(data["label"], dtype=np.float32).round().astype(np.int64)
        else:
            data = self.transforms()({"image": image})
        out = convert_to_numpy(data["image"], dtype=np.float32)
        self.last_source = source
        self.last = EntryInfo(
            index=-1,
            section="",
            file=image_written,
            shape=read_info.get("shape", tuple(int(s) for s in image.shape[1:])),
            channels=int(image.shape[0]),
            spacing=read_info.get("spacing"),
            label=int(label) if self.task == "classification" else None,
            mask_classes=mask_classes,
            orientation=read_info.get("orientation"),
            notes=read_info.get("notes", ()),
        )
        return np.clip(out, 0.0, 1.0), target

    def _check_class(self, value: int, file: str, what: str) -> None:
        if value < 0:
            raise _EntryProblem(
                "label_out_of_range",
                file,
                f"{what} {value} of {file!r} is negative; classes are 0..K-1.",
            )
        if self.num_classes is not None and value >= self.num_classes:
            source = (
                "the datalist declares num_classes" if self.declared else "the model has num-classes"
            )
            fix = "the datalist's num_classes" if self.declared else "the run's num-classes"
            raise _EntryProblem(
                "label_out_of_range",
                file,
                f"{what} {value} of {file!r} is out of range: {source} = {self.num_classes} "
                f"(classes 0..{self.num_classes - 1}). Fix the label or {fix}.",
            )

    def _check_geometry(self, image: np.ndarray, file: str) -> None:
        dims = image.ndim - 1
        if self.spatial_dims is None:
            self.spatial_dims = dims
        elif dims != self.spatial_dims:
            raise _EntryProblem(
                "spatial_dims",
                file,
                f"image {file!r} is {dims}D but the dataset is {self.spatial_dims}D (set by "
                "spatial_dims or the first image). Use images of one dimensionality.",
            )
        channels = int(image.shape[0])
        if self.channels is None:
            self.channels = channels
        elif channels != self.channels:
            others = "the model takes" if self.channels_given else "earlier images have"
            raise _EntryProblem(
                "channels",
                file,
                f"image {file!r} has {channels} channel(s) but {others} {self.channels}. "
                "Convert all images to the same channels (e.g. greyscale).",
            )
        if not self.image_size:
            shape = tuple(int(s) for s in image.shape[1:])
            if self.shape is None:
                self.shape = shape
            elif shape != self.shape:
                raise _EntryProblem(
                    "shape_mismatch",
                    file,
                    f"image {file!r} has size {shape} but earlier images have {self.shape}. Set "
                    "image-size > 0 to resize them all (--image-size 64, or image-size in site.toml).",
                )


def _check_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    values = tuple(spacing)
    if len(values) > 3 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf") for v in values
    ):
        raise DataError(
            f"spacing = {values!r} is invalid: give () to keep each image's spacing, or 1 to 3 sizes in mm (> 0)."
        )
    return tuple(float(v) for v in values)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"Datalist {path} does not exist. Check the dataset path.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"Datalist {path} is not valid JSON ({err}). Fix the file.") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise DataError(
            f'Datalist {path} needs a "training" list of {{"image": ..., "label": ...}} entries '
            '(and optionally "validation", "test", "num_classes").'
        )
    for section in SECTIONS[1:]:
        if section in data and not isinstance(data[section], list):
            raise DataError(f'Datalist {path}: "{section}" must be a list of entries.')
    return data


def _binarizer(path: Path, spec: Any) -> Any:
    """The datalist's ``"mask_binarize"`` as a function ``mask (C, *spatial) -> (1, *spatial)``."""
    if spec is None:
        return None
    fix = 'use {"threshold": 128, "foreground": "above"} (or "below").'
    if not isinstance(spec, dict) or set(spec) - {"threshold", "foreground"} or "threshold" not in spec:
        raise DataError(f'Datalist {path}: "mask_binarize" = {spec!r:.80} is invalid: {fix}')
    threshold, side = spec["threshold"], spec.get("foreground", "above")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or side not in ("above", "below"):
        raise DataError(f'Datalist {path}: "mask_binarize" = {spec!r:.80} is invalid: {fix}')

    def binarize(mask: np.ndarray) -> np.ndarray:
        value = mask.mean(axis=0, keepdims=True)
        fg = value >= threshold if side == "above" else value < threshold
        return fg.astype(np.float32)

    return binarize


def _infer_task(path: Path, entries: Sequence[Any]) -> Task:
    for entry in entries:
        label = entry.get("label") if isinstance(entry, dict) else None
        if isinstance(label, int) and not isinstance(label, bool):
            return "classification"
        if isinstance(label, str) and not label.strip().lstrip("+-").isdigit():
            return "segmentation"  # a mask path ("1" in quotes says nothing either way)
    raise DataError(
        f"Datalist {path}: cannot infer the task: no training entry has an integer label or a "
        "mask path. Fix the labels: a classification entry needs an integer \"label\", a "
        "segmentation entry the path of its mask file."
    )


def _scan(
    path: Path,
    *,
    image_size: int,
    spatial_dims: int | None,
    task: Task | None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    spacing: Sequence[float] = (),
) -> tuple[DatalistReport, dict[str, list[_Item]]]:
    """Check and load every entry: the report plus the usable items of each section."""
    if image_size < 0:
        raise DataError(
            f"image_size = {image_size} is invalid: use 0 (keep sizes) or a side length."
        )
    if spatial_dims not in (None, 2, 3):
        raise DataError(f"spatial_dims = {spatial_dims!r} is invalid: use 2, 3 or None (infer).")
    if task is not None and task not in TASKS:
        raise DataError(
            f"task = {task!r} is invalid. Valid choices: {', '.join(repr(t) for t in TASKS)}, None."
        )
    for name, value, low in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise DataError(f"{name} = {value!r} is invalid: use an integer >= {low} or None.")
    data = _read_json(path)
    declared = data.get("num_classes")
    if declared is not None and (
        isinstance(declared, bool) or not isinstance(declared, int) or declared < 2
    ):
        raise DataError(f'Datalist {path}: "num_classes" = {declared!r} must be an integer >= 2.')
    resolved_task: Task = task or _infer_task(path, data["training"])

    scanner = _Scanner(
        path,
        image_size=image_size,
        spatial_dims=spatial_dims,
        task=resolved_task,
        num_classes=declared if declared is not None else num_classes,
        declared=declared is not None,
        in_channels=in_channels,
        spacing=_check_spacing(spacing),
    )
    scanner.binarize = _binarizer(path, data.get("mask_binarize"))
    problems: list[DatalistProblem] = []
    infos: list[EntryInfo] = []
    loaded: dict[str, list[_Item]] = {}
    for section in SECTIONS:
        if not data.get(section):  # absent or empty: split off training later
            continue
        items = loaded.setdefault(section, [])
        for index, entry in enumerate(data[section]):
            try:
                image, target = scanner.entry(entry)
            except _EntryProblem as prob:
                problems.append(DatalistProblem(index, section, prob.file, prob.reason, prob.kind))
                continue
            items.append(_Item(index, image, target, entry_metadata(entry), source=scanner.last_source))
            if scanner.last is not None:
                infos.append(dataclasses.replace(scanner.last, index=index, section=section))

    all_items = [it for items in loaded.values() for it in items]
    found: int
    if declared is not None:
        found = declared
    elif num_classes is not None:
        found = num_classes
    elif not all_items:
        found = 0
    elif resolved_task == "classification":
        found = max(2, max(int(it.target) + 1 for it in all_items))
    else:
        found = max(2, max(int(it.target.max()) + 1 for it in all_items))
    report = DatalistReport(
        entries_ok=len(all_items),
        problems=problems,
        datalist=str(path),
        task=resolved_task,
        spatial_dims=scanner.spatial_dims,
        num_classes=found,
        entries=infos,
    )
    return report, loaded


def _carve_missing(
    path: Path,
    sections: dict[str, list[_Item]],
    loaded: dict[str, list[_Item]],
    task: Task,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[_Item]]:
    """Split absent (or empty) validation/test sections off the training items."""
    need_val = "validation" not in loaded

    need_test = "test" not in loaded
    if not (need_val or need_test):
        return sections
    train = sections["training"]
    if task == "classification":
        labels = np.asarray([it.target for it in train], dtype=np.int64)
    else:
        labels = np.asarray([int(it.target.max() > 0) for it in train], dtype=np.int64)
    try:
        tr, va, te = split_train_val_test(
            labels,
            val_fraction=val_fraction if need_val else 0.0,
            test_fraction=test_fraction if need_test else 0.0,
            seed=seed,
        )
    except ValueError as err:
        raise DataError(f"Datalist {path}: {err}") from None
    logger.info(
        "Datalist %s has no %s section: split %d training entries into %d/%d/%d (seed %d).",
        path.name,
        " or ".join(s for s, need in (("validation", need_val), ("test", need_test)) if need),
        len(train),
        len(tr),
        len(va),
        len(te),
        seed,
    )
    out = dict(sections)
    out["training"] = [train[i] for i in tr]
    if need_val:
        out["validation"] = [train[i] for i in va]
    if need_test:
        out["test"] = [train[i] for i in te]
    return out


# ---------------------------------------------------------------------------- one image, for a trained model
__all__ += ["ModelImage", "image_file_kind", "read_model_image"]


@dataclass(frozen=True)
class ModelImage:
    """One image file read and preprocessed as :func:`load_datalist` does for training.

    Parameters
    ----------
    image
        ``float32`` ``(C, *spatial)`` in ``[0, 1]``: scaled per image, resized to ``image_size``
        per side (unless that is 0).
    read_shape
        Spatial shape of the image as read, in the training geometry (RAS, the run's spacing),
        before resizing.
    affine
        ``(4, 4)`` affine of that grid (``None`` unless asked for).
    source_affine, source_shape
        The file's own grid as stored (before reorientation and resampling): masks go back to
        it so that they overlay the file in any viewer (``None`` unless asked for).
    """

    image: np.ndarray
    read_shape: tuple[int, ...]
    affine: np.ndarray | None = None
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, ...] | None = None


def image_file_kind(path: str | Path) -> str | None:
    """``"NIfTI"``, ``"DICOM"`` (a ``.dcm`` file, an extensionless file or a series folder),
    ``"PNG/JPEG"``, or ``None`` for a file type the datalist reader does not take."""
    return _file_kind(Path(path))


def read_model_image(
    path: str | Path,
    *,
    image_size: int,
    spatial_dims: int,
    in_channels: int,
    with_affine: bool = False,
    raw: bool = False,
    spacing: tuple[float, ...] = (),
) -> ModelImage:
    """Read one image file (NIfTI, DICOM file or series folder, PNG/JPEG) the way training reads
    a datalist entry: the same reader, ``ScaleIntensityd`` then ``Resized`` (``image_size = 0``:
    no resizing), clipped to ``[0, 1]``.

    Parameters
    ----------
    path
        The file (or DICOM series folder); a relative path is taken from the working folder.
    image_size, spatial_dims, in_channels
        What the model takes: side length, 2 or 3, channels ``C``.
    with_affine
        Also return the affines of the training grid and of the file as stored.
    raw
        Return the values as read (``float32``, no scaling, no resizing; ``image_size`` is
        ignored): for models whose training scaled otherwise (MedMNIST npz files).
    spacing
        Millimetres per axis after reorientation to RAS, as in training (the run's ``spacing``);
        ``()`` keeps the file's own.

    Raises
    ------
    DataError
        Naming the file: missing, unreadable, of another dimensionality or channel count than
        the model takes.
    """
    written = str(path)
    info: dict[str, Any] = {}
    try:
        image = _read(Path.cwd(), written, "image", info, spacing=spacing)
    except _EntryProblem as prob:
        raise DataError(prob.reason) from None
    dims, channels = image.ndim - 1, int(image.shape[0])
    if dims != spatial_dims:
        raise DataError(
            f"image {written!r} is {dims}D but the model takes {spatial_dims}D images. Give "
            f"{spatial_dims}D files{' (a DICOM series folder or a NIfTI volume)' if spatial_dims == 3 else ''}."
        )
    if channels != in_channels:
        raise DataError(
            f"image {written!r} has {channels} channel(s) but the model takes {in_channels}. "
            "Convert the image to the channels the model was trained on (e.g. greyscale)."
        )
    if raw:
        out = image
    else:
        scanner = _Scanner(
            Path(written), image_size=image_size, spatial_dims=spatial_dims, task="classification", num_classes=None
        )
        data = scanner.transforms()({"image": image})
        out = np.clip(convert_to_numpy(data["image"], dtype=np.float32), 0.0, 1.0)
    read_shape = tuple(int(s) for s in image.shape[1:])
    if not with_affine:
        return ModelImage(image=out, read_shape=read_shape)
    stored = info.get("shape")
    return ModelImage(
        image=out, read_shape=read_shape, affine=info.get("affine"), source_affine=info.get("source_affine"),
        source_shape=tuple(int(v) for v in stored) if stored is not None else read_shape,
    )
