"""Every configuration key and flag, given a bad value, fails fast naming the key and the valid
choices or range (issue 6): the run config, ``site.toml``, and the flags of ``medfed simulate``,
``medfed site`` and ``medfed server``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from medfed.cli import app
from medfed.client.site_config import SiteConfig, SiteConfigError, load_site_config
from medfed.shared.config import ConfigError, RunConfig
from medfed.simulations.cli import SIMULATE_FLAGS, build_config

# key -> (bad value, fragments the error must contain besides the key)
RUN_CONFIG_TABLE: dict[str, tuple[Any, list[str]]] = {
    "dataset": (["a.json"], ["type str"]),
    "synthetic-task": ("detection", ["'classification', 'segmentation'"]),
    "synthetic-dims": (4, ["2, 3"]),
    "synthetic-samples": (7, [">= 8"]),
    "image-size": (-1, [">= 0"]),
    "patch-size": (-1, [">= 0"]),
    "bad-data": ("skipp", ["Did you mean 'skip'", "'strict', 'skip'"]),
    "spacing": ("1,-2", ["voxel size in mm", "each > 0"]),
    "num-sites": (0, [">= 1"]),
    "num-server-rounds": (0, [">= 1"]),
    "local-epochs": (0, [">= 1"]),
    "batch-size": ("eight", ["type int"]),
    "learning-rate": (float("inf"), ["finite"]),
    "optimizer": ("rmsprop", ["'sgd', 'adam'"]),
    "weight-decay": (-0.1, [">= 0"]),
    "model": ("resnet19", ["Did you mean 'resnet18'", "'densenet121'", "'unet'"]),
    "norm": ("layer", ["'batch', 'group', 'instance'"]),
    "strategy": ("fedsgd", ["'fedavg', 'fedprox', 'fedadam'"]),
    "proximal-mu": (-1, [">= 0"]),
    "server-learning-rate": (-1, [">= 0"]),
    "fraction-fit": (1.5, ["[0, 1]"]),
    "fraction-evaluate": (-0.1, ["[0, 1]"]),
    "min-fit-clients": (0, [">= 1"]),
    "partition": ("random", ["'iid', 'dirichlet', 'quantity'"]),
    "dirichlet-alpha": (0, ["> 0"]),
    "augment": ("maybe", ["type bool"]),
    "seed": (-1, [">= 0"]),
    "run-dir": (["runs"], ["type str"]),
    "store": ("mysql://db", ["sqlite:///", "postgresql://", "'off'"]),
    "dp": ("perhaps", ["type bool"]),
    "dp-noise-multiplier": (-1, [">= 0"]),
    "dp-max-grad-norm": (0, ["> 0"]),
    "dp-target-epsilon": (-2, [">= 0"]),
    "dp-delta": (1.5, ["(0, 1)"]),
    "dp-budget-epsilon": (0, ["> 0"]),
    "dp-accountant": ("moments", ["'rdp', 'prv', 'gdp'"]),
    "dp-secure-noise": ("2", ["type bool"]),
    "dp-grad-sample-mode": ("ghosts", ["Did you mean 'ghost'", "'hooks', 'ghost', 'functorch', 'bookkeeping'"]),
    "ledger-dir": (3, ["type str"]),
    "tracking-mlflow": (5, ["type str"]),
    "tracking-tensorboard": (["tb"], ["type str"]),
    "intended-use": (1.5, ["type str"]),
    "client-dp": ("on", ["'off', 'fixed', 'adaptive'"]),
    "client-dp-noise-multiplier": (-0.5, [">= 0"]),
    "client-dp-clipping-norm": (float("nan"), ["finite"]),
    "secagg": ("sure", ["type bool"]),
    "secagg-num-shares": (1, [">= 2"]),
    "secagg-reconstruction-threshold": (0, [">= 1"]),
    "secagg-clipping-range": (0, ["> 0"]),
    "secagg-quantization-range": (1, [">= 2"]),
    "secagg-max-weight": (-5, ["> 0"]),
    "secagg-timeout": (0, ["> 0"]),
    "secagg-on-failure": ("retry", ["'continue', 'stop'"]),
    "secagg-mask-generator": ("mt19937", ["'aes-256-ctr', 'flower-mt19937'"]),
    "in-channels": (0, [">= 1"]),
    "num-classes": (1, [">= 2"]),
    "spatial-dims": (1, ["2, 3"]),
    "app-signature": (5, ["type str"]),
    "round-timeout": (-1, ["or 0 to wait without limit"]),
    "resume": (5, ["type str"]),
    "max-update-norm": (-1, ["finite number >= 0", "0 turns the norm check off"]),
    "trim-beta": (0.6, ["[0, 0.5)"]),
    "num-malicious-sites": (-1, [">= 0"]),
    "num-sites-to-keep": (-1, [">= 0"]),
    "local-test-fraction": (0.7, ["[0, 0.5]"]),
    "personalize": ("bn+heads", ["'off', 'bn', 'head', 'bn+head'", "Did you mean 'bn+head'"]),
    "personalize-epochs": (-1, [">= 0"]),
    "local-only-baseline": ("maybe", ["type bool"]),
    "cross-site": ("maybe", ["type bool"]),
    "cross-site-min-count": (1, [">= 2"]),
    "server-momentum": (1.0, ["[0, 1)"]),
    "server-beta-1": (-0.1, ["[0, 1)"]),
    "server-beta-2": (1.5, ["[0, 1)"]),
    "server-tau": (0, ["> 0"]),
    "bn-mode": ("silobn", ["'global', 'local-stats', 'fedbn'"]),
    "loss": ("focal", ["'ce', 'balanced-softmax', 'fedlc'"]),
    "fedlc-tau": (-1, [">= 0"]),
    "init-weights": (3, ["type str"]),
    "trainable": ("heads", ["Did you mean 'head'", "'all', 'head', 'last-block+head', 'norm+head'"]),
    "eval-precision": ("bf32", ["'auto', 'fp32', 'bf16'"]),
    "sim-backend": ("inprocess", ["Did you mean 'in-process'", "'auto', 'in-process', 'processes', 'ray'"]),
    "decision-threshold": ("accurate", ["Did you mean 'accuracy'", "'youden', 'accuracy'"]),
}


def test_the_table_covers_every_run_config_key() -> None:
    assert sorted(RUN_CONFIG_TABLE) == sorted(RunConfig.keys())


@pytest.mark.parametrize("key", sorted(RUN_CONFIG_TABLE))
def test_bad_run_config_value_names_key_and_valid_values(key: str) -> None:
    value, fragments = RUN_CONFIG_TABLE[key]
    with pytest.raises(ConfigError) as err:
        build_config(None, {key: value}, [])
    message = str(err.value)
    # the key, and where its value came from: "key (--key) = ..." or "key = ... in flag --key"
    flag = SIMULATE_FLAGS.get(key, f"--{key}")
    assert f"{key} ({flag}) = " in message or (f"{key} = " in message and f"flag {flag}" in message), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("num-site", "num-sites"), ("learning_rat", "learning-rate"), ("dp-budget", "dp-budget-epsilon"), ("bad_data", None)],
)
def test_unknown_key_suggests_the_closest_and_lists_all(key: str, suggestion: str | None) -> None:
    if suggestion is None:  # snake_case of a real key is accepted
        assert RunConfig.from_mapping({key: "skip"}).bad_data == "skip"
        return
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: 1}, source="run.toml")
    message = str(err.value)
    assert f"Unknown key {key!r} in run.toml" in message and f"Did you mean {suggestion!r}" in message
    assert "Valid keys: dataset, " in message


def test_a_nonexistent_dataset_names_the_key_before_ray_starts(tmp_path: Path) -> None:
    from medfed.shared.data.base import DataError
    from medfed.simulations.simulate import run_federated

    with pytest.raises(DataError, match=r"dataset '.*nope\.json' does not exist.*'synthetic'"):
        run_federated(RunConfig(dataset=str(tmp_path / "nope.json"), image_size=8, run_dir=str(tmp_path)))


# ------------------------------------------------------------------ site.toml
SITE_TABLE: dict[str, tuple[str, list[str]]] = {
    "site-name": ('site-name = ""', ["site-name must not be empty"]),
    "datalist": ('datalist = "nope.json"', ["datalist = 'nope.json' does not exist", "datalist JSON"]),
    "device": ('device = "gpu"', ["device = 'gpu' is invalid", '"auto", "cpu" or "cuda[:N]"']),
    "dp-budget-epsilon": ("dp-budget-epsilon = -1", ["dp-budget-epsilon = -1.0 is invalid", "> 0"]),
    "runtime-port": ("runtime-port = 99999", ["runtime-port = 99999 is invalid", "1024-65535"]),
    "state-dir": ("state-dir = 5", ["state-dir = 5 is invalid", "folder path"]),
    "image-size": ('image-size = "big"', ["image-size = 'big' is invalid", "integer >= 0"]),
    "num-classes": ("num-classes = -2", ["num-classes = -2 is invalid", ">= 0"]),
    "bad-data": ('bad-data = "lenient"', ["bad-data = 'lenient' is invalid", '"strict", "skip"']),
    "spacing": ('spacing = "1,1,1,1"', ["spacing = '1,1,1,1' is invalid", "one per axis"]),
    "require-dp": ('require-dp = "yes"', ["require-dp = 'yes' is invalid", "true or false"]),
    "dp-max-delta": ("dp-max-delta = 2", ["dp-max-delta = 2.0 is invalid", "(0, 1)"]),
    "dp-min-noise-multiplier": ("dp-min-noise-multiplier = -1", ["dp-min-noise-multiplier = -1.0 is invalid", ">= 0"]),
    "dp-require-secure-noise": ("dp-require-secure-noise = 1", ["dp-require-secure-noise = 1 is invalid", "true or false"]),
    "ledger-dir": ("ledger-dir = 5", ["ledger-dir = 5 is invalid", "folder path"]),
    "cross-site-min-count": ("cross-site-min-count = 1", ["cross-site-min-count = 1 is invalid", ">= 2"]),
    "auth-private-key": ("auth-private-key = 5", ["auth-private-key = 5 is invalid", "key file path"]),
}


def _site_toml(tmp_path: Path, line: str) -> Path:
    (tmp_path / "datalist.json").write_text('{"training": []}')
    base = {"site-name": 'site-name = "a"', "datalist": 'datalist = "datalist.json"'}
    key = line.split("=")[0].strip()
    body = "\n".join([*(v for k, v in base.items() if k != key), line]) + "\n"
    path = tmp_path / "site.toml"
    path.write_text(body)
    return path


def test_the_table_covers_every_site_config_key() -> None:
    assert sorted(SITE_TABLE) == sorted(SiteConfig.keys())


@pytest.mark.parametrize("key", sorted(SITE_TABLE))
def test_bad_site_config_value_names_file_key_and_valid_values(tmp_path: Path, key: str) -> None:
    line, fragments = SITE_TABLE[key]
    path = _site_toml(tmp_path, line)
    with pytest.raises(SiteConfigError) as err:
        load_site_config(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_site_key_suggests_the_closest(tmp_path: Path) -> None:
    path = _site_toml(tmp_path, 'bad_data = "skip"')
    with pytest.raises(SiteConfigError, match=r"unknown key 'bad_data'\. Did you mean 'bad-data'\? Valid keys: site-name"):
        load_site_config(path)


# ------------------------------------------------------------------ command-line flags
SIMULATE_TABLE: dict[str, tuple[list[str], list[str]]] = {
    "config": (["--config", "missing.toml"], ["missing.toml", "does not exist"]),
    "resume": (["--resume", "nowhere"], ["resume = 'nowhere'", "no such run directory"]),
    "cross_site_only": (["--cross-site-only", "nowhere.pt"], ["--cross-site-only nowhere.pt", "no such checkpoint file"]),
    "dataset": (["--dataset", "nope.json"], ["dataset 'nope.json' does not exist"]),
    "sites": (["--sites", "0"], ["num-sites (--sites) = 0", ">= 1"]),
    "partition": (["--partition", "random"], ["'--partition'", "'random' is not one of", "'dirichlet'"]),
    "alpha": (["--alpha", "0"], ["dirichlet-alpha (--alpha) = 0", "> 0"]),
    "rounds": (["--rounds", "0"], ["num-server-rounds (--rounds) = 0", ">= 1"]),
    "local_epochs": (["--local-epochs", "x"], ["--local-epochs", "not a valid integer"]),
    "model": (["--model", "densenet"], ["'--model'", "'densenet' is not one of", "Did you mean 'densenet121'"]),
    "norm": (["--norm", "batchnorm"], ["'--norm'", "'batchnorm' is not one of", "Did you mean 'batch'"]),
    "strategy": (["--strategy", "fedsgd"], ["'--strategy'", "'fedsgd' is not one of", "'fedprox'"]),
    "lr": (["--lr", "-1"], ["learning-rate (--lr) = -1.0", "> 0"]),
    "batch_size": (["--batch-size", "0"], ["batch-size (--batch-size) = 0", ">= 1"]),
    "image_size": (["--image-size", "-3"], ["image-size (--image-size) = -3", ">= 0"]),
    "seed": (["--seed", "-1"], ["seed (--seed) = -1", ">= 0"]),
    "run_dir": (["--run-dir", "FILE"], ["run-dir", "is a file: give a folder"]),
    "set_": (["--set", "num-site=3"], ["Unknown key 'num-site'", "Did you mean 'num-sites'"]),
}


def _flag_params(command: typer.Typer, name: str | None = None) -> set[str]:
    click_command = typer.main.get_command(command)
    if name:
        click_command = click_command.commands[name]  # type: ignore[attr-defined]
    return {p.name for p in click_command.params if p.name not in ("help",)}  # type: ignore[misc]


def test_the_table_covers_every_simulate_value_flag() -> None:
    switches = {"centralized", "verbose", "dry_run"}  # on/off flags: no bad value
    assert sorted(SIMULATE_TABLE) == sorted(_flag_params(app, "simulate") - switches)


@pytest.mark.parametrize("flag", sorted(SIMULATE_TABLE))
def test_bad_simulate_flag_fails_fast_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    args, fragments = SIMULATE_TABLE[flag]
    result = CliRunner().invoke(app, ["simulate", *args])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.replace("\u2502", " ").split())  # rich wraps long lines in a box
    for fragment in fragments:
        assert fragment in output, output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["site", "check", "--config", "SITE", "--image-size", "-1"], ["--image-size = -1", ">= 0"]),
        (["site", "check", "--config", "SITE", "--num-classes", "-1"], ["--num-classes = -1", ">= 0"]),
        (["site", "check", "--config", "SITE", "--bad-data", "lenient"], ["'--bad-data'", "'lenient' is not one of 'strict', 'skip'"]),
        (["site", "check", "--config", "missing.toml"], ["missing.toml", "does not exist"]),
        (["site", "start", "--kit", "KIT", "--config", "SITE", "--max-connect-attempts", "0"],
         ["--max-connect-attempts", "x>=1"]),
        (["site", "start", "--kit", "nokit", "--config", "SITE"], ["nokit", "not a startup kit"]),
        (["server", "start", "--federation", "nofed", "--port", "70000"], ["--port", "1<=x<=65535"]),
        (["server", "start", "--federation", "nofed"], ["nofed"]),
        (["run", "--federation", "nofed", "--timeout", "0"], ["--timeout", "x>=1"]),
    ],
)
def test_bad_site_and_server_flags_name_the_flag_and_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], fragments: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _site_toml(tmp_path, 'device = "cpu"')
    (tmp_path / "KIT").mkdir()
    args = [str(tmp_path / "site.toml") if a == "SITE" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in output, output
