"""Glue from a :class:`RunConfig` to the pieces a round needs (as ``task.py`` in Flower's examples)."""

from __future__ import annotations

from torch import nn

from medfed.shared.config import RunConfig
from medfed.shared.data.base import ImageSet
from medfed.shared.models import build_model, model_task
from medfed.shared.training import TrainSettings, cosine_lr

__all__ = ["model_for", "deployment_model", "round_settings", "site_seed"]


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
