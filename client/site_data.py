"""A site's local data: its share of a dataset in simulation, its own files in deployment."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from shared.config import RunConfig
from shared.data.base import ImageSet
from shared.data.loading import load_dataset
from shared.partition import partition_indices

__all__ = ["SiteData", "simulated_site_data"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """The training and validation sets one site trains and evaluates on."""

    train: ImageSet
    val: ImageSet


def simulated_site_data(cfg: RunConfig, *, site_index: int, num_sites: int) -> SiteData:
    """Site ``site_index``'s share of the run's dataset.

    The training split is partitioned with ``cfg.partition`` (IID, Dirichlet label skew with
    ``cfg.dirichlet_alpha``, or quantity skew); the validation split with the same method and
    a derived seed. Every site computes the same partition independently from ``cfg.seed``.
    """
    if not 0 <= site_index < num_sites:
        raise ValueError(f"site index {site_index} is outside [0, {num_sites}).")
    train_parts, val_parts = _partitions(cfg, num_sites)
    splits = load_dataset(cfg)
    return SiteData(
        train=splits.train.subset(train_parts[site_index]),
        val=splits.val.subset(val_parts[site_index]),
    )


@functools.lru_cache(maxsize=4)
def _partitions(cfg: RunConfig, num_sites: int) -> tuple[list, list]:
    splits = load_dataset(cfg)
    kwargs = {"num_sites": num_sites, "method": cfg.partition, "alpha": cfg.dirichlet_alpha}
    train_parts = partition_indices(splits.train.class_labels(), seed=cfg.seed, **kwargs)
    val_parts = partition_indices(
        splits.val.class_labels(), seed=cfg.seed + 1, min_per_site=1, **kwargs
    )
    return train_parts, val_parts
