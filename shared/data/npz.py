"""MedMNIST-style ``.npz`` files -> :class:`~medfed.shared.data.base.DataSplits`.

A file holds six arrays: ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images``, ``test_labels``. Images are ``uint8``:

* 2D grey ``(N, H, W)``, 2D RGB ``(N, H, W, 3)`` (moved to channels first), or
* 3D ``(N, D, H, W)`` (MedMNIST 3D, e.g. ``adrenalmnist3d.npz``).

Labels are ``(N,)`` or ``(N, 1)``; multi-label files (``(N, k > 1)``, e.g. ChestMNIST) are
rejected. Images come back as ``float32`` in ``[0, 1]`` with shape ``(N, C, *spatial)``.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfed.shared.data.base import DataError, DataSplits, ImageSet

__all__ = ["NPZ_KEYS", "load_npz"]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
NPZ_KEYS: tuple[str, ...] = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
_RESIZE_CHUNK = 256  # samples per interpolation call (bounds peak memory for 3D)


def load_npz(path: str | Path, *, image_size: int = 0) -> DataSplits:
    """Read a MedMNIST-style npz file into train/val/test image sets.

    Parameters
    ----------
    path
        The ``.npz`` file.
    image_size
        ``> 0``: resize every image to this side length (bilinear / trilinear);
        ``0``: keep the file's size.

    Returns
    -------
    DataSplits
        Classification sets with images ``float32`` ``(N, C, H, W)`` (``C`` = 1 or 3) or
        ``(N, 1, D, H, W)`` in ``[0, 1]`` and labels ``int64`` ``(N,)``;
        ``num_classes = max(label) + 1`` over all splits (at least 2).

    Raises
    ------
    DataError
        The file is missing, not a valid npz, lacks a key, or holds arrays of the wrong
        shape/dtype; the message names the file (and key) and the fix.
    """
    path = Path(path)
    if image_size < 0:
        raise DataError(f"image_size = {image_size} is invalid for {path}: use 0 or a side length.")
    arrays = _read_arrays(path)

    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    sample_shape: tuple[int, ...] | None = None
    for split in SPLITS:
        img = _to_channels_first(path, f"{split}_images", arrays[f"{split}_images"])
        lab = _labels(path, f"{split}_labels", arrays[f"{split}_labels"])
        if len(img) != len(lab):
            raise DataError(
                f"{path}: {split}_images has {len(img)} samples but {split}_labels has {len(lab)}. "
                "Re-export the file so images and labels match."
            )
        if sample_shape is None:
            sample_shape = img.shape[1:]
        elif img.shape[1:] != sample_shape:
            raise DataError(
                f"{path}: {split}_images has per-sample shape {img.shape[1:]} but train_images has "
                f"{sample_shape}. All splits must share one image size and channel count."
            )
        images[split], labels[split] = img, lab

    num_classes = max(2, max((int(v.max()) + 1 for v in labels.values() if len(v)), default=2))
    sets = {}
    for split in SPLITS:
        x = _scale_and_resize(images[split], image_size)
        sets[split] = ImageSet(x, labels[split], "classification", num_classes)

    logger.info(
        "Loaded %s: %d/%d/%d train/val/test samples, image shape %s, %d classes.",
        path.name,
        len(sets["train"]),
        len(sets["val"]),
        len(sets["test"]),
        sets["train"].images.shape[1:],
        num_classes,
    )
    return DataSplits(sets["train"], sets["val"], sets["test"])


# ---------------------------------------------------------------------------- internals
def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """All six arrays of the file, loaded eagerly (no pickles)."""
    if not path.exists():
        raise DataError(f"npz file {path} does not exist. Check the dataset path.")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an npz file. Point the dataset at the .npz file.")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path} is a single .npy array, not an npz archive with {', '.join(NPZ_KEYS)}. "
                "Save the splits with numpy.savez(path, train_images=..., ...)."
            )
        with npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"npz file {path} lacks key(s) {', '.join(missing)} (it has: "
                    f"{', '.join(npz.files) or 'none'}). A MedMNIST-style file needs "
                    f"{', '.join(NPZ_KEYS)}."
                )
            return {k: npz[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as err:
        raise DataError(
            f"{path} is not a readable npz file ({type(err).__name__}: {_first_line(err)}). "
            "Re-download it, or re-export it with numpy.savez / numpy.savez_compressed."
        ) from None


def _to_channels_first(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` / ``(N, H, W, 3)`` / ``(N, D, H, W)`` -> ``(N, C, *spatial)`` uint8."""
    if arr.dtype != np.uint8:
        raise DataError(
            f"npz file {path}: {key} has dtype {arr.dtype}; expected uint8 (0-255) as in "
            "MedMNIST. Convert the images to uint8 before saving."
        )
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4 and arr.shape[-1] == 3 and min(arr.shape[1:3]) > 3:
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    if arr.ndim == 4:
        return arr[:, None]
    raise DataError(
        f"npz file {path}: {key} has shape {arr.shape}; expected (N, H, W), (N, H, W, 3) or "
        "(N, D, H, W)."
    )


def _labels(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """``(N,)`` or ``(N, 1)`` integer labels -> ``int64`` ``(N,)``."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 2:
        raise DataError(
            f"npz file {path}: {key} has shape {arr.shape}, i.e. {arr.shape[1]} labels per "
            "sample (multi-label, like ChestMNIST). Only single-label classification is "
            "supported: use a single-label dataset."
        )
    elif arr.ndim != 1:
        raise DataError(f"npz file {path}: {key} has shape {arr.shape}; expected (N,) or (N, 1).")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"npz file {path}: {key} has dtype {arr.dtype}; labels must be integers.")
    if len(arr) and arr.min() < 0:
        raise DataError(f"npz file {path}: {key} has negative labels; labels must be >= 0.")
    return arr.astype(np.int64)


def _scale_and_resize(x: np.ndarray, size: int) -> np.ndarray:
    """``uint8`` ``(N, C, *spatial)`` -> ``float32`` in ``[0, 1]``, resized to ``size`` per side.

    Works in chunks so that the peak memory stays near the size of the output.
    """
    spatial = x.ndim - 2
    if not size or x.shape[2:] == (size,) * spatial:
        return x.astype(np.float32) / np.float32(255.0)
    mode = "bilinear" if spatial == 2 else "trilinear"
    out = np.empty(x.shape[:2] + (size,) * spatial, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(x), _RESIZE_CHUNK):
            chunk = torch.from_numpy(x[start : start + _RESIZE_CHUNK].astype(np.float32) / 255.0)
            resized = F.interpolate(
                chunk,
                size=(size,) * spatial,
                mode=mode,
                align_corners=False,
                antialias=spatial == 2,  # torch supports antialias for 2D only
            )
            out[start : start + _RESIZE_CHUNK] = resized.clamp_(0.0, 1.0).numpy()
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


__all__ += ["scale_and_resize"]


def scale_and_resize(images: np.ndarray, *, image_size: int) -> np.ndarray:
    """The npz reader's preprocessing of 8-bit images: ``(N, C, *spatial)`` values in ``[0, 255]``
    -> ``float32`` in ``[0, 1]`` (divided by 255), resized to ``image_size`` per side (``0``: kept).

    ``medfed predict`` applies it to image files for models trained on an npz file.
    """
    return _scale_and_resize(images, image_size)
