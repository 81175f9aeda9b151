"""A site's images in one geometry: ``medfed site check`` shows each image's orientation and spacing,
flags mixtures, and the site's ``spacing`` (site.toml) wins over the run's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from medfed.client.cli import site_app
from medfed.client.client_app import _client_fn_for
from medfed.client.site_check import check_site, format_report
from medfed.client.site_config import Kit, load_site_config, node_config_arg
from medfed.shared.config import ConfigError, RunConfig


def _volume(path: Path, *, flip_x: bool, spacing_z: float, seed: int) -> str:
    slices = int(round(8 / spacing_z)) + 1  # 8 mm of z either way
    data = np.random.default_rng(seed).random((10, 10, slices)).astype(np.float32)
    affine = np.diag([-1.0 if flip_x else 1.0, 1.0, spacing_z, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.name


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """site.toml and a datalist of 8 volumes: 6 RAS 1 mm, one LAS 1 mm, one RAS with 2 mm slices."""
    geometry = [(False, 1.0)] * 6 + [(True, 1.0), (False, 2.0)]
    entries = [
        {"image": _volume(tmp_path / f"v{i}.nii.gz", flip_x=flip, spacing_z=dz, seed=i), "label": i % 2}
        for i, (flip, dz) in enumerate(geometry)
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries, "num_classes": 2}))
    (tmp_path / "site.toml").write_text('site-name = "a"\ndatalist = "datalist.json"\n')
    return tmp_path


def test_check_lists_every_images_orientation_and_spacing_and_flags_the_mixture(site: Path) -> None:
    report = check_site(site / "datalist.json", spacing=(1.0,))
    assert report.ok, report.findings
    assert report.orientations == {"RAS": 7, "LAS": 1}
    assert report.spacings == {"1 x 1 x 1": 7, "1 x 1 x 2": 1}
    assert [(i["file"], i["orientation"], i["spacing"]) for i in report.images][-2:] == [
        ("v6.nii.gz", "LAS", [1.0, 1.0, 1.0]),
        ("v7.nii.gz", "RAS", [1.0, 1.0, 2.0]),
    ]
    flagged = {(f.kind, f.file) for f in report.findings}
    assert flagged == {("mixed_orientation", "v6.nii.gz"), ("inconsistent_spacing", "v7.nii.gz")}
    text = format_report(report)
    assert "orientations: RAS (7), LAS (1)" in text
    assert "training[6] v6.nii.gz: 10x10x9, LAS, 1 x 1 x 1" in text
    assert "loaded in RAS, resampled to 1 mm" in text
    assert "training resamples NIfTI/DICOM images to 1 mm" in text


def test_native_spacing_makes_the_thick_volume_a_size_error_and_site_toml_spacing_fixes_it(site: Path) -> None:
    runner = CliRunner()
    native = runner.invoke(site_app, ["check", "--config", str(site / "site.toml")])
    assert native.exit_code == 1 and "shape_mismatch" in native.output and "v7.nii.gz" in native.output
    flag = runner.invoke(site_app, ["check", "--config", str(site / "site.toml"), "--spacing", "1"])
    assert flag.exit_code == 0, flag.output
    with (site / "site.toml").open("a") as f:
        f.write('spacing = "1,1,1"\n')
    from_toml = runner.invoke(site_app, ["check", "--config", str(site / "site.toml")])
    assert from_toml.exit_code == 0, from_toml.output
    bad = runner.invoke(site_app, ["check", "--config", str(site / "site.toml"), "--spacing", "-1"])
    assert bad.exit_code == 2 and "--spacing = '-1' is invalid" in bad.output


def test_the_sites_spacing_reaches_its_client_and_wins_over_the_runs(site: Path, tmp_path: Path) -> None:
    with (site / "site.toml").open("a") as f:
        f.write("spacing = 1\n")  # a plain number works too
    config = load_site_config(site / "site.toml")
    assert config.spacing == "1"
    kit = Kit(tmp_path, "f", "a", 0, "127.0.0.1:1", tmp_path, tmp_path, tmp_path, tmp_path, "")
    node = parse_config_args([node_config_arg(kit, config)])
    assert node["spacing"] == "1"
    cfg = RunConfig(
        dataset="deployment", image_size=8, spatial_dims=3, model="simplecnn", num_sites=2, spacing="2.5", norm="group"
    )
    client_fn = _client_fn_for(None)
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    client = client_fn(context).numpy_client
    assert client.cfg.spacing == "1" and client.cfg.spacing_mm == (1.0,)
    with pytest.raises(ConfigError, match="node config spacing"):
        client_fn(Context(run_id=1, node_id=1, node_config={**node, "spacing": "fine"}, state=RecordDict(),
                          run_config=cfg.to_run_config()))


def test_pictures_are_used_as_stored_and_spacing_says_so(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((12, 10), 40 * (i + 1), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": f"p{i}.png", "label": i} for i in range(2)]}))
    report = check_site(tmp_path / "d.json", spacing=(0.5,))
    assert report.ok and report.orientations == {"as stored": 2}
    assert [i["orientation"] for i in report.images] == [None, None]
    (finding,) = [f for f in report.findings if f.kind == "spacing_not_applied"]
    assert "2 PNG/JPEG image(s)" in finding.message
    assert not [f for f in check_site(tmp_path / "d.json").findings if f.kind == "spacing_not_applied"]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("", ()), ("0", ()), (0, ()), ("1.5", (1.5,)), (2, (2.0,)), ("1,1,2", (1.0, 1.0, 2.0)), ("0.8 0.8", (0.8, 0.8))],
)
def test_spacing_settings(text: str | float, parsed: tuple[float, ...]) -> None:
    assert RunConfig.from_mapping({"spacing": text}).spacing_mm == parsed
