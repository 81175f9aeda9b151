"""The one config pipeline (issue 13): defaults < file < flags < --set, validated once, with the
source of every key; ``--dry-run`` prints it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.config_sources import (
    DEFAULT,
    config_from_run_config,
    file_layer,
    flag_layer,
    mapping_layer,
    parse_set,
    resolve_config,
    set_layer,
)
from medfed.simulations.cli import SIMULATE_FLAGS, resolve_simulate_config


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "f.toml"
    path.write_text(body)
    return path


# key, file value, flag value, --set value -> the expected value and source (None: not given)
PRECEDENCE: list[tuple[str, Any, Any, Any, Any, str]] = [
    ("num-sites", None, None, None, 3, DEFAULT),
    ("num-sites", 4, None, None, 4, "file"),
    ("num-sites", None, 5, None, 5, "flag --sites"),
    ("num-sites", 4, 5, None, 5, "flag --sites"),
    ("num-sites", 4, None, "6", 6, "--set"),
    ("num-sites", 4, 5, "6", 6, "--set"),
    ("num-sites", None, 5, "6", 6, "--set"),
    ("learning-rate", 0.1, None, None, 0.1, "file"),
    ("learning-rate", 0.1, 0.2, None, 0.2, "flag --lr"),
    ("learning-rate", 0.1, 0.2, "0.3", 0.3, "--set"),
    ("num-server-rounds", 7, None, None, 7, "file"),
    ("num-server-rounds", 7, 8, None, 8, "flag --rounds"),
    ("dirichlet-alpha", None, 0.7, "0.9", 0.9, "--set"),
    ("partition", '"dirichlet"', "quantity", None, "quantity", "flag --partition"),
    ("augment", "false", None, None, False, "file"),
    ("augment", "false", None, "true", True, "--set"),
    ("eval-precision", '"fp32"', None, None, "fp32", "file"),
    ("eval-precision", '"fp32"', None, "bf16", "bf16", "--set"),
    ("decision-threshold", '"accuracy"', None, None, "accuracy", "file"),
]


@pytest.mark.parametrize(("key", "in_file", "flag", "in_set", "value", "source"), PRECEDENCE)
def test_file_flag_and_set_precedence(
    tmp_path: Path, key: str, in_file: Any, flag: Any, in_set: Any, value: Any, source: str
) -> None:
    path = _toml(tmp_path, f"{key} = {in_file}\n" if in_file is not None else "")
    overrides = {k: None for k in SIMULATE_FLAGS}
    if flag is not None:
        overrides[key] = flag
    sets = [f"{key}={in_set}"] if in_set is not None else []
    resolved = resolve_simulate_config(path, overrides, sets)
    assert resolved.config.to_run_config()[key] == value
    assert resolved.sources[key] == (f"file {path}" if source == "file" else source)
    assert {k for k, s in resolved.sources.items() if s != DEFAULT} <= {key}


def test_a_files_min_fit_clients_is_kept_with_more_sites_from_a_flag(tmp_path: Path) -> None:
    """The measured bug: the file was validated (and clamped to the default 3 sites) on its own."""
    path = _toml(tmp_path, "min-fit-clients = 4\n")
    resolved = resolve_simulate_config(path, {"num-sites": 5}, [])
    assert resolved.config.min_fit_clients == 4 and resolved.config.num_sites == 5
    assert resolved.sources["min-fit-clients"] == f"file {path}"
    assert resolved.sources["num-sites"] == "flag --sites"
    assert resolve_simulate_config(None, {"num-sites": 5}, ["min-fit-clients=4"]).config.min_fit_clients == 4


@pytest.mark.parametrize(
    ("body", "overrides", "sets", "fragments"),
    [
        ("min-fit-clients = 4\n", {}, [], ["f.toml) = 4 exceeds", "num-sites (default) = 3"]),
        ("", {"num-sites": 2}, ["min-fit-clients=3"], ["min-fit-clients (--set) = 3", "num-sites (--sites) = 2"]),
        ("num-sites = 2\n", {}, ["min-fit-clients=5"], ["min-fit-clients (--set) = 5", "f.toml) = 2"]),
    ],
)
def test_a_given_min_fit_clients_above_num_sites_is_an_error_naming_both(
    tmp_path: Path, body: str, overrides: dict, sets: list[str], fragments: list[str]
) -> None:
    path = _toml(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        resolve_simulate_config(path, overrides, sets)
    message = str(err.value)
    for fragment in [*fragments, "--set min-fit-clients=", "--set num-sites="]:
        assert fragment in message, message


def test_only_the_default_min_fit_clients_is_capped_and_the_note_says_so() -> None:
    resolved = resolve_simulate_config(None, {"num-sites": 1}, [])
    assert resolved.config.min_fit_clients == 1
    assert resolved.sources["min-fit-clients"] == DEFAULT
    assert any("min-fit-clients" in note and "capped" in note for note in resolved.notes)
    assert "# note: min-fit-clients" in resolved.describe()
    with pytest.raises(ConfigError, match="min-fit-clients = 3 exceeds num-sites = 1"):  # not capped: not the default
        RunConfig(num_sites=1, min_fit_clients=3)


def test_errors_name_the_layer_a_value_came_from(tmp_path: Path) -> None:
    path = _toml(tmp_path, "num-sites = 0\n")
    with pytest.raises(ConfigError, match=r"^file .*f\.toml: num-sites = 0 .*>= 1"):
        resolve_config(file_layer(path))
    with pytest.raises(ConfigError, match=r"num-sites \(.*f\.toml\) = 0 .*>= 1"):
        resolve_config(file_layer(path), set_layer(["seed=1"]))
    with pytest.raises(ConfigError, match=r"num-sites \(--sites\) = 0"):
        resolve_config(flag_layer({"num-sites": 0}, flags={"num-sites": "--sites"}))
    with pytest.raises(ConfigError, match=r"Unknown key 'num-site' in --set\. Did you mean 'num-sites'"):
        resolve_config(set_layer(["num-site=3"]))
    with pytest.raises(ConfigError, match=r"batch-size = 'x' in --set is invalid: expected a value of type int"):
        resolve_config(set_layer(["batch-size=x"]))


@pytest.mark.parametrize("item", ["num-sites", "=3", ""])
def test_a_malformed_set_names_it_and_the_form(item: str) -> None:
    with pytest.raises(ConfigError, match=r"--set .* is invalid: write --set key=value"):
        parse_set([item])


def test_flowers_run_config_is_one_more_layer_resolved_once_per_mapping() -> None:
    raw = {"num-sites": 4, "min-fit-clients": 4, "strategy": "fedprox"}
    cfg = config_from_run_config(raw)
    assert cfg == resolve_config(mapping_layer(raw, source="run config")).config
    assert config_from_run_config(dict(raw)) is cfg  # cached: the ClientApp asks per message
    with pytest.raises(ConfigError, match=r"min-fit-clients \(run config\) = 9 exceeds num-sites \(run config\) = 4"):
        config_from_run_config({**raw, "min-fit-clients": 9})


# ------------------------------------------------------------------ --dry-run
def test_simulate_dry_run_prints_every_key_with_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acceptance: `medfed simulate --dry-run --config f.toml --sites 5` with min-fit-clients = 4."""
    monkeypatch.chdir(tmp_path)
    path = _toml(tmp_path, "min-fit-clients = 4\n")
    result = CliRunner().invoke(
        app, ["simulate", "--dry-run", "--config", str(path), "--sites", "5", "--run-dir", "out", "--set", "seed=3"]
    )
    assert result.exit_code == 0, result.output
    lines = {line.split(" = ")[0]: line for line in result.output.splitlines() if " = " in line}
    assert set(lines) == set(RunConfig.keys())
    assert lines["min-fit-clients"].split("#")[0].strip() == "min-fit-clients = 4"
    assert lines["min-fit-clients"].endswith(f"# file {path}")
    assert lines["num-sites"].endswith("# flag --sites") and lines["seed"].endswith("# --set")
    assert lines["strategy"].endswith("# default")
    assert not (tmp_path / "out").exists()  # nothing ran
    # the printed config is itself a TOML file that gives the same config back
    printed = tomllib.loads(result.output)
    assert RunConfig.from_mapping(printed) == resolve_simulate_config(path, {"num-sites": 5, "run-dir": "out"}, ["seed=3"]).config


