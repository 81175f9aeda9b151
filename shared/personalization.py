"""A site's personalized model: the global model adapted to the site's own data.

After the last round a hospital can keep, beside the global model, a model fitted to its own
patients (the model it would actually use):

``"bn"``
    The BatchNorm running statistics re-estimated on the site's training data (as SiloBN /
    FedBN keep them local: Andreux et al. 2020, Li et al. 2021), every weight unchanged.
``"head"``
    The last layer (the classifier) fine-tuned on the site's training data for a few epochs,
    everything before it frozen (as FedPer / FedRep personalise the head).
``"bn+head"``
    Both: first the statistics, then the head on top of them.

A site keeps the personalized model only where its own validation split shows, with confidence,
that it ranks better than the global model (:func:`choose_on_validation`: in 95% of paired bootstrap
resamples; on a small, skewed site a fine-tuned head can overfit and a small validation split
flatters it by chance), and scores the models on its own local test split with the decision threshold chosen
on its own validation split (:func:`medfed.shared.training.evaluate_at_validation_threshold`).
Pure PyTorch (no Flower): a deployed site calls :func:`personalize` on the final global model
and its own :class:`~medfed.shared.data.base.ImageSet`; ``medfed simulate`` does it for every
simulated site (``medfed.simulations.personalization``).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from torch import nn

from medfed.shared.config import PERSONALIZE_MODES
from medfed.shared.data.base import ImageSet
from medfed.shared.training import (
    TrainSettings,
    _to_device,
    evaluate,
    make_loss,
    make_optimizer,
    make_train_loader,
    predict,
    reestimate_bn,
)

__all__ = [
    "ADOPT_CONFIDENCE",
    "BOOTSTRAP_RESAMPLES",
    "MAX_BOOTSTRAP_SAMPLES",
    "MIN_CLASS_SAMPLES",
    "auc_gain_confidence",
    "choose_on_validation",
    "head_of",
    "judged_classes",
    "personalization_steps",
    "personalize",
]

logger = logging.getLogger(__name__)


def head_of(model: nn.Module) -> nn.Module:
    """The model's last layer: its last ``nn.Linear`` (classification), else its last convolution.

    Raises
    ------
    ValueError
        The model has neither.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        layers = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear or convolution layer to fine-tune as its head.")
    return layers[-1]


def personalize(
    model: nn.Module,
    data: ImageSet,
    *,
    mode: str,
    epochs: int,
    settings: TrainSettings,
    device: torch.device,
) -> nn.Module:
    """A personalized copy of ``model`` fitted to one site's training ``data``.

    Parameters
    ----------
    model
        The final global model (left unchanged).
    data
        The site's training split, images ``(N, C, *spatial)``.
    mode
        ``"bn"``, ``"head"``, ``"bn+head"`` (see the module docstring) or ``"off"`` (a plain copy).
    epochs
        Epochs of head fine-tuning (``"head"``, ``"bn+head"``); 0 skips it.
    settings
        Batch size, learning rate, optimizer, weight decay, augmentation and seed of the
        fine-tuning (a site uses its run's: ``medfed.shared.task.round_settings``).
    device
        Where to compute.

    Returns
    -------
    nn.Module
        The personalized model, in eval mode.
    """
    return personalization_steps(model, data, mode=mode, epochs=epochs, settings=settings, device=device)[-1][1]


def personalization_steps(
    model: nn.Module,
    data: ImageSet,
    *,
    mode: str,
    epochs: int,
    settings: TrainSettings,
    device: torch.device,
) -> list[tuple[str, nn.Module]]:
    """The global model and each step of :func:`personalize` after it, as ``(name, model)``.

    ``"bn+head"`` gives ``[("off", global copy), ("bn", ...), ("bn+head", ...)]``; ``"head"``
    gives ``[("off", ...), ("head", ...)]``. Parameters as :func:`personalize`.
    """
    if mode not in PERSONALIZE_MODES:
        raise ValueError(f"personalize = {mode!r} is invalid. Valid choices: {', '.join(map(repr, PERSONALIZE_MODES))}.")
    current = copy.deepcopy(model).to(device).eval()
    steps = [("off", current)]
    parts = mode.split("+")
    if "bn" in parts:
        current = copy.deepcopy(current)
        if reestimate_bn(current, data, device=device, batch_size=settings.batch_size):
            steps.append(("bn", current))
    if "head" in parts and epochs > 0:
        current = copy.deepcopy(current)
        _fine_tune_head(current, data, epochs=epochs, settings=settings, device=device)
        steps.append((mode, current.eval()))
    return steps


