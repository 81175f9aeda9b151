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

A site keeps the personalized model only where its own validation split scores it better than
the global model (:func:`choose_on_validation`; on a small, skewed site a fine-tuned head can
overfit), and scores the models on its own local test split with the decision threshold chosen
on its own validation split (:func:`medfed.shared.training.evaluate_at_validation_threshold`).
Pure PyTorch (no Flower): a deployed site calls :func:`personalize` on the final global model
and its own :class:`~medfed.shared.data.base.ImageSet`; ``medfed simulate`` does it for every
simulated site (``medfed.simulations.personalization``).
"""

from __future__ import annotations

import copy
import logging

import torch
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
    reestimate_bn,
)

__all__ = [
    "choose_on_validation",
    "head_of",
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


def choose_on_validation(
    candidates: list[tuple[str, nn.Module]], val: ImageSet, *, device: torch.device
) -> tuple[str, nn.Module]:
    """The candidate a site keeps: the best on its own validation split, never on a test split.

    The score is the AUC (classification; Dice for segmentation, mAP50 for detection) when every candidate has one
    (a validation split with one class has none), else the lowest loss. A later candidate must
    score strictly better to win, so the first (the global model) keeps ties: a site adopts a
    personalized model only where its own validation data say it helps.
    """
    best_name, best_model, best_score = candidates[0][0], candidates[0][1], -float("inf")
    scores = [evaluate(m, val, device=device) for _, m in candidates]
    key = next((k for k in ("auc", "dice", "map50") if all(k in s for s in scores)), None)
    for (name, candidate), score in zip(candidates, scores, strict=True):
        value = score[key] if key is not None else -score["loss"]
        if value > best_score:
            best_name, best_model, best_score = name, candidate, value
    return best_name, best_model


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
