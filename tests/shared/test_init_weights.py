"""``init-weights``: a local state dict, medfed checkpoint or MONAI bundle initialises the model,
matched by name and shape, with a report of what was loaded, skipped, new and unused (issue 16)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.init_weights import InitWeightsError, load_init_weights, resolve_weights_path
from medfed.shared.models import build_model

SIDE = 12


def _model(classes: int = 3, *, seed: int, name: str = "simplecnn") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, spatial_dims=2, in_channels=1, out_channels=classes, norm="group", image_size=SIDE)


def _outputs(model: nn.Module) -> torch.Tensor:
    images = torch.randn(4, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        return model(images)


def _write(kind: str, source: nn.Module, folder: Path) -> Path:
    """The weights of ``source`` written as one of the three accepted kinds; the path to give."""
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    if kind == "state dict":
        path = folder / "weights.pt"
        torch.save(state, path)
        return path
    if kind == "medfed checkpoint":  # the payload of medfed.server.run_dir.RunDirectory.save_checkpoint
        path = folder / "run" / "checkpoints" / "best.pt"
        path.parent.mkdir(parents=True)
        payload = {
            "state_dict": state,
            "config": RunConfig(model="simplecnn", norm="group").to_run_config(),
            "round": 3,
            "metrics": {"auc": 0.9, "loss": 0.4},
            "model_shape": {"task": "classification", "spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                            "image_size": [SIDE, SIDE]},
        }
        torch.save(payload, path)
        return path
    # a MONAI bundle folder as medfed.shared.export.export_bundle writes it
    bundle = folder / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    torch.save(state, bundle / "models" / "model.pt")
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    return bundle


KINDS = ("state dict", "medfed checkpoint", "MONAI bundle")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_file_loads_into_the_same_architecture_with_identical_outputs(kind: str, tmp_path: Path) -> None:
    source = _model(seed=1)
    path = _write(kind, source, tmp_path)
    target = _model(seed=2)
    assert not torch.equal(_outputs(target), _outputs(source))  # different random starts
    report = load_init_weights(target, path=path)
    assert torch.equal(_outputs(target), _outputs(source))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    file = resolve_weights_path(path)
    assert report.kind == kind and report.path == str(file)
    assert report.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert report.loaded == tuple(source.state_dict()) and not report.skipped and not report.new and not report.unused
    assert report.loaded_parameters == report.model_parameters == sum(p.numel() for p in source.parameters())


def test_a_run_directory_and_the_bundle_weights_file_are_accepted_too(tmp_path: Path) -> None:
    source = _model(seed=1)
    checkpoint = _write("medfed checkpoint", source, tmp_path)
    bundle = _write("MONAI bundle", source, tmp_path)
    for given in (checkpoint.parents[1], bundle / "models" / "model.pt"):
        target = _model(seed=2)
        load_init_weights(target, path=given)
        assert torch.equal(_outputs(target), _outputs(source)), given


def test_another_number_of_classes_loads_the_backbone_and_reports_the_head_as_new(tmp_path: Path) -> None:
    source = _model(3, seed=1)
    path = _write("state dict", source, tmp_path)
    target = _model(5, seed=2)
    fresh_head = target.head.weight.detach().clone()
    report = load_init_weights(target, path=path)
    assert [s[0] for s in report.skipped] == ["head.weight", "head.bias"]
    assert report.skipped[0][1:] == ((3, 64), (5, 64))
    assert report.new == ("head.weight", "head.bias") and not report.unused
    assert torch.equal(target.head.weight, fresh_head)  # the new head keeps its own initialisation
    for name, value in source.features.state_dict().items():
        assert torch.equal(target.features.state_dict()[name], value), name
    text = "\n".join(report.lines())
    assert "skipped (shape differs, newly initialised) 2: head.weight [3, 64] -> [5, 64]" in text


def test_another_architecture_is_refused_naming_the_file_the_key_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save(_model(seed=1, name="resnet18").state_dict(), path)
    target = _model(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(InitWeightsError) as err:
        load_init_weights(target, path=path)
    message = str(err.value)
    assert isinstance(err.value, ConfigError)
    for fragment in (f"init-weights = {str(path.resolve())!r}", "matches none of the model's parameters",
                     "conv1.weight", "features.0.weight", "--model, --norm", "init-weights=''"):
        assert fragment in message, message
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


@pytest.mark.parametrize("prefix", ["module.", "_module.", "model.", "_module.module."])
def test_wrapper_prefixes_are_stripped(prefix: str, tmp_path: Path) -> None:
    source = _model(seed=1)
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    target = _model(seed=2)
    report = load_init_weights(target, path=path)
    assert report.stripped_prefix == prefix and not report.unused and not report.new
    assert torch.equal(_outputs(target), _outputs(source))


def test_unused_file_entries_are_reported(tmp_path: Path) -> None:
    source = _model(seed=1)
    path = tmp_path / "extra.pt"
    torch.save({**source.state_dict(), "aux.weight": torch.ones(2)}, path)
    report = load_init_weights(_model(seed=2), path=path)
    assert report.unused == ("aux.weight",)


def test_a_pickled_module_is_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(_model(seed=1), path)  # a pickled nn.Module: weights_only=True will not load it
    with pytest.raises(InitWeightsError, match=r"weights_only=True.*torch.save\(model.state_dict\(\)"):
        load_init_weights(_model(seed=2), path=path)


@pytest.mark.parametrize(
    ("given", "fragment"),
    [("nope.pt", "no such file"), ("", "no such file"), (".", "a folder without models/model.pt")],
)
def test_missing_files_name_the_key(given: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InitWeightsError) as err:
        resolve_weights_path(given or "missing/")
    assert "init-weights = " in str(err.value) and fragment in str(err.value)


def test_a_file_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pt"
    torch.save({"round": 3, "metrics": {"auc": 0.5}}, path)
    with pytest.raises(InitWeightsError, match="holds no model weights.*round, metrics"):
        load_init_weights(_model(seed=2), path=path)


# --------------------------------------------------------------------------- wiring
def _synthetic(tmp_path: Path, **changes: object) -> RunConfig:
    return RunConfig(dataset="synthetic", synthetic_samples=64, image_size=SIDE, model="simplecnn", norm="group",
                     num_sites=2, num_server_rounds=1, local_epochs=1, batch_size=16, run_dir=str(tmp_path / "runs"),
                     store="off", cross_site=False, personalize="off", **changes)  # type: ignore[arg-type]


def test_the_initial_model_of_a_run_is_loaded_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.task import initial_model

    source = _model(2, seed=1)
    _write("state dict", source, tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = _synthetic(tmp_path, init_weights="weights.pt")
    with caplog.at_level("INFO", logger="medfed.shared.task"):
        model = initial_model(cfg, load_dataset(cfg).train)
    assert torch.equal(_outputs(model), _outputs(source))
    assert f"init-weights: {tmp_path.resolve() / 'weights.pt'} (state dict" in caplog.text
    assert "loaded 11 entries" in caplog.text


def test_dry_run_shows_what_init_weights_loads_and_what_trains(tmp_path: Path) -> None:
    from medfed.cli import app

    _write("state dict", _model(3, seed=1), tmp_path)
    args = ["simulate", "--dry-run", "--model", "simplecnn", "--set", "norm=group", "--set", "synthetic-samples=64",
            "--image-size", str(SIDE), "--set", f"init-weights={tmp_path / 'weights.pt'}", "--set", "trainable=head"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"# init-weights: {tmp_path / 'weights.pt'} (state dict, sha256 " in result.output
    assert "#   skipped (shape differs, newly initialised) 2: head.weight [3, 64] -> [2, 64]" in result.output
    assert "# trainable = head: 130 of " in result.output
    bad = tmp_path / "resnet.pt"
    torch.save(_model(seed=1, name="resnet18").state_dict(), bad)
    result = CliRunner().invoke(app, [*args[:-4], "--set", f"init-weights={bad}"])
    assert result.exit_code == 2 and "matches none of the model's parameters" in result.output


def test_batchnorm_weights_into_group_norm_load_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(1)
    batch = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=3, norm="batch", image_size=SIDE)
    path = tmp_path / "batch.pt"
    torch.save(batch.state_dict(), path)
    with caplog.at_level("WARNING", logger="medfed.shared.init_weights"):
        report = load_init_weights(_model(seed=2), path=path)
    assert "features.1.running_mean" in report.unused and "features.1.weight" in report.loaded
    assert "3 BatchNorm layers" in caplog.text and "--norm" in caplog.text
