"""Local training and evaluation loops (pure PyTorch / MONAI; no Flower).

The same loops serve a hospital site, the pooled baseline and the server's own evaluation.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from medfed.shared.data.base import ImageSet
from medfed.shared.metrics import choose_threshold, classification_metrics, segmentation_metrics
from medfed.shared.precision import eval_autocast
from medfed.shared.transforms import AugmentedBatches, BatchFlipShift, ImageSetDataset, train_transforms

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

__all__ = [
    "TrainSettings",
    "TrainResult",
    "cosine_lr",
    "make_loss",
    "LogitAdjustedLoss",
    "class_counts",
    "make_optimizer",
    "make_train_loader",
    "train_epochs",
    "evaluate",
    "evaluate_at_validation_threshold",
    "evaluate_detection",
    "predict",
    "reestimate_bn",
    "update_bn_stats",
    "select_device",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """How one site trains locally in one round.

    Parameters
    ----------
    epochs
        Local epochs over the site's training data.
    batch_size
        Mini-batch size (the expected size, under Poisson sampling with DP).
    learning_rate
        Learning rate for this round (the server's schedule is already applied).
    optimizer
        ``"sgd"`` (momentum 0.9) or ``"adam"``.
    weight_decay
        L2 weight decay.
    proximal_mu
        FedProx proximal weight; 0 disables the term.
    augment
        Random flips and shifts (see :func:`medfed.shared.transforms.train_transforms`; classification
        batches: :class:`medfed.shared.transforms.BatchFlipShift`).
    seed
        Seeds shuffling and augmentation of this round at this site.
    patch_size
        Segmentation: train on random patches of this side (``patch-size``); 0: whole images.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    augment: bool = True
    seed: int = 0
    patch_size: int = 0


@dataclass(frozen=True)
class TrainResult:
    """What local training reports: scalars only."""

    loss: float
    num_examples: int
    steps: int
    seconds: float


def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device = {preference!r} was asked for but CUDA is not available; use 'cpu' or 'auto'.")
    return torch.device(preference)


def cosine_lr(base_lr: float, *, step: int, total: int) -> float:
    """Cosine-decayed learning rate for step ``step`` (1-based) of ``total``."""
    if total <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total))


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + offset``: label-skew corrections with a per-class offset.

    ``"balanced-softmax"`` (Ren et al. 2020): ``offset_c = log(n_c / sum(n))``; ``"fedlc"``
    (Zhang et al. 2022, federated logit calibration): ``offset_c = -tau * n_c^(-1/4)``. ``n_c``
    are the site's own training class counts, each taken as at least 1 (a class the site never
    saw gets the offset of one example instead of an infinite one). Both lower a rare class's
    logit during training only, so the model has to raise it: the trained model's plain logits
    are what is evaluated and sent.

    Parameters
    ----------
    name
        ``"balanced-softmax"`` or ``"fedlc"``.
    counts
        Training examples per class, shape ``(K,)``.
    tau
        FedLC's calibration strength (ignored by balanced softmax).
    """

    def __init__(self, *, name: str, counts: Sequence[float], tau: float = 1.0) -> None:
        super().__init__()
        n = torch.as_tensor(list(counts), dtype=torch.float32).clamp(min=1.0)
        if name == "balanced-softmax":
            offset = torch.log(n / n.sum())
        elif name == "fedlc":
            offset = -tau * n.pow(-0.25)
        else:
            raise ValueError(f"loss = {name!r} is invalid here. Valid choices: 'balanced-softmax', 'fedlc'.")
        self.name = name
        self.register_buffer("offset", offset)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` ``(B, K)`` plus the offset against ``targets`` ``(B,)``."""
        return nn.functional.cross_entropy(logits + self.offset.to(logits.device, logits.dtype), targets)


def class_counts(data: ImageSet) -> list[int]:
    """Training examples per class of a classification set, length ``num_classes``."""
    return [int(c) for c in torch.bincount(torch.as_tensor(data.targets).long().flatten(), minlength=data.num_classes)]


def make_loss(
    task: str, *, name: str = "ce", counts: Sequence[float] | None = None, tau: float = 1.0
) -> nn.Module:
    """The training loss: the per-image RetinaNet loss for detection
    (:class:`medfed.shared.detection.DetectionLoss`), Dice + cross-entropy for segmentation; for classification
    cross-entropy (``name = "ce"``) or a :class:`LogitAdjustedLoss` over the site's ``counts``.

    Raises
    ------
    ValueError
        A label-skew loss for segmentation, or without ``counts``.
    """
    if task == "detection":
        from medfed.shared.detection import DetectionLoss

        return DetectionLoss()
    if task == "segmentation":
        if name != "ce":
            raise ValueError(f"loss = {name!r} is for classification; segmentation trains with Dice + CE (loss = 'ce').")
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "ce":
        return nn.CrossEntropyLoss()
    if counts is None:
        raise ValueError(f"loss = {name!r} needs the site's training class counts.")
    return LogitAdjustedLoss(name=name, counts=counts, tau=tau)