ADOPT_CONFIDENCE = 0.95
"""How sure a site's validation split must be that a personalized model ranks better than the global
one before the site adopts it: the share of paired bootstrap resamples in which its AUC is higher."""

BOOTSTRAP_RESAMPLES = 1000
"""Paired, class-stratified bootstrap resamples of the validation split (:func:`auc_gain_confidence`)."""

MIN_CLASS_SAMPLES = 5
"""A class's one-vs-rest AUC is judged only with at least this many validation images on each side
(binary: of each class). With fewer, a bootstrap cannot tell a gain from chance (a class of one image
is the same image in every resample); a site with no such class keeps the global model."""

MAX_BOOTSTRAP_SAMPLES = 2000
"""A larger validation split is bootstrapped on a class-stratified subsample of this many images (the
pairwise win matrix stays under 8 MiB; a split that large measures a real gain anyway)."""


def choose_on_validation(
    candidates: list[tuple[str, nn.Module]],
    val: ImageSet,
    *,
    device: torch.device,
    confidence: float = ADOPT_CONFIDENCE,
    seed: int = 0,
) -> tuple[str, nn.Module]:
    """The candidate a site keeps: judged on its own validation split, never on a test split.

    The first candidate is the global model. Classification: a later candidate is adopted only when its
    AUC (over the classes :func:`judged_classes` can judge) is higher than the global model's on the split
    and in at least ``confidence`` of paired, class-stratified bootstrap resamples of the split
    (:func:`auc_gain_confidence`); of those the highest AUC wins. A split with no class of
    :data:`MIN_CLASS_SAMPLES` images on each side (a one-class split included) keeps the global model. A
    site's validation split is small (BreastMNIST over 4 sites: 1-50 images, median 14), where a higher AUC is
    mostly chance: measured in the quality study, sites that adopted on any gain kept models below the
    global one on their local test splits on average (BENCHMARKS.md, "Personalized models").
    Segmentation and detection: the best Dice or mAP50 (else the lowest loss), strictly better than the
    global model's.
    """
    if val.task == "classification":
        scored = [predict(m, val, device=device)[:2] for _, m in candidates]
        targets = scored[0][1].long()
        if not judged_classes(targets.numpy(), num_classes=val.num_classes):
            logger.debug("the validation split has no class with %d images on each side: the global model is kept",
                         MIN_CLASS_SAMPLES)
            return candidates[0]
        best, best_auc = 0, -float("inf")
        for i, (logits, _) in enumerate(scored[1:], start=1):
            sure, auc, base_auc = auc_gain_confidence(
                scored[0][0], logits, targets, num_classes=val.num_classes, seed=seed
            )
            logger.debug("personalization step %s: validation AUC %.4f (global %.4f), gain confidence %.3f",
                         candidates[i][0], auc, base_auc, sure)
            if auc > base_auc and sure >= confidence and auc > best_auc:
                best, best_auc = i, auc
        return candidates[best]
    best_name, best_model, best_score = candidates[0][0], candidates[0][1], -float("inf")
    scores = [evaluate(m, val, device=device) for _, m in candidates]
    key = next((k for k in ("auc", "dice", "map50") if all(k in s for s in scores)), None)
    for (name, candidate), score in zip(candidates, scores, strict=True):
        value = score[key] if key is not None else -score["loss"]
        if value > best_score:
            best_name, best_model, best_score = name, candidate, value
    return best_name, best_model


