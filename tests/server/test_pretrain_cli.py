"""``medfed pretrain``: writes a loadable checkpoint; bad input exits non-zero naming the flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.server.pretrain_cli import PRETRAIN_MODE_CHOICES
from medfed.shared.models import build_model
from medfed.shared.pretrain import PRETRAIN_MODES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


@pytest.fixture
def public_rgb(tmp_path: Path) -> Path:
    """A tiny RGB MedMNIST-style file (3 classes, 16 x 16)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None]
    path = tmp_path / "public.npz"
    np.savez(path, **arrays)
    return path


def _text(result) -> str:  # noqa: ANN001
    return " ".join(result.output.replace("│", " ").split())


def test_the_mode_choices_are_the_shared_modes() -> None:
    assert PRETRAIN_MODE_CHOICES == PRETRAIN_MODES


def test_pretrain_writes_a_checkpoint_for_a_grey_target(public_rgb: Path, tmp_path: Path) -> None:
    out = tmp_path / "init" / "simplecnn.pt"
    args = ["pretrain", "--data", str(public_rgb), "--model", "simplecnn", "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--in-channels", "1", "--num-classes", "2", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (contrastive, 2 epochs" in _text(result)
    payload = torch.load(out, map_location="cpu", weights_only=True)
    target = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=16)
    target.load_state_dict(payload["state_dict"], strict=True)
    assert payload["pretrain"]["data"]["name"] == "public.npz" and len(payload["pretrain"]["loss_per_epoch"]) == 2
    again = runner.invoke(app, args)  # the file exists now
    assert again.exit_code == 2 and "--overwrite" in _text(again)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet81"], "Invalid value for '--model': 'resnet81' is not one of"),
        (["--mode", "masked"], "Invalid value for '--mode'"),
        (["--data", "missing.npz"], "--data 'missing.npz' does not exist"),
        (["--in-channels", "2"], "--in-channels 2: the data has 3 channel(s)"),
        (["--model", "unet"], "--mode contrastive needs a classification model"),
        (["--mode", "supervised", "--num-classes", "2"], "--num-classes 2: --mode supervised"),
        (["--out", "{tmp}"], "is a folder. Give a file name"),
    ],
)
def test_bad_input_exits_non_zero_naming_the_flag(public_rgb: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = {"--data": str(public_rgb), "--model": "simplecnn", "--out": str(tmp_path / "x.pt"), "--epochs": "1"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value.format(tmp=tmp_path)
    result = runner.invoke(app, ["pretrain", *(x for kv in base.items() for x in kv), "-q"])
    assert result.exit_code == 2, result.output
    assert message in _text(result)
    assert not (tmp_path / "x.pt").exists()
