"""A site's local data: its share of a dataset in simulation, its own files in deployment."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.shared.config import RunConfig
from medfed.shared.data.base import DataError, ImageSet
from medfed.shared.data.datalist import UnusableEntriesError
from medfed.shared.data.loading import load_dataset
from medfed.shared.partition import SiteSplits, site_partitions

__all__ = [
    "SiteData",
    "simulated_site_data",
    "simulated_partitions",
    "simulated_class_counts",
    "deployment_site_data",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """The training and validation sets one site trains and evaluates on (and its local test set).

    Parameters
    ----------
    train, val
        Images ``(N, C, *spatial)`` and targets, as :class:`~medfed.shared.data.base.ImageSet`.
    skipped_files
        Unusable datalist entries left out (``bad-data = "skip"``): in deployment the site's
        own datalist; in simulation the shared datalist every simulated site is cut from. The
        site reports it in its fit metrics as ``skipped-files``.
    """

    train: ImageSet
    val: ImageSet
    skipped_files: int = 0
    test: ImageSet | None = None
    """The site's local test split (simulation: drawn with the site's class mix; deployment: the
    datalist's ``test`` section), on which its personalized model is scored; ``None``: none."""


def simulated_site_data(cfg: RunConfig, *, site_index: int, num_sites: int) -> SiteData:
    """Site ``site_index``'s share of the run's dataset.

    The training split is partitioned with ``cfg.partition`` (IID, Dirichlet label skew with
    ``cfg.dirichlet_alpha``, or quantity skew); the site's validation and local test splits
    (``cfg.local_test_fraction`` of the training split) are drawn with the class mix of its
    training share (:func:`medfed.shared.partition.site_partitions`). Every site computes the
    same partition independently from ``cfg.seed``.
    """
    if not 0 <= site_index < num_sites:
        raise ValueError(f"site index {site_index} is outside [0, {num_sites}).")
    parts = simulated_partitions(cfg, num_sites)
    splits = load_dataset(cfg)
    test = parts.test[site_index]
    return SiteData(
        train=splits.train.subset(parts.train[site_index]),
        val=splits.val.subset(parts.val[site_index]),
        skipped_files=splits.skipped_files,
        test=splits.train.subset(test) if len(test) else None,
    )


def simulated_class_counts(cfg: RunConfig) -> list[tuple[str, dict[str, list[int]]]]:
    """Every simulated site's class counts in its training, validation and local test splits.

    Returns
    -------
    list
        ``[("site-0", {"train": [n_0, n_1, ...], "val": [...], "test": [...]}), ...]``;
        segmentation counts images with and without foreground, detection images by their most
        frequent box class; ``test`` only with
        ``local-test-fraction > 0``.
    """
    parts = simulated_partitions(cfg, cfg.num_sites)
    splits = load_dataset(cfg)
    train, val = splits.train.class_labels(), splits.val.class_labels()
    num_classes = 2 if splits.task == "segmentation" else splits.train.num_classes
    out = []
    for k in range(cfg.num_sites):
        counts = {
            "train": np.bincount(train[parts.train[k]], minlength=num_classes).tolist(),
            "val": np.bincount(val[parts.val[k]], minlength=num_classes).tolist(),
        }
        if cfg.local_test_fraction > 0:
            counts["test"] = np.bincount(train[parts.test[k]], minlength=num_classes).tolist()
        out.append((f"site-{k}", counts))
    return out


@functools.lru_cache(maxsize=4)
def simulated_partitions(cfg: RunConfig, num_sites: int) -> SiteSplits:
    """Every simulated site's indices into the run's dataset (cached per config)."""
    splits = load_dataset(cfg)
    return site_partitions(
        splits.train.class_labels(),
        splits.val.class_labels(),
        num_sites=num_sites,
        method=cfg.partition,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        local_test_fraction=cfg.local_test_fraction,
        train_sources=splits.train.sources,
        val_sources=splits.val.sources,
    )


