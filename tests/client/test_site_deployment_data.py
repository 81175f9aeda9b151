"""The deployment branch of the ClientApp: a site's own datalist, checked against the run's model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from medfed.client.client_app import _client_fn_for
from medfed.client.site_data import deployment_site_data
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.data.base import DataError
from tests.support.deploy_support import write_nifti_datalist

CFG = RunConfig(dataset="deployment", image_size=16, model="simplecnn", num_sites=2, norm="group")


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config=CFG.to_run_config())


def test_site_trains_on_all_its_training_entries_and_validates_on_its_own(tmp_path: Path) -> None:
    datalist = write_nifti_datalist(tmp_path, seed=0, n_train=12, n_val=4, size=20)
    data = deployment_site_data(CFG, datalist=str(datalist))
    assert len(data.train) == 12 and len(data.val) == 4  # no unused test split carved off
    assert data.train.images.shape == (12, 1, 16, 16)  # resized to the run's image-size
    assert data.train.num_classes == 2 and data.train.task == "classification"


def test_site_holding_some_classes_gets_the_federations_class_count(tmp_path: Path) -> None:
    datalist = write_nifti_datalist(tmp_path, seed=0)
    data = deployment_site_data(CFG.replace(num_classes=4), datalist=str(datalist))
    assert data.train.num_classes == 4 and data.val.num_classes == 4


def test_data_that_does_not_fit_the_model_is_a_clear_error(tmp_path: Path) -> None:
    datalist = write_nifti_datalist(tmp_path, seed=0)
    with pytest.raises(DataError, match="in-channels = 3"):
        deployment_site_data(CFG.replace(in_channels=3), datalist=str(datalist))
    raw = json.loads(datalist.read_text())
    raw["num_classes"] = 5
    datalist.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="num-classes = 2"):
        deployment_site_data(CFG, datalist=str(datalist))


def test_client_fn_uses_the_node_config_and_caps_the_privacy_budget(tmp_path: Path) -> None:
    datalist = write_nifti_datalist(tmp_path, seed=1)
    client_fn = _client_fn_for(None)
    node = {"datalist": str(datalist), "site-index": 2, "device": "cpu", "dp-budget-epsilon": 3.0}
    site = client_fn(_context(node)).numpy_client
    assert site.site_index == 2 and site.cfg.dp_budget_epsilon == 3.0
    assert str(site.device) == "cpu" and len(site.data.train) == 12
    weights, n, metrics = site.fit(site.get_parameters({}), {"server-round": 1})
    assert n == 12 and metrics["site-index"] == 2 and np.isfinite(metrics["train-loss"])
    # A larger site budget never raises the run's.
    site = client_fn(_context({**node, "dp-budget-epsilon": 50.0})).numpy_client
    assert site.cfg.dp_budget_epsilon == CFG.dp_budget_epsilon


def test_deployment_without_a_datalist_in_the_node_config_is_refused() -> None:
    with pytest.raises(ValueError, match="medfed site start"):
        _client_fn_for(None)(_context({"partition-id": 0, "num-partitions": 2}))


def test_deployment_config_needs_an_image_size_and_valid_shape_keys() -> None:
    with pytest.raises(ConfigError, match="image-size > 0"):
        RunConfig(dataset="deployment")
    with pytest.raises(ConfigError, match="num-classes"):
        CFG.replace(num_classes=1)
    with pytest.raises(ConfigError, match="spatial-dims"):
        CFG.replace(spatial_dims=4)


def test_unusable_entries_are_logged_at_the_site_but_not_put_in_the_error(tmp_path: Path, caplog) -> None:
    """Flower sends an exception's text to the server: it must not name the site's files."""
    import logging

    datalist = write_nifti_datalist(tmp_path, seed=0)
    raw = json.loads(datalist.read_text())
    raw["training"].append({"image": "img/patient-4711.nii.gz", "label": 0})
    datalist.write_text(json.dumps(raw))
    with caplog.at_level(logging.ERROR, logger="medfed.client.site_data"), pytest.raises(DataError) as err:
        deployment_site_data(CFG, datalist=str(datalist))
    assert "patient-4711" not in str(err.value) and str(tmp_path) not in str(err.value)
    assert "medfed site check" in str(err.value)
    assert "patient-4711" in caplog.text  # the site's operator sees which entry


def test_a_datalists_test_section_is_the_sites_local_test_split(tmp_path: Path) -> None:
    datalist = write_nifti_datalist(tmp_path, seed=0, n_train=12, n_val=4, size=20)
    assert deployment_site_data(CFG, datalist=str(datalist)).test is None  # none without a test section
    content = json.loads(datalist.read_text())
    content["test"] = content["validation"][:3]  # the site's own held-out images
    datalist.write_text(json.dumps(content))
    data = deployment_site_data(CFG, datalist=str(datalist))
    assert data.test is not None and len(data.test) == 3 and data.test.images.shape == (3, 1, 16, 16)
    assert len(data.train) == 12 and len(data.val) == 4  # training keeps its own entries
