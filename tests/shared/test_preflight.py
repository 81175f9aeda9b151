"""Pre-flight checks: runs that cannot work are refused before anything starts, naming the key,
the flag and a fix; runs that can work pass, with the sites' shares the sites will compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from medfed.client.site_data import simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.data.base import DataError
from medfed.shared.preflight import PreflightError, check_dp_model, max_sites, preflight


def tiny_npz(path: Path, *, train: int = 8, val: int = 4, test: int = 4) -> Path:
    """A MedMNIST-style npz file with ``train`` training images (28 x 28, two classes)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None]
    np.savez(path, **arrays)
    return path


SMALL = dict(model="simplecnn", image_size=16, synthetic_samples=96, store="off", local_test_fraction=0.0)


def test_more_sites_than_the_data_fills_is_refused_with_the_most_that_fit(tmp_path: Path) -> None:
    cfg = RunConfig(dataset=str(tiny_npz(tmp_path / "tiny.npz")), num_sites=12, **SMALL)
    with pytest.raises(PreflightError) as caught:
        preflight(cfg)
    message = str(caught.value)
    assert message.startswith("num-sites = 12 is more sites than tiny.npz can fill: it has 8 training and 4 validation")
    assert "at most 4 sites fit" in message and "Fix: --sites 4 (or --set num-sites=4)" in message
    assert str(tmp_path) not in message  # the file's name, not its path
    ok = preflight(cfg.replace(num_sites=4))
    assert ok.train_per_site == (2, 2, 2, 2) and ok.val_per_site == (1, 1, 1, 1)


def test_validation_images_limit_the_sites_too(tmp_path: Path) -> None:
    cfg = RunConfig(dataset=str(tiny_npz(tmp_path / "t.npz", train=40, val=3)), num_sites=5, **SMALL)
    with pytest.raises(PreflightError, match="40 training and 3 validation images .* at most 3 sites fit"):
        preflight(cfg)
    assert max_sites(40, 3) == 3 and max_sites(7, 10) == 3 and max_sites(1, 1) == 0


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_the_shares_are_those_the_simulated_sites_compute(partition: str) -> None:
    cfg = RunConfig(dataset="synthetic", num_sites=4, partition=partition, dirichlet_alpha=1.0, **SMALL)
    checked = preflight(cfg)
    sites = [simulated_site_data(cfg, site_index=k, num_sites=4) for k in range(4)]
    assert checked.train_per_site == tuple(len(s.train) for s in sites)
    assert checked.val_per_site == tuple(len(s.val) for s in sites)


def test_a_dirichlet_split_that_cannot_fill_every_site_is_refused_with_the_fix() -> None:
    cfg = RunConfig(dataset="synthetic", num_sites=20, partition="dirichlet", dirichlet_alpha=0.01,
                    **{**SMALL, "synthetic_samples": 240})
    with pytest.raises(PreflightError, match=r"partition = 'dirichlet' cannot give 20 sites .* Fix: a larger --alpha"):
        preflight(cfg)


def test_dp_with_batch_norm_is_refused_naming_norm_and_the_fix_before_reading_data(tmp_path: Path) -> None:
    cfg = RunConfig(dataset=str(tmp_path / "absent.npz"), dp=True, norm="batch", **SMALL)
    with pytest.raises(PreflightError) as caught:
        preflight(cfg)  # the data is not even read: the combination cannot work
    message = str(caught.value)
    assert 'norm = "batch"' in message and "dp = true" in message
    assert "Fix: --norm group (or --set norm=group" in message
    with pytest.raises(DataError, match="does not exist"):
        preflight(cfg.replace(norm="group"))  # now the data is read, and it is missing


def test_dp_with_a_model_that_keeps_batchnorm_is_refused() -> None:
    cfg = RunConfig(dataset="synthetic", dp=True, norm="group", **SMALL)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))  # ignores norm, as a custom model could
    with pytest.raises(PreflightError) as caught:
        check_dp_model(cfg, model=model, task="classification")
    message = str(caught.value)
    assert "model = 'simplecnn' with norm = 'group' has layers DP-SGD (Opacus) cannot train" in message
    assert "1 (BatchNorm2d)" in message and "Fix: --norm group" in message
    assert "build_model(" not in message  # the fix a user types, not a Python call
    check_dp_model(cfg.replace(dp=False), model=model, task="classification")  # without DP it is fine
    ok = preflight(cfg)  # the registered model honours norm = "group"
    assert sum(ok.train_per_site) == len(ok.splits.train)


def test_dp_settings_no_site_accepts_are_refused() -> None:
    cfg = RunConfig(dataset="synthetic", dp=True, norm="group", dp_noise_multiplier=0.0, **SMALL)
    with pytest.raises(PreflightError, match="no privacy"):
        preflight(cfg)
    seg = RunConfig(dataset="synthetic", synthetic_task="segmentation", model="unet", image_size=16,
                    dp=True, norm="group", dp_grad_sample_mode="ghost", store="off", synthetic_samples=96)
    with pytest.raises(PreflightError, match="per-example loss"):
        preflight(seg)


def test_a_model_of_the_wrong_task_is_refused() -> None:
    with pytest.raises(ValueError, match="model = 'unet' is a segmentation model"):
        preflight(RunConfig(dataset="synthetic", **{**SMALL, "model": "unet"}))


def test_a_deployment_config_checks_the_model_and_refuses_the_pooled_baseline() -> None:
    cfg = RunConfig(dataset="deployment", image_size=16, model="simplecnn", dp=True, norm="group", store="off")
    assert preflight(cfg).splits is None
    with pytest.raises(PreflightError, match="norm"):
        preflight(cfg.replace(norm="batch"))
    with pytest.raises(PreflightError, match="--centralized"):
        preflight(cfg, federated=False)