def _pair_wins(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """``(n_pos, n_neg)``: 1 where a positive outscores a negative, 0.5 on a tie, else 0."""
    diff = scores[positive][:, None] - scores[~positive][None, :]
    return (diff > 0) + 0.5 * (diff == 0)


def auc_gain_confidence(
    base_logits: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_classes: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """How sure a validation split is that ``logits`` rank better than ``base_logits``.

    Draws ``resamples`` class-stratified bootstrap resamples of the split (each class keeps its
    count, so every resample has an AUC) and scores both models on the same resamples; the AUC is
    binary (class 1) or the macro one-vs-rest mean over :func:`judged_classes` (with every class
    judged, that of :func:`medfed.shared.metrics.classification_metrics`). Exact per resample: the AUC of a resample is
    ``c_pos^T W c_neg / (n_pos n_neg)`` with ``W`` the pairwise win matrix and ``c`` the draw counts.
    A split larger than :data:`MAX_BOOTSTRAP_SAMPLES` is resampled from a class-stratified subsample
    of that size; the AUCs returned are the whole split's.

    Parameters
    ----------
    base_logits, logits
        ``(N, K)`` logits of the global model and of the candidate on the validation split.
    targets
        ``(N,)`` integer labels, with at least one judged class (else ``ValueError``).

    Returns
    -------
    tuple
        ``(share of resamples where the candidate's AUC is higher, the candidate's AUC on the whole
        split, the global model's)``.
    """
    y = targets.long().numpy()
    columns = judged_classes(y, num_classes=num_classes)
    if not columns:
        raise ValueError(f"no class of the validation split has {MIN_CLASS_SAMPLES} images on each side to judge.")
    probs = [torch.softmax(lg.float(), dim=1) for lg in (base_logits, logits)]
    full = [sum(float(compute_roc_auc(p[:, c], torch.from_numpy(y == c).long())) for c in columns) / len(columns)
            for p in probs]
    rng = np.random.default_rng(seed)
    keep = _stratified_subsample(y, MAX_BOOTSTRAP_SAMPLES, rng)
    y, probs = y[keep], [p[keep] for p in probs]
    counts = np.zeros((resamples, len(y)))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=resamples)
    gains = np.zeros(resamples)
    for c in columns:
        positive = y == c
        cp, cn = counts[:, positive], counts[:, ~positive]
        norm = cp.sum(axis=1) * cn.sum(axis=1)
        for sign, p in ((-1.0, probs[0]), (1.0, probs[1])):
            gains += sign * ((cp @ _pair_wins(p[:, c].double().numpy(), positive)) * cn).sum(axis=1) / norm
    return float((gains > 0).mean()), full[1], full[0]


def judged_classes(y: np.ndarray, *, num_classes: int) -> list[int]:
    """The classes whose one-vs-rest AUC a validation split can judge: binary, class 1 when each class
    has :data:`MIN_CLASS_SAMPLES` images; more classes, every class with that many images in it and
    outside it."""
    candidates = [1] if num_classes == 2 else range(num_classes)
    return [c for c in candidates
            if int((y == c).sum()) >= MIN_CLASS_SAMPLES and int((y != c).sum()) >= MIN_CLASS_SAMPLES]


def _stratified_subsample(y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``size`` samples of ``y``, every class in its share (at least one each)."""
    if len(y) <= size:
        return np.arange(len(y))
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, size=max(1, round(size * len(idx) / len(y))), replace=False))
    return np.sort(np.concatenate(keep))


def _fine_tune_head(
    model: nn.Module, data: ImageSet, *, epochs: int, settings: TrainSettings, device: torch.device
) -> None:
    """Train only :func:`head_of` ``model`` for ``epochs`` epochs; the rest stays frozen, in eval
    mode (BatchNorm statistics and dropout fixed)."""
    head = head_of(model)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    optimizer = make_optimizer(
        list(head.parameters()),
        name=settings.optimizer,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    loss_fn = make_loss(data.task)
    loader = make_train_loader(data, settings)
    model.eval()
    try:
        for _ in range(epochs):
            for images, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(images.to(device)), _to_device(targets, device))
                loss.backward()
                optimizer.step()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
