"""eval-precision: bf16 autocast for the evaluation and BatchNorm passes, fp32 on request or where
the device has no native bf16 (issue 19)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from medfed.shared import precision
from medfed.shared.data.synthetic import make_synthetic
from medfed.shared.models import build_model
from medfed.shared.precision import describe_eval_precision, eval_dtype
from medfed.shared.training import (
    TrainSettings,
    evaluate,
    make_optimizer,
    make_train_loader,
    predict,
    reestimate_bn,
    train_epochs,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, object]:
    """A small BatchNorm CNN trained two epochs in fp32 on synthetic blobs (AUC well below 1)."""
    torch.manual_seed(0)
    splits = make_synthetic(task="classification", spatial_dims=2, num_samples=400, image_size=16, seed=3)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="batch", image_size=16)
    settings = TrainSettings(epochs=2, batch_size=32, learning_rate=0.02, augment=False, seed=0)
    optimizer = make_optimizer(model.parameters(), name="sgd", learning_rate=0.02, weight_decay=0.0)
    train_epochs(model, make_train_loader(splits.train, settings), optimizer, task="classification", epochs=2,
                 device=CPU)
    return model, splits


@pytest.mark.parametrize(
    ("setting", "native", "task", "expected"),
    [
        ("fp32", True, "classification", None),
        ("fp32", False, "classification", None),
        ("bf16", True, "classification", torch.bfloat16),
        ("bf16", False, "classification", torch.bfloat16),
        ("bf16", True, "segmentation", torch.bfloat16),  # asked for explicitly
        ("auto", True, "classification", torch.bfloat16),
        ("auto", False, "classification", None),  # no native bf16: emulated bf16 is slower, auto falls back
        ("auto", True, "segmentation", None),  # not measured for Dice: auto keeps fp32
        ("auto", True, "detection", None),
    ],
)
def test_eval_dtype_follows_the_setting_the_hardware_and_the_task(
    monkeypatch: pytest.MonkeyPatch, setting: str, native: bool, task: str, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(precision, "_cpu_native_bf16", lambda: native)
    assert eval_dtype(setting, device=CPU, task=task) is expected
    line = describe_eval_precision(setting, device=CPU, task=task)
    assert line.startswith(f"eval-precision: {setting} -> {'bf16 autocast' if expected else 'fp32'}")
    assert " = " not in line  # --dry-run prints it as a TOML comment beside the keys


def test_eval_dtype_refuses_unknown_values() -> None:
    with pytest.raises(ValueError, match=r"eval-precision = 'fp16' is invalid\. Valid choices: auto, fp32, bf16"):
        eval_dtype("fp16", device=CPU)


def test_fp32_forces_plain_fp32(trained: tuple[torch.nn.Module, object]) -> None:
    model, splits = trained
    plain, _, _ = predict(model, splits.test, device=CPU)
    forced, _, _ = predict(model, splits.test, device=CPU, dtype=eval_dtype("fp32", device=CPU))
    assert torch.equal(plain, forced)
    assert plain.dtype == torch.float32


def test_bf16_evaluation_and_bn_pass_keep_the_auc_within_0_01(trained: tuple[torch.nn.Module, object]) -> None:
    model, splits = trained
    fp32 = evaluate(model, splits.test, device=CPU)
    bf16 = evaluate(model, splits.test, device=CPU, dtype=torch.bfloat16)
    assert 0.6 < fp32["auc"] < 1.0  # a model that ranks imperfectly: the comparison can fail
    logits32, _, _ = predict(model, splits.test, device=CPU)
    logits16, _, _ = predict(model, splits.test, device=CPU, dtype=torch.bfloat16)
    assert logits16.dtype == torch.float32 and not torch.equal(logits32, logits16)  # autocast really ran
    assert abs(bf16["auc"] - fp32["auc"]) <= 0.01
    # The BatchNorm re-estimation pass in bf16: statistics close to fp32's, the AUC within 0.01.
    bn32, bn16 = copy.deepcopy(model), copy.deepcopy(model)
    reestimate_bn(bn32, splits.train, device=CPU)
    reestimate_bn(bn16, splits.train, device=CPU, dtype=torch.bfloat16)
    stats32 = {k: v for k, v in bn32.state_dict().items() if "running" in k}
    stats16 = {k: v for k, v in bn16.state_dict().items() if "running" in k}
    assert stats32 and all(v.dtype == torch.float32 for v in stats16.values())
    assert not all(torch.equal(stats32[k], stats16[k]) for k in stats32)
    for key, value in stats32.items():
        torch.testing.assert_close(stats16[key], value, rtol=0.05, atol=0.02)
    auc32 = evaluate(bn32, splits.test, device=CPU)["auc"]
    auc16 = evaluate(bn16, splits.test, device=CPU, dtype=torch.bfloat16)["auc"]
    assert abs(auc16 - auc32) <= 0.01


def test_fp32_bn_pass_equals_torchs_update_bn(trained: tuple[torch.nn.Module, object]) -> None:
    """The no-autograd pass gives torch.optim.swa_utils.update_bn's statistics bit for bit."""
    from torch.optim.swa_utils import update_bn
    from torch.utils.data import DataLoader

    from medfed.shared.training import update_bn_stats
    from medfed.shared.transforms import ImageSetDataset

    model, splits = trained
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    update_bn_stats(ours, DataLoader(ImageSetDataset(splits.train), batch_size=32), device=CPU)
    update_bn(DataLoader(ImageSetDataset(splits.train), batch_size=32), theirs)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_bf16_bn_pass_after_augmented_training_runs_the_transforms_in_fp32() -> None:
    """MONAI's random affine (numpy inside) runs outside autocast: only the forward pass is bf16."""
    splits = make_synthetic(task="classification", spatial_dims=2, num_samples=60, image_size=16, seed=1)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="batch", image_size=16)
    settings = TrainSettings(epochs=1, batch_size=16, learning_rate=0.01, augment=True, seed=0)
    optimizer = make_optimizer(model.parameters(), name="sgd", learning_rate=0.01, weight_decay=0.0)
    train_epochs(model, make_train_loader(splits.train, settings), optimizer, task="classification", epochs=1,
                 device=CPU, bn_dtype=torch.bfloat16)
    stats = [v for k, v in model.state_dict().items() if "running_var" in k]
    assert stats and all(v.dtype == torch.float32 and torch.isfinite(v).all() and (v > 0).all() for v in stats)