def make_optimizer(
    params: Sequence[nn.Parameter] | Any, *, name: str, learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, or Adam."""
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer = {name!r} is invalid. Valid choices: 'sgd', 'adam'.")


def make_train_loader(data: ImageSet, settings: TrainSettings) -> DataLoader:
    """A shuffling, seeded loader over ``data`` with augmentation if asked for.

    Classification batches are augmented whole after collation (:class:`~medfed.shared.transforms.
    BatchFlipShift`, the flips and shifts of :func:`~medfed.shared.transforms.train_transforms` drawn per
    image); segmentation and detection items one at a time (their masks and boxes move with them)."""
    patch = settings.patch_size if data.task == "segmentation" else 0
    batched = settings.augment and data.task == "classification"
    transform = (
        train_transforms(task=data.task, spatial_dims=data.spatial_dims, patch_size=patch, augment=settings.augment)
        if (settings.augment and not batched) or patch
        else None
    )
    dataset = ImageSetDataset(data, transform=transform, seed=settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    collate = (
        {"collate_fn": AugmentedBatches(BatchFlipShift(spatial_dims=data.spatial_dims, seed=settings.seed))}
        if batched
        else _collate(data)
    )
    return DataLoader(
        dataset,
        batch_size=min(settings.batch_size, len(data)),
        shuffle=True,
        generator=generator,
        drop_last=False,
        **collate,
    )


def _collate(data: ImageSet) -> dict[str, Any]:
    """Detection batches keep each image's boxes apart (a list of ``(M_i, 5)`` tensors)."""
    if data.task != "detection":
        return {}
    from medfed.shared.detection import collate_detection

    return {"collate_fn": collate_detection}


def _to_device(targets: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A batch's targets on ``device`` (detection: a list of per-image box tensors)."""
    if isinstance(targets, (list, tuple)):
        return [t.to(device) for t in targets]
    return targets.to(device)


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    task: str,
    epochs: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    global_params: Sequence[torch.Tensor] | None = None,
    criterion: Callable[..., Any] | None = None,
    gradient_correction: Sequence[torch.Tensor] | None = None,
    reestimate_bn: bool = True,
    bn_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``loader``.

    Parameters
    ----------
    model
        Network mapping ``(B, C, *spatial)`` images to logits ``(B, K)`` or ``(B, K, *spatial)``.
        May be an Opacus ``GradSampleModule``.
    loader
        Yields ``(images, targets)`` batches (possibly empty under Poisson sampling).
    optimizer
        An optimizer over ``model``'s parameters (possibly an Opacus ``DPOptimizer``).
    task
        ``"classification"`` or ``"segmentation"``.
    proximal_mu, global_params
        FedProx: adds ``mu / 2 * ||w - w_global||^2`` over the trainable parameters, in the
        order of ``model.parameters()``. With a ``DPOptimizer`` the term's gradient
        ``mu * (w - w_global)`` (data-independent, so it costs no privacy) is added to the
        noisy gradient instead, since Opacus replaces the gradient with its clipped noisy sum.
    criterion
        The loss to call as ``criterion(logits, targets)``; default :func:`make_loss` of
        ``task``. Opacus ghost clipping passes its wrapped loss here.
    gradient_correction
        SCAFFOLD: ``c - c_i`` (server minus site control variate), one tensor per trainable
        parameter in the order of ``model.parameters()``, added to every step's gradient
        (Karimireddy et al. 2020, eq. (3)). Not with a ``DPOptimizer``.
    reestimate_bn
        Re-estimate BatchNorm running statistics on ``loader`` after training (see below).
    bn_dtype
        Autocast dtype of that re-estimation pass (``None``: fp32; see
        :func:`medfed.shared.precision.eval_dtype`, run-config key ``eval-precision``).

    Returns
    -------
    TrainResult
        Mean training loss over all batches and the number of examples seen per epoch.

    Notes
    -----
    With an Opacus ``DPOptimizer`` an empty Poisson batch still takes a noisy step (noise only,
    charged to the privacy accounting), as the sampled Gaussian mechanism assumes.
    """
    loss_fn = criterion if criterion is not None else make_loss(task)
    private = _is_dp_optimizer(optimizer)
    model.to(device).train()
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchors = None
    if proximal_mu > 0:
        if global_params is None:
            raise ValueError("proximal_mu > 0 needs global_params (the round's global model).")
        anchors = [g.detach().to(device) for g in global_params]
    corrections = None
    if gradient_correction is not None:
        if private:
            raise ValueError("gradient_correction (SCAFFOLD) cannot be used with DP-SGD.")
        corrections = [c.detach().to(device) for c in gradient_correction]
        if len(corrections) != len(trainable):
            raise ValueError(
                f"gradient_correction has {len(corrections)} tensors, the model {len(trainable)} trainable parameters."
            )
    with warnings.catch_warnings():
        if private:  # Opacus's hooks on the first layer, whose input needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
        total_loss, total_items, steps = _run_epochs(
            model, loader, optimizer, loss_fn, epochs=epochs, device=device, private=private,
            trainable=trainable, anchors=anchors, proximal_mu=proximal_mu, corrections=corrections,
        )
    if reestimate_bn and not private and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # A few local steps leave BatchNorm running statistics lagging behind the weights; re-
        # estimate them on the site's data for the final weights (as SWA does), so the averaged
        # statistics the server keeps match the averaged model.
        update_bn_stats(model, loader, device=device, dtype=bn_dtype)
    seconds = time.perf_counter() - start
    mean_loss = total_loss / max(total_items, 1)
    if not math.isfinite(mean_loss):
        raise FloatingPointError("training diverged (non-finite loss); lower the learning rate.")
    return TrainResult(
        loss=mean_loss,
        num_examples=len(loader.dataset),  # type: ignore[arg-type]
        steps=steps,
        seconds=seconds,
    )


def _run_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., Any],
    *,
    epochs: int,
    device: torch.device,
    private: bool,
    trainable: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor] | None,
    proximal_mu: float,
    corrections: Sequence[torch.Tensor] | None = None,
) -> tuple[float, int, int]:
    """The loop of :func:`train_epochs`; returns (summed loss, examples, optimizer steps)."""
    total_loss, total_items, steps = 0.0, 0, 0
    for _ in range(epochs):
        for images, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(images) == 0:  # Poisson sampling can draw an empty batch
                if private:
                    _empty_batch_gradients(optimizer)  # type: ignore[arg-type]
                    _private_step(optimizer, trainable, anchors, proximal_mu)  # type: ignore[arg-type]
                    steps += 1
                continue
            images, targets = images.to(device), _to_device(targets, device)
            logits = model(images)
            loss = loss_fn(logits, targets)
            if anchors is not None and not private:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchors, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            if corrections is not None:
                with torch.no_grad():
                    for p, c in zip(trainable, corrections, strict=True):
                        if p.grad is not None:
                            p.grad.add_(c)
            if private:
                _private_step(optimizer, trainable, anchors, proximal_mu)  # type: ignore[arg-type]
            else:
                optimizer.step()
            total_loss += float(loss.detach()) * len(images)
            total_items += len(images)
            steps += 1
    return total_loss, total_items, steps


def _is_dp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is an Opacus ``DPOptimizer`` (without importing Opacus when no
    module has: then it cannot be one, and a run without DP does not pay Opacus's import)."""
    optimizers = sys.modules.get("opacus.optimizers")
    return optimizers is not None and isinstance(optimizer, optimizers.DPOptimizer)


def _empty_batch_gradients(optimizer: DPOptimizer) -> None:
    """Give every parameter an empty per-sample gradient (hooks) or a zero sum (ghost clipping),
    so that the optimizer's next step adds noise to a zero gradient sum."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    for p in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _private_step(
    optimizer: DPOptimizer,
    trainable: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor] | None,
    proximal_mu: float,
) -> None:
    """Clip, noise and step; add FedProx's data-independent gradient after the noise."""
    if anchors is None:
        optimizer.step()
        return
    if optimizer.pre_step():
        with torch.no_grad():
            for p, a in zip(trainable, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - a, alpha=proximal_mu)
        optimizer.original_optimizer.step()


def reestimate_bn(
    model: nn.Module, data: ImageSet, *, device: torch.device, batch_size: int = 64, dtype: torch.dtype | None = None
) -> bool:
    """Re-estimate ``model``'s BatchNorm running statistics on ``data`` (no augmentation, no
    labels used) by :func:`update_bn_stats`, under autocast to ``dtype`` (``None``: fp32).
    Returns whether ``model`` has BatchNorm layers."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    loader = DataLoader(
        ImageSetDataset(data), batch_size=min(batch_size, max(len(data), 2)), shuffle=False, **_collate(data)
    )
    update_bn_stats(model.to(device), loader, device=device, dtype=dtype)
    model.eval()
    return True


def update_bn_stats(
    model: nn.Module, loader: DataLoader, *, device: torch.device, dtype: torch.dtype | None = None
) -> None:
    """One forward pass over ``loader`` (``(images, targets)`` batches, targets unused) that resets
    and re-estimates ``model``'s BatchNorm running statistics as their cumulative average over the
    batches (what ``torch.optim.swa_utils.update_bn`` computes), without autograd, the forward
    passes (not the loader's transforms) under autocast to ``dtype`` (``None``: fp32). The
    statistics stay fp32 buffers. Leaves ``model`` in the training/eval mode it had."""
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not momenta:
        return
    was_training = model.training
    for module in momenta:
        module.reset_running_stats()
        module.momentum = None  # a cumulative moving average
    model.train()
    try:
        with torch.no_grad():
            for batch in loader:
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                with eval_autocast(dtype, device=device):
                    model(images.to(device))
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)


SLIDING_WINDOW_OVERLAP = 0.25
"""Overlap of neighbouring windows in :func:`predict`'s sliding-window inference (MONAI's default)."""


@torch.no_grad()
def predict(
    model: nn.Module,
    data: ImageSet,
    *,
    device: torch.device,
    batch_size: int = 64,
    roi_size: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``model``'s logits on ``data`` without augmentation (eval mode).

    Parameters
    ----------
    roi_size
        Segmentation: score each whole image by ``monai.inferers.sliding_window_inference``
        with windows of this side (the training patch, ``patch-size``), overlap
        :data:`SLIDING_WINDOW_OVERLAP`, windows averaged with equal weight (an image no larger
        than the window is one window: the plain forward pass); 0: one forward pass per batch.
    dtype
        Autocast dtype of the forward passes (``None``: fp32; ``torch.bfloat16``: see
        :mod:`medfed.shared.precision`). Logits are returned and the loss computed in fp32.

    Returns
    -------
    tuple
        ``(logits, targets, mean_loss)``: logits ``(N, K)`` or ``(N, K, *spatial)`` on the CPU,
        the targets as stored, and the mean loss of :func:`make_loss`.
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set.")
    loss_fn = make_loss(data.task)
    model.to(device).eval()
    loader = DataLoader(ImageSetDataset(data), batch_size=batch_size, shuffle=False)
    logits_all: list[torch.Tensor] = []
    targets_all: list[torch.Tensor] = []
    total_loss = 0.0
    window = data.task == "segmentation" and roi_size > 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with eval_autocast(dtype, device=device):
            if window:
                logits = sliding_window_inference(
                    images, roi_size=[roi_size] * data.spatial_dims, sw_batch_size=batch_size, predictor=model,
                    overlap=SLIDING_WINDOW_OVERLAP, mode="constant",
                )
            else:
                logits = model(images)
        logits = logits.float()
        total_loss += float(loss_fn(logits, targets)) * len(images)
        logits_all.append(logits.cpu())
        targets_all.append(targets.cpu())
    return torch.cat(logits_all), torch.cat(targets_all), total_loss / len(data)


def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    device: torch.device,
    batch_size: int = 64,
    threshold: float | None = None,
    roi_size: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``data`` without augmentation.

    Parameters
    ----------
    roi_size
        Segmentation: the sliding window of :func:`predict` (0: whole images at once).
    dtype
        Autocast dtype of the forward passes (:func:`predict`; detection ignores it: fp32).
    threshold
        Binary classification: the class-1 probability threshold of the decision metrics
        (``None``: 0.5); see :func:`medfed.shared.metrics.classification_metrics`.

    Returns
    -------
    dict
        Classification: ``loss`` and :func:`medfed.shared.metrics.classification_metrics`
        (``accuracy``, ``auc`` (macro one-vs-rest ROC AUC from MONAI; left out when ``data``
        holds a single class), ``balanced-accuracy``, ``sensitivity``, ``specificity``,
        ``majority-rate``, ``predicted-classes``...). Segmentation: ``loss`` and ``dice``
        (the mean of the per-class ``dice-class-k``: :func:`medfed.shared.metrics.segmentation_metrics`).
        Plus ``num_examples``.
    """
    if data.task == "detection":
        return evaluate_detection(model, data, device=device, batch_size=batch_size)
    logits, targets, loss = predict(model, data, device=device, batch_size=batch_size, roi_size=roi_size, dtype=dtype)
    if data.task == "segmentation":
        metrics = segmentation_metrics(logits, targets, num_classes=data.num_classes)
    else:
        metrics = classification_metrics(logits, targets, num_classes=data.num_classes, threshold=threshold)
    metrics["loss"] = loss
    metrics["num_examples"] = float(len(data))
    return metrics


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, data: ImageSet, *, device: torch.device, batch_size: int = 16
) -> dict[str, float]:
    """A detector's mAP on ``data`` (:func:`medfed.shared.detection_metrics.detection_metrics`:
    ``map50``, ``map50-95``, per class ``map50-<name>`` / ``map50-95-<name>``), its mean
    per-image training loss as ``loss``, and ``num_examples``."""
    from medfed.shared.detection import DetectionLoss, collate_detection, predict_boxes
    from medfed.shared.detection_metrics import detection_metrics

    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set.")
    loss_fn = DetectionLoss()
    model.to(device).eval()
    loader = DataLoader(ImageSetDataset(data), batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    predictions: list[dict[str, Any]] = []
    total_loss = 0.0
    for images, targets in loader:
        outputs = model(images.to(device))
        total_loss += float(loss_fn(outputs, _to_device(targets, device))) * len(images)
        predictions.extend(predict_boxes(outputs))
    names = data.class_names or tuple(f"class{c}" for c in range(data.num_classes))
    metrics = detection_metrics(predictions, list(data.targets), class_names=names)
    metrics["loss"] = total_loss / len(data)
    metrics["num_examples"] = float(len(data))
    return metrics


def evaluate_at_validation_threshold(
    model: nn.Module,
    test: ImageSet,
    *,
    val: ImageSet | None,
    device: torch.device,
    batch_size: int = 64,
    roi_size: int = 0,
    dtype: torch.dtype | None = None,
    threshold_rule: str = "youden",
) -> dict[str, float]:
    """:func:`evaluate` on ``test`` with the decision threshold chosen on ``val`` (never on ``test``).

    ``dtype`` is the autocast dtype of the ``test`` forward passes (:func:`predict`). The ``val``
    pass that chooses the threshold always runs in fp32: the threshold is what a checkpoint keeps
    and ``medfed predict`` applies to fp32 probabilities, and Youden's J on a small validation
    split can have near-ties far apart, which bf16's rounding would flip (BENCHMARKS.md, "bf16
    inference and BatchNorm re-estimation (issue 19)").

    Binary classification: the threshold maximises Youden's J on ``model``'s ``val``
    predictions (``threshold_rule = "youden"``, the run-config key ``decision-threshold``:
    :func:`medfed.shared.metrics.youden_threshold`) or their accuracy (``"accuracy"``:
    :func:`medfed.shared.metrics.accuracy_threshold`); more classes: argmax.
    Classification adds ``validation-predicted-classes`` (how many classes ``model`` predicts
    on ``val`` at that threshold) and ``single-class``: 1.0 when ``model`` predicts a single
    class on ``test`` or on ``val``, at its argmax or at the threshold (a model whose argmax
    is one class for every sample, as an accuracy equal to the majority rate shows), else 0.0.
    Segmentation, or no ``val``: plain :func:`evaluate` (segmentation with the sliding window
    ``roi_size``).
    """
    if val is None or len(val) == 0 or test.task in ("segmentation", "detection"):
        return evaluate(model, test, device=device, batch_size=batch_size, roi_size=roi_size, dtype=dtype)
    val_logits, val_targets, _ = predict(model, val, device=device, batch_size=batch_size)  # fp32: see above
    threshold = None
    if test.num_classes == 2:
        threshold = choose_threshold(torch.softmax(val_logits, dim=1)[:, 1], val_targets, rule=threshold_rule)
    val_metrics = classification_metrics(val_logits, val_targets, num_classes=test.num_classes, threshold=threshold)
    logits, targets, loss = predict(model, test, device=device, batch_size=batch_size, dtype=dtype)
    metrics = classification_metrics(logits, targets, num_classes=test.num_classes, threshold=threshold)
    metrics["loss"] = loss
    metrics["num_examples"] = float(len(test))
    metrics["validation-predicted-classes"] = val_metrics["predicted-classes"]
    argmax_classes = [torch.unique(x.argmax(dim=1)).numel() for x in (logits, val_logits)]
    single = min(argmax_classes) == 1 or min(metrics["predicted-classes"], val_metrics["predicted-classes"]) == 1
    metrics["single-class"] = float(single)
    return metrics
