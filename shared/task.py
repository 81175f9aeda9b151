"""Glue from a :class:`RunConfig` to the pieces a round needs (as ``task.py`` in Flower's examples)."""

from __future__ import annotations

import logging

from torch import nn

from medfed.shared.config import RunConfig
from medfed.shared.data.base import ImageSet
from medfed.shared.init_weights import InitWeightsReport, load_init_weights
from medfed.shared.models import build_model, model_task
from medfed.shared.trainable import TrainableReport, apply_trainable
from medfed.shared.training import TrainSettings, class_counts, cosine_lr, make_loss

__all__ = [
    "model_for",
    "deployment_model",
    "initial_model",
    "initial_model_with_report",
    "trainable_model_for",
    "start_plan",
    "round_settings",
    "site_seed",
    "training_criterion",
]

logger = logging.getLogger(__name__)


def model_for(cfg: RunConfig, data: ImageSet) -> nn.Module:
    """Build ``cfg.model`` shaped for ``data`` (dims, channels, classes, image size).

    Raises
    ------
    ValueError
        If the model's task (classification / segmentation) differs from the data's.
    """
    task = model_task(cfg.model)
    if task != data.task:
        from medfed.shared.models import MODELS

        matching = ", ".join(f"--model {name}" for name, spec in MODELS.items() if spec.task == data.task)
        raise ValueError(
            f"model = {cfg.model!r} is a {task} model but the dataset is a {data.task} dataset: "
            f"choose a matching model ({matching})."
        )
    return build_model(
        cfg.model,
        spatial_dims=data.spatial_dims,
        in_channels=data.in_channels,
        out_channels=data.num_classes,
        norm=cfg.norm,
        image_size=data.spatial_shape,
    )


def deployment_model(cfg: RunConfig) -> nn.Module:
    """``cfg.model`` shaped by ``in-channels``, ``num-classes``, ``spatial-dims`` and ``image-size``:
    a deployment config (``dataset = "deployment"``), whose coordinator holds no data to shape it."""
    return build_model(
        cfg.model,
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.num_classes,
        norm=cfg.norm,
        image_size=cfg.image_size,
    )


def initial_model_with_report(
    cfg: RunConfig, data: ImageSet | None
) -> tuple[nn.Module, InitWeightsReport | None]:
    """The run's initial global model and what ``init-weights`` loaded into it (``None``: unset).

    The one place the initial weights come from: :func:`model_for` (``data``) or
    :func:`deployment_model` (``data = None``), then, with ``init-weights``,
    :func:`medfed.shared.init_weights.load_init_weights`, whose report is logged at INFO (counts
    and layer names; the weights file's path, never data). Call it after
    ``seed_everything(cfg.seed)`` so that newly initialised layers are the same everywhere.

    Raises
    ------
    shared.init_weights.InitWeightsError
        The file is missing, unsafe to read, or of another architecture (naming ``init-weights``).
    """
    model = deployment_model(cfg) if data is None else model_for(cfg, data)
    if not cfg.init_weights:
        return model, None
    report = load_init_weights(model, path=cfg.init_weights)
    for line in report.lines():
        logger.info("%s", line)
    return model, report


def initial_model(cfg: RunConfig, data: ImageSet | None) -> nn.Module:
    """:func:`initial_model_with_report` without the report: the run's initial global model."""
    return initial_model_with_report(cfg, data)[0]


def trainable_model_for(cfg: RunConfig, data: ImageSet) -> tuple[nn.Module, TrainableReport]:
    """:func:`model_for` with the parameters ``trainable`` does not train frozen
    (:func:`medfed.shared.trainable.apply_trainable`): the model a site (or the pooled
    baseline) trains."""
    model = model_for(cfg, data)
    return model, apply_trainable(model, mode=cfg.trainable, model_name=cfg.model)


def start_plan(cfg: RunConfig, data: ImageSet | None) -> list[str]:
    """What the run starts from and fine-tunes, as lines for ``--dry-run``: the ``init-weights``
    report (:meth:`~medfed.shared.init_weights.InitWeightsReport.lines`; a random initialisation
    when unset) and the ``trainable`` parameter count. Builds the model (``data = None``: the
    deployment shape) and reads the weights file, so a wrong file fails here.
    """
    model, report = initial_model_with_report(cfg, data)
    lines = report.lines() if report is not None else ["init-weights: none (random initialisation, seed "
                                                         f"{cfg.seed})"]
    lines.append(apply_trainable(model, mode=cfg.trainable, model_name=cfg.model).line())
    return lines


def round_settings(cfg: RunConfig, *, server_round: int, site_index: int) -> TrainSettings:
    """Local training settings for one site in one round (cosine learning-rate schedule)."""
    return TrainSettings(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cosine_lr(cfg.learning_rate, step=server_round, total=cfg.num_server_rounds),
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        augment=cfg.augment,
        seed=site_seed(cfg.seed, site_index=site_index, server_round=server_round),
        patch_size=cfg.patch_size,
    )


def site_seed(seed: int, *, site_index: int, server_round: int) -> int:
    """The seed of one site in one round, derived from the run's one seed."""
    return seed + 1000 * (site_index + 1) + server_round


def training_criterion(cfg: RunConfig, data: ImageSet) -> nn.Module:
    """The training loss of ``cfg``'s ``loss`` for a training set ``data``.

    One place for every trainer: a simulated or deployed site (over its own split) and the
    pooled baseline (over all sites' data) train with the same loss, so a federated/pooled
    comparison compares training regimes, not losses. Label-skew corrections
    (``balanced-softmax``, ``fedlc``) take their class prior from ``data``'s own class counts.
    """
    task = data.task
    name = cfg.loss_for(task)
    counts = class_counts(data) if name != "ce" and task == "classification" else None
    return make_loss(task, name=name, counts=counts, tau=cfg.fedlc_tau)