@pytest.mark.parametrize(("setting", "shown"), [("fp32", "fp32"), ("bf16", "bf16 autocast")])
def test_simulate_dry_run_states_the_evaluation_precision(tmp_path: Path, setting: str, shown: str) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    result = CliRunner().invoke(app, ["simulate", "--dry-run", "--run-dir", str(tmp_path / "runs"),
                                      "--set", f"eval-precision={setting}"])
    assert result.exit_code == 0, result.output
    assert f"eval-precision = \"{setting}\"" in result.output  # the key, with its source
    assert f"# eval-precision: {setting} -> {shown} for validation/test evaluation" in result.output


def test_the_decision_threshold_is_chosen_on_fp32_validation_scores(trained: tuple[torch.nn.Module, object]) -> None:
    """The threshold a checkpoint keeps (and medfed predict applies to fp32 probabilities) does not
    depend on eval-precision; only the test pass runs in bf16."""
    from medfed.shared.training import evaluate_at_validation_threshold

    model, splits = trained
    fp32 = evaluate_at_validation_threshold(model, splits.test, val=splits.val, device=CPU)
    bf16 = evaluate_at_validation_threshold(model, splits.test, val=splits.val, device=CPU, dtype=torch.bfloat16)
    assert bf16["threshold"] == fp32["threshold"]
    assert bf16["auc"] != fp32["auc"] or bf16["loss"] != fp32["loss"]  # the test pass did run in bf16
    assert abs(bf16["auc"] - fp32["auc"]) <= 0.01
