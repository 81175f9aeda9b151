"""``medfed report``: the model card of a run directory, its sections, what it embeds and what it refuses."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.server import report as report_module
from medfed.server.model_card import ReportError, gather_model_card
from medfed.server.report import REPORT_SECTIONS, render_html, write_report
from medfed.shared.calibration import calibration
from medfed.shared.data.loading import load_dataset
from medfed.shared.task import model_for
from medfed.shared.training import predict, select_device
from tests.support.report_support import (
    CROSS_SITE,
    EPSILON,
    FAB_SHA256,
    GLOBAL_AUC,
    make_run,
    small_config,
    write_cross_site,
    write_explanations,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "runs")


def _section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"no section {sid}"
    return match.group(1)


def test_every_section_is_present_and_the_page_loads_nothing_from_outside(run: Path, tmp_path: Path) -> None:
    out = write_report(run, out=tmp_path / "card.html", intended_use="Triage of <b>breast</b> ultrasound, research only")
    page = out.read_text()
    for sid, title in REPORT_SECTIONS:
        assert f'<section id="{sid}"><h2>{title.replace("&", "&amp;")}</h2>' in page
    inline = page.replace('<link rel="icon" href="data:,">', "")  # no favicon request
    assert not re.search(r"<script|<link|@import|url\(|https?://|src=\"(?!data:)", inline)  # self-contained
    assert "Triage of &lt;b&gt;breast&lt;/b&gt; ultrasound" in page  # escaped, never injected
    assert str(run.parent) not in page  # no local paths


def test_global_site_privacy_and_recipe_figures_come_from_the_run(run: Path) -> None:
    page = render_html(gather_model_card(run, calibrate=False))
    glob = _section(page, "global-metrics")
    assert f"{GLOBAL_AUC[2]:.3f}" in glob and "0.420" in glob  # final AUC and its validation-chosen threshold
    assert "validation auc" in glob
    sites = _section(page, "site-metrics")
    assert "0.900" in sites and "0.740" in sites  # each site's last-round validation AUC
    privacy = _section(page, "privacy")
    assert f"{EPSILON[2]:.3f}" in privacy and f"{EPSILON[2] + 0.1:.3f}" in privacy  # per site, last round
    assert "8.00" in privacy and "1e-05" in privacy  # budget and delta
    assert f"{EPSILON[1]:.3f}" in privacy  # the ledger keeps earlier rounds
    assert "Off (secagg = false)" in _section(page, "secagg")
    assert "fedavg" in _section(page, "recipe") and "simplecnn" in _section(page, "recipe")
    software = _section(page, "software")
    assert "Not a signed deployment" in software and "torch" in software
    assert "Calibration not computed (--no-calibration)" in _section(page, "calibration")


def test_class_mix_is_the_simulated_partition(run: Path) -> None:
    from medfed.client.site_data import simulated_class_counts

    card = gather_model_card(run, calibrate=False)
    expected = {site: {k: counts[k] for k in ("train", "val")}
                for site, counts in simulated_class_counts(small_config(run.parent))}
    assert {row["site"]: row["class_mix"] for row in card.data_sites} == expected
    data = _section(render_html(card), "data")
    assert " / ".join(str(n) for n in expected["site-0"]["train"]) in data


def test_calibration_is_the_final_checkpoints_on_the_test_split(run: Path) -> None:
    card = gather_model_card(run)
    cfg = small_config(run.parent)
    splits = load_dataset(cfg)
    model = model_for(cfg, splits.train)
    model.load_state_dict(torch.load(run / "checkpoints" / "final.pt", weights_only=True)["state_dict"])
    logits, targets, _ = predict(model, splits.test, device=select_device("auto"))
    expected = calibration(logits, targets)
    assert card.calibration["bins"].ece == pytest.approx(expected.ece)
    assert card.calibration["bins"].num_examples == len(splits.test)
    section = _section(render_html(card), "calibration")
    assert f"{expected.ece:.3f}" in section and section.count("data:image/png;base64,") == 1


def test_without_cross_site_or_maps_the_sections_say_so(run: Path) -> None:
    page = render_html(gather_model_card(run, calibrate=False))
    assert "Not run: the cross-site evaluation" in _section(page, "subgroup-metrics")
    assert "Cross-site evaluation not run" in _section(page, "site-metrics")
    assert "not run (no cross-site evaluation)" in _section(page, "fairness")
    assert "No site shared explanation maps" in _section(page, "explanations")


def test_cross_site_rows_gaps_maps_and_bundle_hash_are_shown(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs")
    write_cross_site(run)
    maps = write_explanations(tmp_path / "shared-maps", count=8)
    (run / "app_bundle.json").write_text(json.dumps({"fab_sha256": FAB_SHA256, "signed": True}))
    page = render_html(gather_model_card(run, explanations=tmp_path / "shared-maps", calibrate=False))
    sites = _section(page, "site-metrics")
    assert "0.812" in sites and "0.440" in sites and "0.733" in sites  # test AUC and thresholds per site
    groups = _section(page, "subgroup-metrics")
    assert "0.851" in groups and "0.764" in groups and "1 suppressed" in groups
    fairness = _section(page, "fairness")
    gap = CROSS_SITE["gaps"][0]
    assert f"{gap['gap']:.3f}" in fairness and "F (0.851)" in fairness
    shown = re.findall(r'src="data:image/png;base64,([^"]+)"', _section(page, "explanations"))
    assert len(shown) == 6  # at most six of the eight
    first = (tmp_path / "shared-maps" / maps[0]["png"]).read_bytes()
    assert base64.b64decode(shown[0]) == first
    assert "6 of 8 map(s) shown" in page
    assert f"sha256:{FAB_SHA256}" in _section(page, "software")


def test_maps_shared_into_the_run_directory_are_found(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", rounds=1)
    write_explanations(run / "explanations", count=2)
    card = gather_model_card(run, calibrate=False)
    assert len(card.explanations) == 2


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.mkdir(), "is not a run directory"),
        (lambda p: None, "is not a run directory"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{")), r"config.json \(the run config\) cannot be read"),
    ],
    ids=["empty folder", "missing", "damaged config"],
)
def test_bad_run_directories_are_refused(tmp_path: Path, setup, message: str) -> None:
    target = tmp_path / "not-a-run"
    setup(target)
    with pytest.raises(ReportError, match=message):
        gather_model_card(target)


def test_a_damaged_cross_site_file_is_named(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", rounds=1)
    (run / "cross_site.json").write_text("{not json")
    with pytest.raises(ReportError, match="cross_site.json"):
        gather_model_card(run, calibrate=False)


def test_an_unreachable_dataset_says_why_there_is_no_calibration(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", rounds=1)
    meta = json.loads((run / "config.json").read_text())
    meta["config"]["dataset"] = "/nowhere/hospital-a/breastmnist.npz"
    (run / "config.json").write_text(json.dumps(meta))
    page = render_html(gather_model_card(run))
    assert "breastmnist.npz) is not reachable" in _section(page, "calibration")
    assert "/nowhere" not in page


def test_the_command_writes_the_card_and_exits_nonzero_on_a_bad_run(run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(report_module, "find_pdf_printer", lambda: None)
    out = tmp_path / "card.html"
    result = runner.invoke(app, ["report", str(run), "--out", str(out), "--no-calibration", "--pdf"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "no PDF printer found" in result.output and not out.with_suffix(".pdf").exists()
    bad = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "is not a run directory" in bad.output
    no_maps = runner.invoke(app, ["report", str(run), "--out", str(out), "--explanations", str(tmp_path)])
    assert no_maps.exit_code == 2 and "no index.json" in no_maps.output


def test_explanation_indexes_without_rows_are_refused_and_missing_maps_are_named(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", rounds=1)
    folder = tmp_path / "maps"
    rows = write_explanations(folder, count=2)
    (folder / rows[1]["png"]).unlink()
    card = gather_model_card(run, explanations=folder, calibrate=False)
    assert len(card.explanations) == 1
    assert "explanation map &#x27;map-1.png&#x27; listed in index.json is missing" in _section(render_html(card), "explanations")
    (folder / "index.json").write_text(json.dumps({"method": "gradcam"}))
    with pytest.raises(ReportError, match="must hold rows"):
        gather_model_card(run, explanations=folder, calibrate=False)


def test_the_intended_use_comes_from_the_run_config_unless_the_flag_gives_it(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", rounds=1, intended_use="Screening research at two hospitals")
    card = gather_model_card(run, calibrate=False)
    assert (card.intended_use, card.intended_use_source) == ("Screening research at two hospitals", "run config")
    flagged = gather_model_card(run, intended_use="Teaching only", calibrate=False)
    assert (flagged.intended_use, flagged.intended_use_source) == ("Teaching only", "--intended-use")