def deployment_site_data(cfg: RunConfig, *, datalist: str) -> SiteData:
    """A hospital's own data for a deployed run: its datalist's train and validation splits.

    NIfTI and DICOM volumes are brought to RAS and, with ``cfg.spacing``, resampled to it
    (the site's own ``spacing`` from ``site.toml`` has replaced the run's by then, see
    ``medfed.client.client_app``); then images are resized to
    ``cfg.image_size`` per side with ``cfg.spatial_dims`` axes. The
    model is built from the run config (the server has no data), so the site's data must
    match it: same channel count, and labels (mask values) below ``cfg.num_classes``; a
    site that holds only some of the classes is fine. Entries that break these rules, or
    that cannot be read, are unusable: ``cfg.bad_data = "strict"`` refuses to train (the
    site's log names each entry), ``"skip"`` leaves them out and counts them
    (``SiteData.skipped_files``).

    Parameters
    ----------
    cfg
        The run config (``dataset = "deployment"``).
    datalist
        The site's datalist JSON, from the SuperNode's node config (never sent anywhere).

    Raises
    ------
    DataError
        Unusable entries with ``bad-data = "strict"``, or none usable left with ``"skip"``
        (the message is generic: the entries and files are logged at the site only, since
        Flower returns exception texts to the server), or data that does not match the run's
        model shape (the message names the setting to change).
    """
    from medfed.shared.data.boxes import is_box_datalist
    from medfed.shared.data.datalist import load_datalist

    if is_box_datalist(Path(datalist)):
        return _deployment_boxes(cfg, datalist=datalist)
    try:
        splits = load_datalist(
            datalist,
            image_size=cfg.image_size,
            spatial_dims=cfg.spatial_dims,
            seed=cfg.seed,
            on_error="skip" if cfg.bad_data == "skip" else "raise",
            num_classes=cfg.num_classes,
            in_channels=cfg.in_channels,
            spacing=cfg.spacing_mm,
        )
    except DataError as err:
        # The details name the site's files: they go to the site's own log only. Flower sends an
        # exception's text back to the server as the error reply, so that text stays generic:
        # counts per problem kind at most.
        logger.error("this site's datalist cannot be used: %s", err)
        counts = ""
        if isinstance(err, UnusableEntriesError):
            counts = " (" + ", ".join(
                f"{kind}: {n}{_kind_hint(kind, cfg)}" for kind, n in err.report.kind_counts().items()
            ) + ")"
        raise DataError(
            f"this site's datalist cannot be used for this run{counts}; the site's log names the "
            "entries (run `medfed site check` at the site; bad-data = \"skip\" in site.toml "
            "trains on the usable ones). No details are sent."
        ) from None
    if splits.train.in_channels != cfg.in_channels:
        raise DataError(
            f"this site's images have {splits.train.in_channels} channel(s) but the run's model "
            f"takes in-channels = {cfg.in_channels}. Convert the images, or ask the coordinator "
            "to change in-channels."
        )
    if splits.num_classes > cfg.num_classes:
        raise DataError(
            f"this site's datalist has {splits.num_classes} classes but the run's model has "
            f"num-classes = {cfg.num_classes}. Fix the labels (or the datalist's num_classes), "
            "or ask the coordinator to change num-classes."
        )
    train, test = splits.train, None
    if _has_section(datalist, "test"):
        test = _with_classes(splits.test, cfg.num_classes)  # the site's own local test split
    else:
        # load_datalist carved a test split the site never uses: train on it instead.
        meta = None
        if train.metadata is not None or splits.test.metadata is not None:
            meta = tuple(train.metadata or ({},) * len(train)) + tuple(splits.test.metadata or ({},) * len(splits.test))
        train = ImageSet(
            np.concatenate([train.images, splits.test.images]),
            np.concatenate([train.targets, splits.test.targets]),
            train.task,
            train.num_classes,
            meta,
        )
    logger.info("site data: %d training and %d validation samples", len(train), len(splits.val))
    if splits.skipped_files:
        logger.warning(
            "site data: %d unusable datalist entr%s left out (bad-data = skip); the site reports "
            "the count as skipped-files, `medfed site check` names them.",
            splits.skipped_files,
            "y" if splits.skipped_files == 1 else "ies",
        )
    return SiteData(
        train=_with_classes(train, cfg.num_classes),
        val=_with_classes(splits.val, cfg.num_classes),
        skipped_files=splits.skipped_files,
        test=test,
    )


def _deployment_boxes(cfg: RunConfig, *, datalist: str) -> SiteData:
    """A site's box datalist (object detection): as :func:`deployment_site_data`, with boxes."""
    from medfed.shared.data.boxes import load_box_datalist

    try:
        splits = load_box_datalist(
            Path(datalist), image_size=cfg.image_size, seed=cfg.seed, on_error="skip" if cfg.bad_data == "skip" else "raise"
        )
    except DataError as err:
        logger.error("this site's box datalist cannot be used: %s", err)
        raise DataError(
            "this site's box datalist cannot be used for this run; the site's log names the entries "
            "(bad-data = \"skip\" in site.toml trains on the usable ones). No details are sent."
        ) from None
    if splits.num_classes > cfg.num_classes:
        raise DataError(
            f"this site's box datalist has {splits.num_classes} classes but the run's model has "
            f"num-classes = {cfg.num_classes}; ask the coordinator to change num-classes."
        )
    test = splits.test if _has_section(datalist, "test") else None
    return SiteData(
        train=_with_classes(splits.train, cfg.num_classes),
        val=_with_classes(splits.val, cfg.num_classes),
        skipped_files=splits.skipped_files,
        test=_with_classes(test, cfg.num_classes) if test is not None else None,
    )


def _kind_hint(kind: str, cfg: RunConfig) -> str:
    """What the run expects, for problem kinds that compare an entry with the run's model."""
    return {
        "channels": f", the run's model takes in-channels = {cfg.in_channels}",
        "label_out_of_range": f", the run's model has num-classes = {cfg.num_classes}",
        "spatial_dims": f", the run is spatial-dims = {cfg.spatial_dims}",
    }.get(kind, "")


def _has_section(datalist: str, section: str) -> bool:
    try:
        data = json.loads(Path(datalist).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get(section))


def _with_classes(data: ImageSet, num_classes: int) -> ImageSet:
    return data.with_num_classes(num_classes)