def test_simulate_dry_run_with_resume_names_the_runs_config(tmp_path: Path) -> None:
    import json

    run = tmp_path / "run"
    run.mkdir()
    stored = RunConfig(num_sites=4, min_fit_clients=4).to_run_config()
    (run / "config.json").write_text(json.dumps({"config": stored, "mode": "federated"}))
    result = CliRunner().invoke(app, ["simulate", "--dry-run", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    lines = {line.split(" = ")[0]: line for line in result.output.splitlines() if " = " in line}
    assert lines["num-sites"].endswith(f"# file {run / 'config.json'}")
    assert lines["resume"].endswith("# flag --resume")


def test_run_dry_run_prints_the_deployment_config_and_submits_nothing(tmp_path: Path) -> None:
    from medfed.server.provision import provision

    fed = tmp_path / "fed"
    provision(fed, sites=["a", "b", "c"], superlink_address="localhost:9092", hosts=[], name="t", force=False)
    path = _toml(tmp_path, 'model = "simplecnn"\nimage-size = 16\nnorm = "group"\n')
    result = CliRunner().invoke(
        app, ["run", "-f", str(fed), "--config", str(path), "--set", "num-server-rounds=5", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    lines = {line.split(" = ")[0]: line for line in result.output.splitlines() if " = " in line}
    assert lines["dataset"] == lines["dataset"].split("#")[0] + "# deployment default"
    assert lines["num-sites"].startswith("num-sites = 3 ") and lines["num-sites"].endswith("# deployment default")
    assert lines["secagg"].startswith("secagg = true ")
    assert lines["model"].endswith(f"# file {path}")
    assert lines["num-server-rounds"].startswith("num-server-rounds = 5 ") and lines["num-server-rounds"].endswith("# --set")
    assert not (fed / "runs").exists()
    bad = CliRunner().invoke(app, ["run", "-f", str(fed), "--set", "num-sites=4", "--dry-run"])
    assert bad.exit_code == 2 and "only 3 site(s) are enrolled" in " ".join(bad.output.split())


def test_run_refuses_a_config_no_site_can_train_before_submitting(tmp_path: Path) -> None:
    from medfed.server.provision import provision

    fed = tmp_path / "fed"
    provision(fed, sites=["a", "b"], superlink_address="localhost:9092", hosts=[], name="t", force=False)
    args = ["run", "-f", str(fed), "--set", "model=simplecnn", "--set", "image-size=16", "--set", "dp=true"]
    result = CliRunner().invoke(app, [*args, "--set", "norm=batch"])  # no SuperLink runs: submitting would fail otherwise
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert 'norm = "batch"' in message and "--set norm=group" in message and "submitted" not in message
