"""``medfed explain``: a checkpoint and a site's dataset -> PNG overlays (NIfTI maps in 3D) and index.json."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.config import RunConfig
from medfed.shared.inference import ModelShape
from medfed.shared.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # MONAI occlusion code


def _checkpoint(path: Path, cfg: RunConfig, *, dims: int, channels: int, classes: int, side: int) -> Path:
    """A checkpoint as server/run_dir.py writes it, of an untrained model."""
    torch.manual_seed(0)
    model = build_model(cfg.model, spatial_dims=dims, in_channels=channels, out_channels=classes, image_size=side)
    shape = ModelShape("classification", dims, channels, classes, (side,) * dims).to_json()
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_run_config(), "round": 3, "metrics": {"auc": 0.5},
                "model_shape": shape}, path)
    return path


def _npz(path: Path, *, side: int = 16, classes: int = 3) -> Path:
    """A MedMNIST-style npz of 2D grey images."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in {"train": 6, "val": 3, "test": 5}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def _invoke(*args: str | Path):
    return CliRunner().invoke(app, ["explain", *map(str, args)], env={"COLUMNS": "200"})


@pytest.mark.parametrize(("method", "split", "limit", "count"), [("gradcam", "test", None, 5), ("occlusion", "validation", 2, 2)])
def test_explain_a_2d_npz_split(tmp_path: Path, method: str, split: str, limit: int | None, count: int) -> None:
    data = _npz(tmp_path / "site.npz")
    ckpt = _checkpoint(tmp_path / "best.pt", RunConfig(model="simplecnn", dataset="x.npz"), dims=2, channels=1, classes=3, side=16)
    extra = ["--limit", str(limit)] if limit else []
    result = _invoke("--model", ckpt, "--dataset", data, "--split", split, "--method", method, "--out", tmp_path / "out", *extra)
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["count"] == count and index["split"] == split and index["checkpoint_round"] == 3
    assert index["model"] == "simplecnn" and index["method"] == method
    assert [row["index"] for row in index["rows"]] == list(range(count))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"{i:05d}-{method}.png" for i in range(count)]
    assert not list((tmp_path / "out").glob("*.nii.gz"))
    assert str(tmp_path) not in (tmp_path / "out" / "index.json").read_text()  # no data paths


def test_explain_a_3d_synthetic_split_writes_nifti_maps(tmp_path: Path) -> None:
    cfg = RunConfig(model="simplecnn", dataset="synthetic", synthetic_dims=3, synthetic_samples=20, image_size=12)
    ckpt = _checkpoint(tmp_path / "final.pt", cfg, dims=3, channels=1, classes=2, side=12)
    result = _invoke("--model", ckpt, "--dataset", "synthetic", "--out", tmp_path / "maps", "--method", "gradcampp", "--limit", "2")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "maps" / "index.json").read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        assert (tmp_path / "maps" / row["png"]).is_file()
        volume = nib.load(tmp_path / "maps" / row["nifti"]).get_fdata()
        assert volume.shape == (12, 12, 12) and volume.max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gradcm"], "'gradcm' is not one of 'gradcam', 'gradcampp', 'occlusion'"),
        (["--split", "val"], "'val' is not one of 'test', 'validation', 'training'"),
    ],
)
def test_bad_choices_list_the_valid_ones(tmp_path: Path, args: list[str], message: str) -> None:
    result = _invoke("--model", tmp_path / "x.pt", "--dataset", "synthetic", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_bad_inputs_exit_non_zero_naming_the_flag(tmp_path: Path) -> None:
    data = _npz(tmp_path / "site.npz", classes=3)
    missing = _invoke("--model", tmp_path / "nope.pt", "--dataset", data, "--out", tmp_path / "o")
    assert missing.exit_code == 2 and "--model" in missing.output and "does not exist" in missing.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = _invoke("--model", tmp_path / "junk.pt", "--dataset", data, "--out", tmp_path / "o")
    assert junk.exit_code == 2 and "is not a medfed checkpoint" in junk.output
    wrong = _checkpoint(tmp_path / "five.pt", RunConfig(model="simplecnn"), dims=2, channels=1, classes=5, side=16)
    mismatch = _invoke("--model", wrong, "--dataset", data, "--out", tmp_path / "o")
    assert mismatch.exit_code == 2 and "does not fit --dataset" in " ".join(mismatch.output.split())
    assert not (tmp_path / "o").exists()
