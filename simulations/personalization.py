"""The end of a simulation: every site's global, personalized and local-only model on its local test split.

Each simulated site holds a local test split drawn with its own class mix
(``local-test-fraction``; :func:`medfed.shared.partition.site_partitions`). After the last round
:func:`personalization_report` scores on it, per site:

* ``global``: the final global model;
* ``personalized``: the model the site keeps: of the global model and each step of its
  adaptation (``personalize``: :func:`medfed.shared.personalization.personalization_steps`), the
  best on the site's own validation split (``kept`` names it per site: ``"off"`` is the global
  model);
* ``adapted``: the last step (``personalize`` in full), whatever the validation split says;
* ``local-only`` (``local-only-baseline = true``): the same model trained on the site's data
  alone, for the same rounds and local epochs with the same schedule.

Every model's decision threshold is chosen on the site's own validation split. The keys are
``local-test-<metric>-<model>`` (``local-test-auc-global``, ``local-test-auc-personalized``,
``local-test-auc-local-only``...); the report goes into ``summary.json`` and the run store.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from medfed.client.site_client import SiteClient
from medfed.client.site_data import SiteData, simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.personalization import choose_on_validation, personalization_steps
from medfed.shared.round_config import fit_config
from medfed.shared.seeding import seed_everything
from medfed.shared.task import initial_model, model_for, round_settings, site_seed
from medfed.shared.training import TrainSettings, evaluate_at_validation_threshold, select_device
from medfed.shared.weights import get_weights, set_weights

__all__ = ["LOCAL_TEST_METRICS", "MODELS", "local_only_weights", "personalization_report"]

logger = logging.getLogger(__name__)

LOCAL_TEST_METRICS: tuple[str, ...] = (
    "auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "dice", "map50", "map50-95",
)
"""The figures reported per model (those the task has)."""
MODELS: tuple[str, ...] = ("global", "personalized", "adapted", "local-only")


def local_only_weights(cfg: RunConfig, data: SiteData, *, site_index: int) -> list[np.ndarray]:
    """Site ``site_index`` trained alone: ``cfg.num_server_rounds`` rounds of its own local training.

    The same site client, model, local epochs and learning-rate schedule as in the federation,
    starting from the same initial weights, with no averaging (``strategy = "fedavg"``; without
    DP-SGD, so no privacy ledger is charged for a baseline).
    """
    alone = cfg.replace(strategy="fedavg", dp=False)
    site = SiteClient(cfg=alone, data=data, site_index=site_index)
    seed_everything(cfg.seed)
    weights = get_weights(initial_model(alone, data.train))  # the federation's start (init-weights)
    for server_round in range(1, alone.num_server_rounds + 1):
        weights, _, _ = site.fit(weights, fit_config(server_round))
    return weights


def personalization_report(cfg: RunConfig, weights: list[np.ndarray]) -> dict[str, object]:
    """Score every simulated site's models on its local test split.

    Parameters
    ----------
    cfg
        The run's config (``personalize``, ``personalize-epochs``, ``local-only-baseline``).
    weights
        The final global model's state (arrays in ``state_dict`` order).

    Returns
    -------
    dict
        ``{"personalization": {"mode", "epochs", "local_only", "kept", "sites": {"site-0": {...}},
        "mean": {...}, "mean_over_sites": {...}}}``: per site ``local-test-examples`` and
        ``local-test-<metric>-<model>``; ``mean``: each key's mean over the sites that have it
        (AUC needs both classes in a site's local test split), ``mean_over_sites`` how many.
        Empty when no site has a local test split.
    """
    device = select_device()
    sites: dict[str, dict[str, float]] = {}
    kept: dict[str, str] = {}
    for k in range(cfg.num_sites):
        data = simulated_site_data(cfg, site_index=k, num_sites=cfg.num_sites)
        row: dict[str, float] = {"local-test-examples": float(len(data.test) if data.test is not None else 0)}
        sites[f"site-{k}"] = row
        if data.test is None:
            continue
        seed_everything(cfg.seed)
        model = model_for(cfg, data.train)
        set_weights(model, weights)
        row.update(_scores(model, data, "global", device=device))
        if cfg.personalize != "off":
            settings = _settings(cfg, site_index=k)
            seed_everything(settings.seed)
            steps = personalization_steps(
                model, data.train, mode=cfg.personalize, epochs=cfg.personalize_epochs, settings=settings, device=device
            )
            choice, personal = choose_on_validation(steps, data.val, device=device)
            kept[f"site-{k}"] = choice
            row.update(_scores(personal, data, "personalized", device=device))
            row.update(_scores(steps[-1][1], data, "adapted", device=device))
        if cfg.local_only_baseline:
            alone = model_for(cfg, data.train)
            set_weights(alone, local_only_weights(cfg, data, site_index=k))
            row.update(_scores(alone, data, "local-only", device=device))
        logger.info("site %d local test: %s", k, {n: round(v, 4) for n, v in row.items()})
    if not any(row["local-test-examples"] for row in sites.values()):
        return {}
    keys = sorted({key for row in sites.values() for key in row if key != "local-test-examples"})
    mean: dict[str, float] = {}
    counted: dict[str, int] = {}
    for key in keys:
        values = [row[key] for row in sites.values() if key in row and math.isfinite(row[key])]
        if values:
            mean[key], counted[key] = float(np.mean(values)), len(values)
    return {
        "personalization": {
            "mode": cfg.personalize,
            "epochs": cfg.personalize_epochs,
            "local_only": cfg.local_only_baseline,
            "kept": kept,
            "sites": sites,
            "mean": mean,
            "mean_over_sites": counted,
        }
    }


def _settings(cfg: RunConfig, *, site_index: int) -> TrainSettings:
    """Fine-tuning settings: the run's batch size, optimizer and base learning rate (the schedule
    has decayed to about 0 by the last round), and a seed of its own."""
    last = round_settings(cfg, server_round=cfg.num_server_rounds, site_index=site_index)
    return TrainSettings(
        epochs=cfg.personalize_epochs,
        batch_size=last.batch_size,
        learning_rate=cfg.learning_rate,
        optimizer=last.optimizer,
        weight_decay=last.weight_decay,
        augment=last.augment,
        seed=site_seed(cfg.seed, site_index=site_index, server_round=cfg.num_server_rounds + 1),
    )


def _scores(model: nn.Module, data: SiteData, name: str, *, device: torch.device) -> dict[str, float]:
    """``model``'s figures on the site's local test split, at a threshold chosen on its validation split."""
    if data.test is None:
        raise ValueError("this site has no local test split (local-test-fraction = 0).")
    metrics = evaluate_at_validation_threshold(model, data.test, val=data.val, device=device)
    return {f"local-test-{m}-{name}": float(metrics[m]) for m in LOCAL_TEST_METRICS if m in metrics}
