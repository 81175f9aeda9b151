"""A trained model at the hospital: load a checkpoint, preprocess an image as training did, predict.

:func:`load_checkpoint` turns a run directory's ``checkpoints/best.pt`` or ``final.pt`` (``{"state_dict",
"config", "round", "metrics"}``, plus ``"model_shape"`` since issue 18) into a :class:`LoadedModel`:
the network in eval mode, its :class:`~medfed.shared.config.RunConfig`, the :class:`ModelShape` it
takes and gives, the validation-chosen decision threshold and the preprocessing. Everything that
predicts with a medfed model (``medfed predict``, explanations, cross-site evaluation, the exported
MONAI bundle) goes through it and through :func:`predict_image`.

Preprocessing is training's own (:class:`Preprocessing`): the datalist reader with ``ScaleIntensityd``
per image and ``Resized`` to the training side length
(:func:`medfed.shared.data.datalist.read_model_image`), or, for a model trained on a MedMNIST npz file,
the same reader with the npz reader's division by 255 and resizing. Classification models see the
resized image; segmentation models go through MONAI's ``SlidingWindowInferer``
(``sliding_window_inference``) with windows of the training shape: on the resized
image (the default, one window, exactly as trained) or, with ``sliding_window=True``, on the image
at its own resolution; their class probabilities are brought back to the file's grid before the
argmax, so masks carry the input's affine.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.transforms import MapTransform, Resize, SpatialResample
from torch import nn

from medfed.shared.config import ConfigError, RunConfig, Task
from medfed.shared.data.base import DataError, ImageSet
from medfed.shared.data.datalist import ModelImage, image_file_kind, read_model_image
from medfed.shared.models import build_model, model_task

__all__ = [
    "CHECKPOINT_KEYS",
    "CheckpointError",
    "INTENSITIES",
    "LoadedModel",
    "ModelInputd",
    "ModelShape",
    "Prediction",
    "Preprocessing",
    "load_checkpoint",
    "make_inferer",
    "model_shape_for",
    "predict_image",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS: tuple[str, ...] = ("state_dict", "config", "round", "metrics")
"""The keys every medfed checkpoint holds (``server/run_dir.py``)."""

DEFAULT_THRESHOLD = 0.5
"""Binary decision threshold when a checkpoint records none."""

SLIDING_WINDOW: dict[str, Any] = {"sw_batch_size": 4, "overlap": 0.25, "mode": "gaussian"}
"""Settings of segmentation's ``SlidingWindowInferer`` (windows of the training shape), also
written into exported bundles."""


class CheckpointError(ValueError):
    """A checkpoint is missing, not a medfed checkpoint, or does not fit its own model."""


@dataclass(frozen=True)
class ModelShape:
    """What a trained model takes and gives.

    Parameters
    ----------
    task
        ``"classification"`` (logits ``(B, K)``) or ``"segmentation"`` (``(B, K, *spatial)``).
    spatial_dims
        2 or 3.
    in_channels
        Input channels ``C``.
    num_classes
        ``K`` (segmentation: with background).
    spatial_shape
        The training images' spatial shape (``(H, W)`` or ``(D, H, W)``): what the model saw.
    """

    task: Task
    spatial_dims: int
    in_channels: int
    num_classes: int
    spatial_shape: tuple[int, ...]

    @classmethod
    def of_data(cls, data: ImageSet) -> ModelShape:
        """The shape of a model trained on ``data`` (as :func:`medfed.shared.task.model_for` builds it)."""
        return cls(data.task, data.spatial_dims, data.in_channels, data.num_classes, data.spatial_shape)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (stored in checkpoints as ``"model_shape"``)."""
        return {
            "task": self.task,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "spatial_shape": list(self.spatial_shape),
        }

    @classmethod
    def from_json(cls, raw: Any, *, source: str) -> ModelShape:
        """Parse :meth:`to_json`'s dict; :class:`CheckpointError` naming ``source`` if it is malformed."""
        try:
            shape = cls(
                task=str(raw["task"]),  # type: ignore[arg-type]
                spatial_dims=int(raw["spatial_dims"]),
                in_channels=int(raw["in_channels"]),
                num_classes=int(raw["num_classes"]),
                spatial_shape=tuple(int(s) for s in raw["spatial_shape"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: its model_shape is malformed ({type(err).__name__}: {err}).") from None
        if shape.task not in ("classification", "segmentation") or shape.spatial_dims not in (2, 3) or len(
            shape.spatial_shape
        ) != shape.spatial_dims:
            raise CheckpointError(f"{source}: its model_shape {raw!r} is inconsistent.")
        return shape


INTENSITIES: tuple[str, ...] = ("scale", "uint8")
"""How training scaled intensities: ``"scale"`` (datalists, deployment sites, synthetic data: per
image to ``[0, 1]`` with ``ScaleIntensityd``) or ``"uint8"`` (MedMNIST npz files: divided by 255)."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model input: the preprocessing the model was trained with.

    Parameters
    ----------
    image_size
        Side length every image is resized to (the training images' side).
    spatial_dims, in_channels
        What the model takes.
    intensity
        One of :data:`INTENSITIES`: ``"scale"`` reads as a datalist entry is read for training
        (:func:`medfed.shared.data.datalist.read_model_image`); ``"uint8"`` as the npz reader
        scales and resizes (:func:`medfed.shared.data.npz.scale_and_resize`), for files holding
        8-bit values.
    """

    image_size: int
    spatial_dims: int
    in_channels: int
    intensity: str = "scale"
    spacing: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity = {self.intensity!r} is invalid. Valid choices: {', '.join(INTENSITIES)}.")

    def read(self, path: str | Path, *, keep_size: bool = False, with_affine: bool = False) -> ModelImage:
        """Read and preprocess one file: ``image`` ``float32`` ``(C, *spatial)`` in ``[0, 1]``.

        ``keep_size``: scale intensities only (sliding-window inference at the file's resolution).

        Raises
        ------
        DataError
            Naming the file: unreadable, of another dimensionality or channel count than the model
            takes, or (``"uint8"``) with values outside ``[0, 255]``.
        """
        size = 0 if keep_size else self.image_size
        raw = self.intensity == "uint8"
        item = read_model_image(
            path, image_size=size, spatial_dims=self.spatial_dims, in_channels=self.in_channels,
            with_affine=with_affine, raw=raw, spacing=self.spacing,
        )
        if not raw:
            return item
        from medfed.shared.data.npz import scale_and_resize

        if image_file_kind(path) == "PNG/JPEG":  # MONAI reads PNG/JPEG as (C, W, H); npz arrays are (H, W)
            item = replace(item, image=np.swapaxes(item.image, -1, -2), read_shape=item.read_shape[::-1])
        low, high = float(item.image.min()), float(item.image.max())
        if low < 0 or high > 255:
            raise DataError(
                f"image {str(path)!r} holds values {low:g}..{high:g}, but the model was trained on 8-bit images "
                "(an npz file, values 0-255, divided by 255). Convert the image to 8 bits (e.g. PNG) first."
            )
        image = scale_and_resize(item.image[None], image_size=size)[0]
        return replace(item, image=image)

    def to_json(self) -> dict[str, Any]:
        """The keyword arguments of :class:`ModelInputd` (besides ``keys``)."""
        return {
            "image_size": self.image_size, "spatial_dims": self.spatial_dims, "in_channels": self.in_channels,
            "intensity": self.intensity, "spacing": list(self.spacing),
        }


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint ready to predict (:func:`load_checkpoint`).

    Parameters
    ----------
    model
        The network in eval mode on ``device``, gradients off; maps ``(B, C, *spatial_shape)`` to
        logits ``(B, K)`` or ``(B, K, *spatial_shape)``.
    config
        The run's configuration (as the checkpoint stores it).
    shape
        What the model takes and gives.
    preprocessing
        Training's preprocessing of one image file.
    threshold
        Binary classification: the class-1 probability at or above which an image is called
        class 1, chosen on validation data during training (``threshold_source = "validation"``)
        or 0.5 when the checkpoint has none (``"default"``). ``None`` for more classes (argmax)
        and segmentation.
    threshold_source
        ``"validation"``, ``"default"`` or ``"argmax"``.
    round
        The server round the checkpoint was taken after.
    metrics
        The metrics stored with it.
    path
        The checkpoint file.
    device
        Where ``model`` lives.
    """

    model: nn.Module
    config: RunConfig
    shape: ModelShape
    preprocessing: Preprocessing
    threshold: float | None
    threshold_source: str
    round: int
    metrics: dict[str, float]
    path: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def task(self) -> Task:
        """``"classification"`` or ``"segmentation"``."""
        return self.shape.task

    @property
    def num_classes(self) -> int:
        """``K``."""
        return self.shape.num_classes

    def predict_file(self, path: str | Path, *, sliding_window: bool = False) -> Prediction:
        """Read ``path`` as training does and predict it (see :func:`predict_image`)."""
        item = self.preprocessing.read(
            path, keep_size=sliding_window, with_affine=self.task == "segmentation"
        )
        return predict_image(
            self.model, item, shape=self.shape, threshold=self.threshold, device=self.device
        )


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a medfed checkpoint for prediction.

    Parameters
    ----------
    path
        ``checkpoints/best.pt`` / ``final.pt`` of a run directory, or the run directory itself
        (then its ``best.pt``, else ``final.pt``).
    device
        Where to put the model (``"cpu"``, ``"cuda"``, ``"auto"``).

    Returns
    -------
    LoadedModel

    Raises
    ------
    CheckpointError
        The file does not exist, is not a medfed checkpoint, its config is invalid, or its
        weights do not fit the model its config names; the message names the file and the fix.
    """
    from medfed.shared.training import select_device

    file = _checkpoint_file(Path(path))
    payload = _read_payload(file)
    try:
        cfg = RunConfig.from_mapping(payload["config"], source=f"checkpoint {file}")
        task = model_task(cfg.model)
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {file}: its run config is not valid here: {err}") from None
    shape = _model_shape(payload, cfg, file)
    if shape.task != task:
        raise CheckpointError(f"Checkpoint {file}: model {cfg.model!r} is a {task} model but its model_shape says {shape.task}.")
    model = build_model(
        cfg.model,
        spatial_dims=shape.spatial_dims,
        in_channels=shape.in_channels,
        out_channels=shape.num_classes,
        norm=cfg.norm,
        image_size=shape.spatial_shape,
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"Checkpoint {file}: its weights do not fit {cfg.model!r} for {shape.spatial_dims}D, "
            f"{shape.in_channels}-channel input and {shape.num_classes} classes ({first[0][:200] if first else err}). "
            "The file was changed or belongs to another medfed version: use the run's own checkpoint."
        ) from None
    torch_device = device if isinstance(device, torch.device) else select_device(device)
    model.to(torch_device).eval().requires_grad_(False)
    metrics = {str(k): float(v) for k, v in dict(payload["metrics"]).items() if isinstance(v, (int, float))}
    threshold, source = _threshold(shape, metrics)
    sides = set(shape.spatial_shape)
    if len(sides) != 1:
        raise CheckpointError(
            f"Checkpoint {file}: the model was trained on non-square images {shape.spatial_shape}; medfed's "
            "preprocessing resizes every image to one side length, so it cannot reproduce that input."
        )
    logger.info(
        "Loaded checkpoint (round %s): %s %s, %dD, %d channel(s), %d classes, input %s, threshold %s (%s).",
        payload["round"], cfg.model, shape.task, shape.spatial_dims, shape.in_channels, shape.num_classes,
        shape.spatial_shape, threshold, source,
    )
    return LoadedModel(
        model=model,
        config=cfg,
        shape=shape,
        preprocessing=Preprocessing(
            sides.pop(), shape.spatial_dims, shape.in_channels, "uint8" if cfg.dataset.endswith(".npz") else "scale",
            cfg.spacing_mm,
        ),
        threshold=threshold,
        threshold_source=source,
        round=int(payload["round"]),
        metrics=metrics,
        path=file,
        device=torch_device,
    )


@dataclass(frozen=True)
class Prediction:
    """A model's output for one image.

    Parameters
    ----------
    probabilities
        Classification: ``(K,)`` class probabilities (softmax), summing to 1. Segmentation:
        ``(K, *read_shape)`` per-voxel class probabilities on the file's grid.
    label
        Classification: the predicted class (binary: class 1 when its probability is at or
        above the threshold; more classes: argmax). Segmentation: ``None``.
    mask
        Segmentation: ``int64`` ``read_shape`` argmax mask on the file's grid. Else ``None``.
    affine
        Segmentation: the input file's ``(4, 4)`` affine (the mask's too). Else ``None``.
    """

    probabilities: np.ndarray
    label: int | None = None
    mask: np.ndarray | None = None
    affine: np.ndarray | None = None


@torch.no_grad()
def predict_image(
    forward: Callable[[torch.Tensor], torch.Tensor],
    item: ModelImage,
    *,
    shape: ModelShape,
    threshold: float | None,
    device: torch.device | str = "cpu",
    inferer: Inferer | None = None,
) -> Prediction:
    """Predict one preprocessed image.

    Parameters
    ----------
    forward
        The network (an ``nn.Module``, a TorchScript module, a bundle's network): maps
        ``(B, C, *shape.spatial_shape)`` to logits.
    item
        :class:`~medfed.shared.data.datalist.ModelImage` from :class:`Preprocessing`.
    shape
        The model's shape; segmentation windows are ``shape.spatial_shape``.
    threshold
        Binary classification threshold (``None``: argmax).
    device
        Where ``forward`` runs.
    inferer
        How ``forward`` is applied; default :func:`make_inferer` of ``shape``.
    """
    image = torch.from_numpy(np.ascontiguousarray(item.image))[None].to(device)
    if shape.task == "classification":
        logits = (inferer or make_inferer(shape))(image, forward)
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()
        if shape.num_classes == 2 and threshold is not None:
            label = int(float(probs[1]) >= threshold)
        else:
            label = int(probs.argmax())
        return Prediction(probabilities=probs.numpy().astype(np.float64), label=label)
    logits = (inferer or make_inferer(shape))(image, forward)
    probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()
    if tuple(probs.shape[1:]) != item.read_shape:  # back to the file's grid
        mode = "bilinear" if shape.spatial_dims == 2 else "trilinear"
        probs = torch.as_tensor(Resize(item.read_shape, mode=mode, anti_aliasing=False)(probs))
    probs, affine = _to_source_grid(probs, item)
    mask = probs.argmax(dim=0).numpy().astype(np.int64)
    return Prediction(probabilities=probs.numpy(), mask=mask, affine=affine)


def _to_source_grid(probs: torch.Tensor, item: ModelImage) -> tuple[torch.Tensor, np.ndarray | None]:
    """Resample ``(K, *read_shape)`` probabilities from the training grid (RAS, the run's
    spacing) back to the file's grid as stored, so that the mask overlays the file; returns them
    with that grid's affine. Unchanged when the two grids are the same."""
    if item.affine is None or item.source_affine is None or item.source_shape is None:
        return probs, item.affine
    if tuple(item.source_shape) == tuple(probs.shape[1:]) and np.allclose(item.affine, item.source_affine, atol=1e-6):
        return probs, item.affine
    flat = probs.ndim == 3  # a 2D slice: resampled as a one-slice volume
    image = MetaTensor(probs[..., None] if flat else probs, affine=torch.as_tensor(item.affine))
    size = (*item.source_shape, 1) if flat else item.source_shape
    out = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
        image, dst_affine=torch.as_tensor(item.source_affine), spatial_size=size
    )
    out = torch.as_tensor(out).float()
    return (out[..., 0] if flat else out), item.source_affine


def make_inferer(shape: ModelShape) -> Inferer:
    """Classification: ``SimpleInferer`` (the whole resized image). Segmentation:
    ``SlidingWindowInferer`` with windows of the training shape (:data:`SLIDING_WINDOW`); on an
    image of that shape it is one window, exactly the training forward pass."""
    if shape.task == "classification":
        return SimpleInferer()
    return SlidingWindowInferer(roi_size=shape.spatial_shape, **SLIDING_WINDOW)


class ModelInputd(MapTransform):
    """MONAI dictionary transform: the file path under each key becomes the model input
    (``float32`` ``(C, *spatial)``), read and preprocessed by :class:`Preprocessing`.

    Used by exported MONAI bundles (``configs/inference.json``'s ``preprocessing``), so that a
    bundle preprocesses exactly as ``medfed predict`` does. Adds ``"<key>_read_shape"`` and
    ``"<key>_affine"`` (the file's grid, for masks).
    """

    def __init__(
        self,
        keys: Any,
        *,
        image_size: int,
        spatial_dims: int,
        in_channels: int,
        intensity: str = "scale",
        keep_size: bool = False,
        spacing: Sequence[float] = (),
    ) -> None:
        super().__init__(keys)
        self.preprocessing = Preprocessing(
            image_size, spatial_dims, in_channels, intensity, tuple(float(v) for v in spacing)
        )
        self.keep_size = keep_size

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            item = self.preprocessing.read(out[key], keep_size=self.keep_size, with_affine=True)
            out[key] = torch.from_numpy(item.image)
            out[f"{key}_read_shape"] = item.read_shape
            out[f"{key}_affine"] = item.affine
            out[f"{key}_source_affine"] = item.source_affine
            out[f"{key}_source_shape"] = item.source_shape
        return out


def model_shape_for(cfg: RunConfig, data: ImageSet | None) -> ModelShape:
    """The shape of the model a run trains: from its training data (as
    :func:`medfed.shared.task.model_for` builds it) or, for a deployment config (``data =
    None``; the coordinator holds no data), from ``in-channels``, ``num-classes``,
    ``spatial-dims`` and ``image-size`` (as :func:`medfed.shared.task.deployment_model`)."""
    if data is not None:
        return ModelShape.of_data(data)
    return ModelShape(
        model_task(cfg.model),  # type: ignore[arg-type]
        cfg.spatial_dims, cfg.in_channels, cfg.num_classes, (cfg.image_size,) * cfg.spatial_dims,
    )


# ---------------------------------------------------------------------------- internals
def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("best.pt", "final.pt"):
            for candidate in (path / "checkpoints" / name, path / name):
                if candidate.is_file():
                    return candidate
        raise CheckpointError(
            f"{path} is a folder without checkpoints/best.pt or checkpoints/final.pt. Give a run directory "
            "of a finished run, or the checkpoint file itself (--model RUN/checkpoints/best.pt)."
        )
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Give a run's checkpoints/best.pt or final.pt "
            "(or the run directory)."
        )
    return path


def _read_payload(file: Path) -> dict[str, Any]:
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{file} is not a medfed checkpoint: torch.load cannot read it as tensors and plain values "
            f"({type(err).__name__}). Give a run's checkpoints/best.pt or final.pt."
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        held = ", ".join(map(str, list(payload)[:6])) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{file} is not a medfed checkpoint: it lacks {', '.join(missing)} (it holds: {held}). "
            "Give a run's checkpoints/best.pt or final.pt."
        )
    if not isinstance(payload["state_dict"], Mapping) or not isinstance(payload["config"], Mapping):
        raise CheckpointError(f"{file} is not a medfed checkpoint: state_dict and config must be mappings.")
    return payload


def _model_shape(payload: Mapping[str, Any], cfg: RunConfig, file: Path) -> ModelShape:
    """The checkpoint's ``"model_shape"``; for older checkpoints, rebuilt as training built it."""
    if "model_shape" in payload:
        return ModelShape.from_json(payload["model_shape"], source=f"Checkpoint {file}")
    if cfg.is_deployment:
        return model_shape_for(cfg, None)
    from medfed.shared.data.loading import load_dataset

    try:
        return model_shape_for(cfg, load_dataset(cfg).train)
    except DataError as err:
        raise CheckpointError(
            f"Checkpoint {file} predates recorded model shapes, and its training data ({err}) is not here to "
            "rebuild the shape from. Re-run training with this medfed version."
        ) from None


def _threshold(shape: ModelShape, metrics: Mapping[str, float]) -> tuple[float | None, str]:
    if shape.task != "classification" or shape.num_classes != 2:
        return None, "argmax"
    value = metrics.get("threshold")
    if value is None or not 0.0 <= value <= 1.0:
        logger.warning("The checkpoint records no validation threshold: binary labels use %.1f.", DEFAULT_THRESHOLD)
        return DEFAULT_THRESHOLD, "default"
    return float(value), "validation"
