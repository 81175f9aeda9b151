"""Pre-flight: everything about a run that can be refused before Ray or a SuperLink starts.

A run that cannot work should stop in seconds, with the setting to change, rather than start
a site process per hospital that each fails the same way every round. :func:`preflight` is the
one place these checks live; ``medfed simulate`` (``medfed.simulations.simulate.run_federated`` and
``medfed.simulations.pooled.run_pooled``) calls it before anything starts, and a coordinator's
``medfed run`` can call it on a deployment config (which holds no data: only the model checks
apply).

Checks, in order:

1. **Data readable**: the dataset loads (``medfed.shared.data.loading.load_dataset``; a
   :class:`~medfed.shared.data.base.DataError` names the file and the problem).
2. **Model fits the data**: the model builds for the data's dimensions, channels and classes,
   and its task (classification / segmentation) is the data's.
   With ``init-weights`` the weights file is read and matched to the model (a file of another
   architecture is refused), and ``trainable`` must be defined for the model.
3. **Model vs DP** (``dp = true``): Opacus DP-SGD cannot train BatchNorm, so ``norm = "batch"``
   (or any model with a layer Opacus rejects) is refused with the fix ``--norm group``; so are
   DP settings a site would refuse at start-up (no noise; ghost clipping on segmentation).
4. **Partition feasible** (federated runs): the sites' shares are computed exactly as the
   simulated sites compute them (``medfed.shared.partition.site_partitions``) and every site must get
   at least :data:`~medfed.shared.partition.TRAIN_MIN_PER_SITE` training and
   :data:`~medfed.shared.partition.VAL_MIN_PER_SITE` validation images.

This module never imports Flower (it is part of ``shared``).
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.data.base import DataSplits
from medfed.shared.data.loading import load_dataset
from medfed.shared.models import DP_NORM, model_task, validate_for_dp
from medfed.shared.partition import TRAIN_MIN_PER_SITE, VAL_MIN_PER_SITE, local_test_size, site_partitions
from medfed.shared.task import initial_model
from medfed.shared.trainable import apply_trainable, check_trainable

__all__ = ["PreflightError", "Preflight", "preflight", "check_dp_model", "dp_setup_problems", "max_sites"]

logger = logging.getLogger(__name__)


class PreflightError(ConfigError):
    """A run that cannot work: the message names the key (and flag) to change and a fix."""


@dataclass(frozen=True)
class Preflight:
    """What the pre-flight found (for the caller's log and for tests).

    Parameters
    ----------
    splits
        The loaded dataset (``None`` for a deployment config: the server holds no data).
    train_per_site, val_per_site
        Each simulated site's number of training and validation images (empty unless a
        federated simulation was checked).
    """

    splits: DataSplits | None
    train_per_site: tuple[int, ...] = ()
    val_per_site: tuple[int, ...] = ()


def preflight(cfg: RunConfig, *, federated: bool = True) -> Preflight:
    """Check that ``cfg`` can run at all, before any site process or server starts.

    Remembered per process: the command line checks a config before it imports Flower and
    Ray, and ``run_federated`` checks it again for its other callers at no extra cost.

    Parameters
    ----------
    cfg
        The validated run configuration.
    federated
        ``True``: a federated run (every check); ``False``: the pooled baseline (data and
        model only: it trains without DP and without sites).

    Returns
    -------
    Preflight
        The loaded splits and the sites' shares.

    Raises
    ------
    DataError
        The dataset cannot be read (the message names the file and the problem).
    ValueError
        The model does not fit the data (its task, or an image size it cannot take).
    PreflightError
        ``dp = true`` with a model Opacus cannot train (``norm = "batch"``); DP settings no
        site accepts; more sites than the data can fill. The message names the key, the
        ``medfed simulate`` flag, and a fix.
    """
    return _preflight(cfg, federated)


@functools.lru_cache(maxsize=4)
def _preflight(cfg: RunConfig, federated: bool) -> Preflight:
    if federated:
        _check_dp_norm(cfg)  # first: it needs neither data nor a model
    if cfg.is_deployment:  # no data at the server: the model comes from the config
        if not federated:
            raise PreflightError(
                'dataset = "deployment" holds no data here: the pooled baseline (--centralized) '
                "trains on a dataset. Fix: --dataset synthetic, a MedMNIST .npz file or a datalist .json."
            )
        check_trainable(mode=cfg.trainable, model_name=cfg.model)
        check_dp_model(cfg, model=initial_model(cfg, None), task=model_task(cfg.model))
        return Preflight(splits=None)
    splits = load_dataset(cfg)
    check_trainable(mode=cfg.trainable, model_name=cfg.model)
    # a ValueError names the model and the mismatch; an InitWeightsError the weights file
    model = initial_model(cfg, splits.train)
    if cfg.trainable != "all":
        logger.info("pre-flight: %s", apply_trainable(copy.deepcopy(model), mode=cfg.trainable, model_name=cfg.model).line())
    if not federated:
        return Preflight(splits=splits)
    check_dp_model(cfg, model=model, task=splits.task)
    train, val = _site_shares(cfg, splits)
    logger.info(
        "pre-flight: %d sites, %d-%d training and %d-%d validation images each",
        cfg.num_sites, min(train), max(train), min(val), max(val),
    )  # fmt: skip
    return Preflight(splits=splits, train_per_site=train, val_per_site=val)



def dp_setup_problems(cfg: RunConfig, *, task: str) -> list[str]:
    """DP settings (``dp = true``) that no site can train with, one message each (empty: fine).

    The sites raise the same messages at start-up (``medfed.client.site_client.SiteClient``); the
    pre-flight raises them before the sites start.
    """
    if not cfg.dp:
        return []
    problems = []
    if cfg.dp_grad_sample_mode == "ghost" and task != "classification":
        problems.append(
            "dp-grad-sample-mode = 'ghost' needs a per-example loss (classification); "
            f"this is a {task} task: use 'hooks'."
        )
    if cfg.dp_target_epsilon <= 0 and cfg.dp_noise_multiplier <= 0:
        problems.append(
            "dp = true but dp-noise-multiplier = 0 and dp-target-epsilon = 0: without "
            "noise there is no privacy. Set dp-noise-multiplier > 0 or dp-target-epsilon > 0."
        )
    return problems


def check_dp_model(cfg: RunConfig, *, model: nn.Module, task: str) -> None:
    """Refuse ``dp = true`` with a model Opacus cannot train, or DP settings no site accepts.

    Raises
    ------
    PreflightError
        ``norm = "batch"`` (or another layer Opacus rejects), naming ``norm`` and the fix
        ``--norm group``; or a :func:`dp_setup_problems` message.
    """
    if not cfg.dp:
        return
    _check_dp_norm(cfg)
    try:
        validate_for_dp(model)
    except ValueError as err:
        findings = str(err).split("\nFix:")[0].splitlines()[1:]  # Opacus's problems and the modules
        found = "; ".join(line.strip().lstrip("- ").rstrip(".") for line in findings if line.strip())
        raise PreflightError(
            f"dp = true but model = {cfg.model!r} with norm = {cfg.norm!r} has layers DP-SGD (Opacus) "
            f"cannot train ({found}). {_DP_FIX}"
        ) from None
    problems = dp_setup_problems(cfg, task=task)
    if problems:
        raise PreflightError(" ".join(problems))


_DP_FIX = (
    f"Fix: --norm {DP_NORM} (or --set norm={DP_NORM}; 'instance' works too), "
    "or train without DP-SGD (--set dp=false)."
)


def _check_dp_norm(cfg: RunConfig) -> None:
    """``dp = true`` with ``norm = "batch"``: refused, naming ``norm`` and the fix."""
    if cfg.dp and cfg.norm == "batch":
        raise PreflightError(
            "dp = true trains with DP-SGD (Opacus), which cannot train BatchNorm layers (they mix "
            f'the samples of a batch, so per-sample gradients do not exist), but norm = "batch". {_DP_FIX}'
        )


def max_sites(num_train: int, num_val: int) -> int:
    """The most simulated sites ``num_train`` training and ``num_val`` validation images can fill."""
    return max(0, min(num_train // TRAIN_MIN_PER_SITE, num_val // VAL_MIN_PER_SITE))


def _site_shares(cfg: RunConfig, splits: DataSplits) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Every simulated site's (training, validation) image counts, computed as the sites will."""
    num_val = len(splits.val)
    kept = local_test_size(len(splits.train), cfg.local_test_fraction)  # the sites' local test splits
    num_train = len(splits.train) - kept
    source = "the synthetic data" if cfg.is_synthetic else Path(cfg.dataset).name
    need = (
        f"every site needs at least {TRAIN_MIN_PER_SITE} training and {VAL_MIN_PER_SITE} "
        f"validation image{'s' if VAL_MIN_PER_SITE > 1 else ''}"
    )
    most = max_sites(num_train, num_val)
    if cfg.num_sites > most and cfg.partition != "source":  # "source": the sources decide (below)
        fix = f"Fix: --sites {most} (or --set num-sites={most}), or a larger dataset" if most >= 1 else (
            "Fix: a dataset with more images"
        )
        if cfg.is_synthetic:
            fix += " (--set synthetic-samples=N with a larger N)"
        if kept:
            fix += f" (or a smaller --set local-test-fraction={cfg.local_test_fraction})"
        held = f" (after {kept} kept for the sites' local test splits, local-test-fraction)" if kept else ""
        raise PreflightError(
            f"num-sites = {cfg.num_sites} is more sites than {source} can fill: it has {num_train} "
            f"training{held} and {num_val} validation images and {need}, so at most {most} site"
            f"{'s' if most != 1 else ''} fit. {fix}."
        )
    try:
        parts = site_partitions(
            splits.train.class_labels(),
            splits.val.class_labels(),
            num_sites=cfg.num_sites,
            method=cfg.partition,  # type: ignore[arg-type]
            alpha=cfg.dirichlet_alpha,
            seed=cfg.seed,
            local_test_fraction=cfg.local_test_fraction,
            train_sources=splits.train.sources,
            val_sources=splits.val.sources,
        )
    except ValueError as err:  # RunConfig validated the keys: the draw itself failed
        if cfg.partition == "source":
            raise PreflightError(f"{source}: {err}") from None
        raise PreflightError(
            f"partition = {cfg.partition!r} cannot give {cfg.num_sites} sites of {source} "
            f"enough images ({need}): {err} Fix: a larger --alpha (--set dirichlet-alpha=...), "
            "fewer --sites, or --partition iid."
        ) from None
    return tuple(len(p) for p in parts.train), tuple(len(p) for p in parts.val)

