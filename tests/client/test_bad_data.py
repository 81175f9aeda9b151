"""Bad site data (issue 6, acceptance 5): planted corrupt entries are skipped with an exact count
(``bad-data = "skip"``: fit metrics, logs, ``medfed site check``) or refused with the list
(``"strict"``), in deployment and in simulation."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.app import Context, RecordDict
from PIL import Image
from typer.testing import CliRunner

from medfed.client.cli import site_app
from medfed.client.client_app import _client_fn_for
from medfed.client.site_check import check_site, format_report
from medfed.client.site_client import SKIPPED_FILES
from medfed.client.site_data import deployment_site_data
from medfed.server.run_dir import read_metrics
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.data.base import DataError
from medfed.shared.data.datalist import UnusableEntriesError, load_datalist
from tests.support.deploy_support import write_nifti_datalist

CFG = RunConfig(dataset="deployment", image_size=16, model="simplecnn", num_sites=2, norm="group")
GOOD_TRAIN, GOOD_VAL = 12, 4

# (where, file as written in the datalist, problem kind, phrase of the reason)
PLANTED = [
    ("training[12]", "img/truncated.nii.gz", "unreadable", "could not be read as NIfTI"),
    ("training[13]", "img/truncated-raw.nii", "unreadable", "could not be read as NIfTI"),
    ("training[14]", "img/empty.png", "unreadable", "could not be read as PNG/JPEG"),
    ("training[15]", "img/training-0.nii.gz", "label_out_of_range", "out of range"),
    ("training[16]", "img/colour.png", "channels", "3 channel(s)"),
    ("training[17]", "img/volume.nii.gz", "spatial_dims", "3D but the dataset is 2D"),
]


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """12 + 4 good 2D NIfTI entries, then one planted problem of each kind in ``training``."""
    datalist = write_nifti_datalist(tmp_path, seed=0, n_train=GOOD_TRAIN, n_val=GOOD_VAL, size=20)
    img = tmp_path / "img"
    whole = (img / "training-1.nii.gz").read_bytes()
    (img / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])  # cut mid-stream
    raw = gzip.decompress(whole)
    (img / "truncated-raw.nii").write_bytes(raw[: 352 + 40])  # header, then 40 of 1600 bytes
    (img / "empty.png").write_bytes(b"")  # zero bytes
    Image.fromarray(np.full((20, 20, 3), 90, dtype=np.uint8)).save(img / "colour.png")
    nib.save(nib.Nifti1Image(np.ones((20, 20, 6), dtype=np.float32), np.eye(4)), str(img / "volume.nii.gz"))
    content = json.loads(datalist.read_text())
    content["training"] += [
        {"image": "img/truncated.nii.gz", "label": 1},
        {"image": "img/truncated-raw.nii", "label": 0},
        {"image": "img/empty.png", "label": 1},
        {"image": "img/training-0.nii.gz", "label": 7},  # num_classes = 2
        {"image": "img/colour.png", "label": 0},
        {"image": "img/volume.nii.gz", "label": 1},
    ]
    datalist.write_text(json.dumps(content))
    return datalist


def _context(node_config: dict, cfg: RunConfig = CFG) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=cfg.to_run_config())


def test_strict_refuses_with_every_bad_entry_by_index_name_and_reason(planted: Path) -> None:
    with pytest.raises(UnusableEntriesError) as err:
        load_datalist(planted, image_size=16, spatial_dims=2)
    lines = str(err.value).splitlines()
    assert f"{len(PLANTED)} unusable entries" in lines[0] and str(planted) in lines[0]
    for where, file, kind, phrase in PLANTED:
        line = next(ln for ln in lines if ln.strip().startswith(where))
        assert file in line and phrase in line, line
    assert sorted((p.where, p.kind) for p in err.value.report.problems) == sorted((w, k) for w, _, k, _ in PLANTED)
    assert 'bad-data = "skip"' in str(err.value)


def test_skip_trains_on_the_valid_entries_and_reports_the_exact_count(
    planted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        site = _client_fn_for(None)(
            _context({"datalist": str(planted), "site-index": 1, "device": "cpu"}, CFG.replace(bad_data="skip"))
        ).numpy_client
    assert site.data.skipped_files == len(PLANTED)
    assert (len(site.data.train), len(site.data.val)) == (GOOD_TRAIN, GOOD_VAL)
    _, num_examples, metrics = site.fit(site.get_parameters({}), {"server-round": 1})
    assert num_examples == GOOD_TRAIN and metrics[SKIPPED_FILES] == len(PLANTED)
    # The logs say how many and where (section[index], kind), never a file name or path.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"skipped {len(PLANTED)} unusable entries" in w for w in warnings), warnings
    assert any(f"{len(PLANTED)} unusable datalist entries left out" in w for w in warnings), warnings
    assert all(where in " ".join(warnings) for where, *_ in PLANTED)
    for record in caplog.records:
        text = record.getMessage()
        assert str(tmp_path) not in text and ".png" not in text and "truncated" not in text, text


def test_strict_site_refuses_sends_counts_only_and_logs_each_entry(
    planted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="medfed.client.site_data"), pytest.raises(DataError) as err:
        deployment_site_data(CFG, datalist=str(planted))
    sent = str(err.value)  # Flower returns this text to the server
    assert "unreadable: 3" in sent and "channels: 1, the run's model takes in-channels = 1" in sent
    assert "label_out_of_range: 1" in sent and "spatial_dims: 1" in sent
    assert str(tmp_path) not in sent and ".nii" not in sent and ".png" not in sent
    for where, file, _, _ in PLANTED:  # the site's operator sees each entry
        assert where in caplog.text and file in caplog.text


def test_the_site_config_choice_wins_over_the_runs(planted: Path) -> None:
    client_fn = _client_fn_for(None)
    node = {"datalist": str(planted), "site-index": 0, "device": "cpu"}
    with pytest.raises(DataError):
        client_fn(_context(node))  # the run's default: strict
    site = client_fn(_context({**node, "bad-data": "skip"})).numpy_client
    assert site.data.skipped_files == len(PLANTED) and site.cfg.bad_data == "skip"
    with pytest.raises(DataError):  # a strict site refuses a skip run
        client_fn(_context({**node, "bad-data": "strict"}, CFG.replace(bad_data="skip")))
    with pytest.raises(ConfigError, match=r"bad-data = 'skipp'.*'strict', 'skip'"):
        client_fn(_context({**node, "bad-data": "skipp"}))


def test_site_check_reports_the_same_entries_and_count(planted: Path, tmp_path: Path) -> None:
    report = check_site(planted, image_size=16, bad_data="skip")
    assert report.skipped_files == len(PLANTED)
    trained_on = {(f.where, f.file, f.kind) for f in report.findings if f.training}
    assert trained_on == {(w, f, k) for w, f, k, _ in PLANTED}
    text = format_report(report)
    assert f"training leaves out the {len(PLANTED)} unusable entries" in text
    assert f"skipped-files = {len(PLANTED)}" in text

    site_toml = tmp_path / "site.toml"
    site_toml.write_text(f'site-name = "a"\ndatalist = "{planted}"\nimage-size = 16\nbad-data = "skip"\n')
    result = CliRunner().invoke(site_app, ["check", "--config", str(site_toml)])
    assert result.exit_code == 1  # errors remain errors
    assert f"skipped-files = {len(PLANTED)}" in result.output
    for _, file, _, _ in PLANTED:
        assert file in result.output
    strict = CliRunner().invoke(site_app, ["check", "--config", str(site_toml), "--bad-data", "strict"])
    assert "bad-data = strict: training refuses" in strict.output
    wrong = CliRunner().invoke(site_app, ["check", "--config", str(site_toml), "--bad-data", "skp"])
    assert wrong.exit_code == 2 and "--bad-data" in wrong.output and "'skip'" in wrong.output


@pytest.mark.slow  # a Ray simulation: about 23 s on an idle 2-core machine
def test_simulation_skips_with_the_count_in_every_sites_fit_metrics(planted: Path, tmp_path: Path) -> None:
    from medfed.simulations.simulate import run_federated

    cfg = RunConfig(
        dataset=str(planted), image_size=16, model="simplecnn", num_sites=2, num_server_rounds=1,
        local_epochs=1, batch_size=8, run_dir=str(tmp_path / "runs"), store="off",
    )  # fmt: skip
    with pytest.raises(DataError, match=r"6 unusable entries"):  # strict: before Ray starts
        run_federated(cfg)
    result = run_federated(cfg.replace(bad_data="skip"))
    rounds = read_metrics(result.run_dir / "metrics.jsonl")
    last = rounds[-1]
    assert last["fit_results"] == 2 and last["fit_failures"] == 0
    assert {name: site["fit"][SKIPPED_FILES] for name, site in last["sites"].items()} == {
        "site-0": len(PLANTED),
        "site-1": len(PLANTED),
    }
