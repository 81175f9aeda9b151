"""Pretraining an initialization on public data (``medfed pretrain``; pure torch / MONAI, no Flower).

Two modes train a registry model (:mod:`medfed.shared.models`) on a public MedMNIST npz file or
datalist and return a medfed checkpoint payload (the dict ``RunDirectory.save_checkpoint`` writes:
``"state_dict"``, ``"config"``, ``"round"``, ``"metrics"``, ``"model_shape"``, plus ``"pretrain"``)
that ``init-weights`` loads:

``"supervised"``
    The registry model trained on the public set's own labels with medfed's training loop
    (:func:`medfed.shared.training.train_epochs`, cosine learning rate per epoch). Its head has the
    public set's classes; a target with other classes keeps the backbone and gets a new head.
``"contrastive"``
    SimCLR (Chen et al. 2020): two random MONAI augmentations of every image
    (:func:`contrastive_views`), the backbone's pooled features (the model with its head replaced by
    ``nn.Identity``: :func:`backbone_features`) through a small projection MLP
    (:class:`ProjectionHead`, discarded afterwards), MONAI's NT-Xent ``ContrastiveLoss``. Labels are
    not used, so any image set works (a segmentation datalist's images too). The checkpoint's head
    is the freshly initialised one the model was built with (``pretrain["untrained_keys"]`` names it).

The head of each classification model comes from the model registry (``ModelSpec.head``), :data:`HEAD_LAYERS`.

Privacy: the payload names the data by file name and SHA-256 only (no paths, no pixel data).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from monai.losses import ContrastiveLoss
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandRotate90,
    RandScaleCrop,
    RandScaleIntensity,
    Resize,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfed.shared.config import NORMS, RunConfig
from medfed.shared.data.base import DataSplits, ImageSet
from medfed.shared.models import DP_NORM, MODELS, build_model, model_task
from medfed.shared.seeding import seed_everything
from medfed.shared.training import (
    TrainSettings,
    cosine_lr,
    evaluate,
    make_optimizer,
    make_train_loader,
    train_epochs,
)

__all__ = [
    "HEAD_LAYERS",
    "PRETRAIN_MODES",
    "PretrainError",
    "PretrainSettings",
    "PretrainResult",
    "ProjectionHead",
    "TwoViews",
    "backbone_features",
    "convert_channels",
    "contrastive_views",
    "head_layer",
    "linear_probe",
    "load_public_data",
    "pretrain",
    "train_contrastive",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

PretrainMode = Literal["supervised", "contrastive"]
PRETRAIN_MODES: tuple[str, ...] = get_args(PretrainMode)

HEAD_LAYERS: dict[str, str] = {name: spec.head[-1] for name, spec in MODELS.items() if spec.head}
"""The final ``nn.Linear`` (the classification head) of each classification model, as a dotted
module path, from the model registry's ``head`` (:class:`medfed.shared.models.ModelSpec`: the one
definition of "head", shared with the ``trainable`` modes). Everything before it is the backbone,
whose output (the head's input) is the pooled feature vector ``(B, F)``."""

RGB_TO_GRAY: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights, used to turn RGB images into one channel (``--in-channels 1``)."""


class PretrainError(ValueError):
    """Bad pretraining input (model, mode, channels, data); the message names the flag to change."""


@dataclass(frozen=True)
class PretrainSettings:
    """How :func:`pretrain` trains.

    Parameters
    ----------
    model, norm
        Registry name and normalisation (default :data:`~medfed.shared.models.DP_NORM`, ``"group"``,
        the DP fine-tuning target's norm: the state dict keys depend on it).
    mode
        One of :data:`PRETRAIN_MODES`.
    epochs, batch_size, learning_rate, optimizer, weight_decay
        Optimisation (cosine learning rate over the epochs; ``"adam"`` or ``"sgd"``).
    seed
        Seeds weights, shuffling and augmentation.
    in_channels
        Channels the model takes; 0 keeps the data's. 3 -> 1 uses BT.601 luma, 1 -> 3 repeats.
    num_classes
        Contrastive: the classes of the (untrained) head, i.e. the later target's, so the checkpoint
        matches the target model key for key and shape for shape. Supervised: 0 (the data's classes).
    temperature, projection_dim
        Contrastive: NT-Xent temperature and the projection MLP's output size.
    all_splits
        Contrastive: train on the images of all three splits of the public set (labels are not
        used); ``False``: the train split only.
    """

    model: str
    mode: str = "contrastive"
    norm: str = DP_NORM
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 1e-6
    seed: int = 0
    in_channels: int = 0
    num_classes: int = 0
    temperature: float = 0.2
    projection_dim: int = 64
    all_splits: bool = False

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise PretrainError(f"--model {self.model!r} is not a registered model. Valid: {', '.join(MODELS)}.")
        if self.mode not in PRETRAIN_MODES:
            raise PretrainError(f"--mode {self.mode!r} is invalid. Valid: {', '.join(PRETRAIN_MODES)}.")
        if self.norm not in NORMS:
            raise PretrainError(f"--norm {self.norm!r} is invalid. Valid: {', '.join(NORMS)}.")
        if self.mode == "contrastive" and self.model not in HEAD_LAYERS:
            raise PretrainError(
                f"--mode contrastive needs a classification model with a pooled feature vector; "
                f"--model {self.model!r} has none. Valid: {', '.join(HEAD_LAYERS)} (or --mode supervised)."
            )
        for flag, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 2),
                                 ("--in-channels", self.in_channels, 0), ("--num-classes", self.num_classes, 0),
                                 ("--projection-dim", self.projection_dim, 1)):
            if value < low:
                raise PretrainError(f"{flag} {value} is invalid: it must be >= {low}.")
        if self.all_splits and self.mode != "contrastive":
            raise PretrainError("--all-splits is for --mode contrastive (supervised keeps the validation split to check itself).")
        if self.mode == "contrastive" and self.num_classes == 1:
            raise PretrainError("--num-classes 1 is invalid: a classification head has >= 2 classes.")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise PretrainError(f"--lr {self.learning_rate} is invalid: it must be > 0.")
        if not self.temperature > 0:
            raise PretrainError(f"--temperature {self.temperature} is invalid: it must be > 0.")


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` returns.

    Parameters
    ----------
    model
        The pretrained registry model (CPU, eval mode); contrastive: with its initial head.
    payload
        The checkpoint payload (:func:`write_checkpoint` saves it).
    epoch_losses
        Mean training loss of each epoch (supervised: cross-entropy; contrastive: NT-Xent).
    seconds
        Wall time of the training.
    """

    model: nn.Module
    payload: dict[str, Any]
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------- data
def load_public_data(path: str | Path, *, image_size: int = 0, seed: int = 0) -> DataSplits:
    """Read a public npz file or datalist with medfed's readers (:func:`medfed.shared.data.loading.load_dataset`).

    Raises
    ------
    PretrainError
        The path does not exist, or is neither ``.npz`` nor ``.json`` (naming ``--data``).
    DataError
        The readers' own errors (naming the file and the fix).
    """
    from medfed.shared.data.loading import load_dataset

    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise PretrainError(
            f"--data {str(path)!r} {what}. Give a MedMNIST-style .npz file or a datalist .json "
            "(e.g. --data ../shared/data/medmnist/retinamnist.npz)."
        )
    if file.suffix not in (".npz", ".json"):
        raise PretrainError(f"--data {file.name}: unknown file type {file.suffix!r}. Valid: .npz or .json (datalist).")
    if file.suffix == ".json" and image_size <= 0:
        raise PretrainError(f"--data {file.name} is a datalist: give --image-size (every image is resized to it).")
    return load_dataset(RunConfig(dataset=str(file), image_size=image_size, seed=seed))


def convert_channels(images: np.ndarray, *, channels: int) -> np.ndarray:
    """Images ``(N, C, *spatial)`` with ``channels`` channels: 3 -> 1 by BT.601 luma, 1 -> 3 by repeating.

    Raises
    ------
    PretrainError
        Any other change (naming ``--in-channels``).
    """
    have = images.shape[1]
    if channels in (0, have):
        return images
    if have == 3 and channels == 1:
        weights = np.asarray(RGB_TO_GRAY, dtype=images.dtype).reshape((1, 3) + (1,) * (images.ndim - 2))
        return (images * weights).sum(axis=1, keepdims=True, dtype=images.dtype)
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    raise PretrainError(
        f"--in-channels {channels}: the data has {have} channel(s); medfed converts RGB to grey (3 -> 1, "
        f"--in-channels 1) and grey to RGB (1 -> 3, --in-channels 3) only. Give --in-channels {have} or 0 "
        "to keep the data's channels."
    )


def _with_channels(data: ImageSet, channels: int) -> ImageSet:
    if channels in (0, data.in_channels):
        return data
    return ImageSet(convert_channels(data.images, channels=channels), data.targets, data.task, data.num_classes,
                    data.metadata, sources=data.sources, class_names=data.class_names)


# ---------------------------------------------------------------------------- backbone
def head_layer(model_name: str) -> str:
    """The dotted path of ``model_name``'s head (:data:`HEAD_LAYERS`).

    Raises
    ------
    PretrainError
        A model without one (segmentation, detection), listing those that have one.
    """
    try:
        return HEAD_LAYERS[model_name]
    except KeyError:
        raise PretrainError(
            f"--model {model_name!r} has no classification head over pooled features. "
            f"Models with one: {', '.join(HEAD_LAYERS)}."
        ) from None


@contextlib.contextmanager
def backbone_features(model: nn.Module, model_name: str) -> Iterator[int]:
    """Within the block, ``model`` maps ``(B, C, *spatial)`` to backbone features ``(B, F)``.

    The head (:data:`HEAD_LAYERS`) is replaced by ``nn.Identity`` and put back afterwards,
    unchanged; the block gets ``F`` (the head's ``in_features``).
    """
    path = head_layer(model_name)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = getattr(parent, attr)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{model_name}: {path} is a {type(head).__name__}, not the nn.Linear head.")
    setattr(parent, attr, nn.Identity())
    try:
        yield head.in_features
    finally:
        setattr(parent, attr, head)


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP: ``Linear(F, F) -> ReLU -> Linear(F, P)``; maps ``(B, F)`` to ``(B, P)``."""

    def __init__(self, *, features: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project features ``(B, F)`` to ``(B, P)``."""
        return self.net(x)


# ---------------------------------------------------------------------------- contrastive
def contrastive_views(*, spatial_shape: tuple[int, ...]) -> Compose:
    """SimCLR-style random view of one image ``(C, *spatial)`` in ``[0, 1]`` (MONAI array transforms).

    A random crop of 50-100% of each side resized back to ``spatial_shape``, flips along every
    axis, a random 90-degree rotation (square images), gamma contrast, intensity scaling, Gaussian
    blur and noise. Colour jitter has no analogue for grey medical images; gamma and scaling stand
    in for it.
    """
    spatial_dims = len(spatial_shape)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    steps: list[Any] = [
        RandScaleCrop(roi_scale=0.5, max_roi_scale=1.0, random_size=True, random_center=True),
        Resize(spatial_size=spatial_shape, mode=mode, align_corners=False),
    ]
    steps += [RandFlip(prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    if spatial_shape[-1] == spatial_shape[-2]:
        steps.append(RandRotate90(prob=0.5, spatial_axes=(spatial_dims - 2, spatial_dims - 1)))
    steps += [
        RandAdjustContrast(prob=0.8, gamma=(0.6, 1.6)),
        RandScaleIntensity(factors=0.25, prob=0.8),
        RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0)),
        RandGaussianNoise(prob=0.5, std=0.05),
    ]
    return Compose(steps)


class TwoViews(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Items are two augmented views ``(C, *spatial)`` of one image of ``images`` ``(N, C, *spatial)``."""

    def __init__(self, images: np.ndarray, *, transform: Compose, seed: int) -> None:
        self.images = images
        self.transform = transform
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=seed % (2**32))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.as_tensor(self.images[index], dtype=torch.float32)
        return self._view(image), self._view(image)

    def _view(self, image: torch.Tensor) -> torch.Tensor:
        view = torch.as_tensor(self.transform(image), dtype=torch.float32)
        return view.as_subclass(torch.Tensor).contiguous()


def train_contrastive(
    model: nn.Module,
    data: ImageSet,
    *,
    settings: PretrainSettings,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """SimCLR-train ``model``'s backbone on ``data``'s images (labels unused); the head is untouched.

    Parameters
    ----------
    model
        A registry model named ``settings.model`` taking ``data``'s images ``(B, C, *spatial)``.
    on_epoch
        Called after each epoch with ``(epoch, mean loss)`` (1-based epoch).

    Returns
    -------
    list of float
        The mean NT-Xent loss of each epoch.
    """
    batch = min(settings.batch_size, len(data))
    if batch < 2:
        raise PretrainError(f"--mode contrastive needs at least 2 images; the data has {len(data)}.")
    views = TwoViews(data.images, transform=contrastive_views(spatial_shape=data.spatial_shape), seed=settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(views, batch_size=batch, shuffle=True, drop_last=True, generator=generator)
    loss_fn = ContrastiveLoss(temperature=settings.temperature)
    losses: list[float] = []
    model.to(device).train()
    with backbone_features(model, settings.model) as features:
        projection = ProjectionHead(features=features, out_features=settings.projection_dim).to(device)
        params = [*model.parameters(), *projection.parameters()]
        optimizer = make_optimizer(params, name=settings.optimizer, learning_rate=settings.learning_rate,
                                   weight_decay=settings.weight_decay)
        for epoch in range(1, settings.epochs + 1):
            _set_lr(optimizer, cosine_lr(settings.learning_rate, step=epoch, total=settings.epochs))
            total, count = 0.0, 0
            for first, second in loader:
                first, second = first.to(device), second.to(device)
                optimizer.zero_grad(set_to_none=True)
                z = projection(model(torch.cat([first, second])))
                loss = loss_fn(z[: len(first)], z[len(first):])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(first)
                count += len(first)
            mean = total / max(count, 1)
            if not math.isfinite(mean):
                raise FloatingPointError("contrastive pretraining diverged (non-finite loss); lower --lr.")
            losses.append(mean)
            if on_epoch is not None:
                on_epoch(epoch, mean)
    return losses


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------- supervised
def _train_supervised(
    model: nn.Module,
    splits: DataSplits,
    *,
    settings: PretrainSettings,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None,
) -> tuple[list[float], dict[str, float]]:
    """medfed's training loop on the public labels, one :func:`train_epochs` call per epoch (cosine
    learning rate); returns the epoch losses and the final validation metrics (empty without one)."""
    loader = make_train_loader(splits.train, TrainSettings(
        epochs=1, batch_size=settings.batch_size, learning_rate=settings.learning_rate, optimizer=settings.optimizer,
        weight_decay=settings.weight_decay, seed=settings.seed,
    ))
    optimizer = make_optimizer(model.parameters(), name=settings.optimizer, learning_rate=settings.learning_rate,
                               weight_decay=settings.weight_decay)
    losses: list[float] = []
    for epoch in range(1, settings.epochs + 1):
        _set_lr(optimizer, cosine_lr(settings.learning_rate, step=epoch, total=settings.epochs))
        result = train_epochs(model, loader, optimizer, task=splits.task, epochs=1, device=device,
                              reestimate_bn=epoch == settings.epochs)
        losses.append(result.loss)
        if on_epoch is not None:
            on_epoch(epoch, result.loss)
    val: dict[str, float] = {}
    if len(splits.val):
        metrics = evaluate(model, splits.val, device=device)
        val = {f"val-{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_examples"}
    return losses, val


# ---------------------------------------------------------------------------- entry point
def pretrain(
    splits: DataSplits,
    *,
    settings: PretrainSettings,
    data_name: str,
    data_sha256: str,
    device: torch.device | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Pretrain ``settings.model`` on ``splits`` (supervised: the train split and its labels; contrastive:
    the train split's images, or every split's with ``settings.all_splits``) and build the checkpoint payload.

    Parameters
    ----------
    splits
        The public data (:func:`load_public_data`); images ``(N, C, *spatial)``.
    data_name, data_sha256
        How the payload names the data (a file name, never a path) and its file's SHA-256.
    device
        Default: the CPU.
    on_epoch
        Called after each epoch with ``(epoch, mean loss)``.

    Raises
    ------
    PretrainError
        A model whose task does not fit the data (supervised), or channels that cannot be converted.
    """
    device = device or torch.device("cpu")
    train = _with_channels(splits.train, settings.in_channels)
    used = train  # the images trained on
    task = model_task(settings.model)
    if settings.mode == "supervised":
        if task != train.task:
            matching = ", ".join(n for n, s in MODELS.items() if s.task == train.task)
            raise PretrainError(
                f"--mode supervised trains on the data's labels, but --model {settings.model!r} is a {task} "
                f"model and the data is a {train.task} set. Use one of: {matching} (or --mode contrastive)."
            )
        if settings.num_classes not in (0, train.num_classes):
            raise PretrainError(
                f"--num-classes {settings.num_classes}: --mode supervised trains a head for the data's "
                f"{train.num_classes} classes; leave --num-classes out (init-weights gives the target a new head)."
            )
        num_classes = train.num_classes
    else:
        num_classes = settings.num_classes or 2
    seed_everything(settings.seed)
    model = build_model(settings.model, spatial_dims=train.spatial_dims, in_channels=train.in_channels,
                        out_channels=num_classes, norm=settings.norm, image_size=train.spatial_shape)
    if settings.all_splits:  # contrastive only (PretrainSettings checks): labels are not used
        images = np.concatenate([train.images, *(_with_channels(part, settings.in_channels).images
                                                 for part in (splits.val, splits.test))])
        used = ImageSet(images, np.zeros(len(images), np.int64), "classification", 2)
    logger.info(
        "Pretraining %s (%s, norm %s) on %d images %s of %s, %d epoch(s).", settings.model, settings.mode,
        settings.norm, len(used), train.images.shape[1:], data_name, settings.epochs,
    )
    start = time.perf_counter()
    val_metrics: dict[str, float] = {}
    if settings.mode == "supervised":
        val = _with_channels(splits.val, settings.in_channels)
        losses, val_metrics = _train_supervised(
            model, DataSplits(train, val, splits.test), settings=settings, device=device, on_epoch=on_epoch
        )
        untrained: list[str] = []
    else:
        losses = train_contrastive(model, used, settings=settings, device=device, on_epoch=on_epoch)
        prefix = head_layer(settings.model) + "."
        untrained = [k for k in model.state_dict() if k.startswith(prefix)]
    seconds = time.perf_counter() - start
    model.to("cpu").eval()
    payload = _payload(model, settings=settings, data=train, num_classes=num_classes, losses=losses,
                       val_metrics=val_metrics, untrained=untrained, seconds=seconds, data_name=data_name,
                       data_sha256=data_sha256, source_channels=splits.train.in_channels, samples=len(used))
    return PretrainResult(model=model, payload=payload, epoch_losses=losses, seconds=seconds)


def _payload(
    model: nn.Module,
    *,
    settings: PretrainSettings,
    data: ImageSet,
    num_classes: int,
    losses: list[float],
    val_metrics: dict[str, float],
    untrained: list[str],
    seconds: float,
    data_name: str,
    data_sha256: str,
    source_channels: int,
    samples: int,
) -> dict[str, Any]:
    """The medfed checkpoint dict (``RunDirectory.save_checkpoint``'s keys) plus ``"pretrain"``."""
    from medfed import __version__
    from medfed.shared.inference import ModelShape

    task = model_task(settings.model)
    shape = ModelShape(task, data.spatial_dims, data.in_channels, num_classes, data.spatial_shape)  # type: ignore[arg-type]
    config = RunConfig(
        dataset=data_name, model=settings.model, norm=settings.norm, image_size=data.spatial_shape[0],
        spatial_dims=data.spatial_dims, in_channels=data.in_channels, num_classes=num_classes, seed=settings.seed,
        batch_size=settings.batch_size, learning_rate=settings.learning_rate, optimizer=settings.optimizer,
        weight_decay=settings.weight_decay, num_server_rounds=1, local_epochs=settings.epochs,
    ).to_run_config()
    conversion = None if data.in_channels == source_channels else f"{source_channels}->{data.in_channels}"
    metrics = {"pretrain-loss": float(losses[-1]), **val_metrics}
    return {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": config,
        "round": 0,
        "metrics": metrics,
        "model_shape": shape.to_json(),
        "pretrain": {
            "mode": settings.mode,
            "data": {"name": data_name, "sha256": data_sha256, "samples": samples,
                     "splits": "train+val+test" if settings.all_splits else "train", "task": data.task,
                     "classes": data.num_classes, "channel_conversion": conversion},
            "epochs": settings.epochs,
            "loss_per_epoch": [float(x) for x in losses],
            "loss": "cross-entropy" if settings.mode == "supervised" else f"nt-xent (temperature {settings.temperature})",
            "head": "trained on the data's labels" if settings.mode == "supervised" else "random init (untrained)",
            "untrained_keys": untrained,
            "settings": {k: v for k, v in asdict(settings).items()},
            "seconds": float(seconds),
            "medfed_version": __version__,
        },
    }


@torch.no_grad()
def _features(model: nn.Module, model_name: str, images: np.ndarray, *, batch_size: int) -> torch.Tensor:
    """Backbone features ``(N, F)`` of ``images`` ``(N, C, *spatial)`` (eval mode, no augmentation)."""
    model.eval()
    out = []
    with backbone_features(model, model_name):
        for start in range(0, len(images), batch_size):
            out.append(model(torch.as_tensor(images[start : start + batch_size], dtype=torch.float32)))
    return torch.cat(out)


def linear_probe(
    model: nn.Module,
    model_name: str,
    *,
    train: ImageSet,
    test: ImageSet,
    weight_decay: float = 1e-3,
    batch_size: int = 128,
) -> dict[str, float]:
    """How linearly separable the backbone's features make a labelled task: the standard check of an
    initialization (a frozen backbone, a logistic regression on its features).

    Features ``(N, F)`` of ``train`` and ``test`` are standardised with the train mean and deviation;
    a multinomial logistic regression with L2 ``weight_decay`` is fitted on ``train`` by L-BFGS
    (full batch, 200 iterations) and scored on ``test``.

    Returns
    -------
    dict
        :func:`medfed.shared.metrics.classification_metrics` of the probe on ``test`` (``auc``,
        ``accuracy``, ``majority-rate``, ...).
    """
    from medfed.shared.metrics import classification_metrics

    x_train = _features(model, model_name, train.images, batch_size=batch_size)
    x_test = _features(model, model_name, test.images, batch_size=batch_size)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.as_tensor(train.targets, dtype=torch.long)
    probe = nn.Linear(x_train.shape[1], train.num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(x_train), y_train) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        logits = probe(x_test)
    return classification_metrics(logits, torch.as_tensor(test.targets), num_classes=test.num_classes)


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Save ``payload`` with ``torch.save`` atomically (readable with ``torch.load(weights_only=True)``)."""
    from medfed.shared.files import write_atomically

    return write_atomically(path, lambda fh: torch.save(payload, fh), mode=0o644)

