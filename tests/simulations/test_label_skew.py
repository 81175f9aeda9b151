"""Two sites with opposite label skew (site 0: 90 % class 0, site 1: 90 % class 1) train a few
rounds on small synthetic data with the default recipe; the global model must predict both
classes on the balanced test split (the failure of issue 14: a global model that predicts one
class only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.client.site_client import SiteClient
from medfed.client.site_data import SiteData
from medfed.shared.config import RunConfig
from medfed.shared.data.base import ImageSet
from medfed.shared.data.loading import load_dataset
from medfed.shared.task import model_for
from medfed.shared.training import evaluate
from medfed.shared.weights import set_weights
from medfed.simulations.bench.quality import federate_in_process


def _skewed(train: ImageSet, *, major: int, share: float, size: int, rng: np.random.Generator) -> ImageSet:
    by_class = [rng.permutation(np.flatnonzero(train.targets == c)) for c in range(train.num_classes)]
    n_major = int(round(share * size))
    take = np.concatenate([by_class[major][:n_major], by_class[1 - major][: size - n_major]])
    return ImageSet(images=train.images[take], targets=train.targets[take], task=train.task,
                    num_classes=train.num_classes)


def _run(cfg: RunConfig) -> tuple[np.ndarray, dict[str, float]]:
    splits = load_dataset(cfg)
    rng = np.random.default_rng(0)
    half = len(splits.train) // 3
    sites = [
        SiteClient(cfg=cfg, site_index=i, data=SiteData(
            train=_skewed(splits.train, major=i, share=0.9, size=half, rng=rng),
            val=_skewed(splits.val, major=i, share=0.9, size=len(splits.val) // 2, rng=rng),
        ))
        for i in range(2)
    ]
    curve = federate_in_process(cfg, sites=sites)
    model = model_for(cfg, splits.test)
    set_weights(model, curve.final_weights)
    metrics = evaluate(model, splits.test, device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        predicted = model(torch.as_tensor(splits.test.images)).argmax(1).numpy()
    return predicted, metrics


@pytest.mark.parametrize("recipe", [{}])  # the default recipe: no recipe keys at all
def test_two_skewed_sites_give_a_global_model_that_predicts_both_classes(recipe: dict, tmp_path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = RunConfig(dataset="synthetic", synthetic_samples=360, image_size=16, model="simplecnn", num_sites=2,
                        num_server_rounds=4, local_epochs=1, batch_size=16, run_dir=str(tmp_path), store="off", **recipe)
        predicted, metrics = _run(cfg)
    finally:
        torch.set_num_threads(before)
    counts = np.bincount(predicted, minlength=2)
    assert counts.min() > 0, f"the global model predicts one class only: {counts.tolist()}"
    test_targets = load_dataset(cfg).test.targets
    majority_rate = np.bincount(test_targets).max() / len(test_targets)
    assert metrics["accuracy"] > majority_rate, metrics
