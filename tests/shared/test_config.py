"""RunConfig: parsing kebab-case keys, coercion, and errors that name the key and the choices."""

from pathlib import Path

import pytest

from medfed.shared.config import ConfigError, RunConfig


def test_defaults_round_trip_through_kebab_case() -> None:
    cfg = RunConfig()
    assert RunConfig.from_mapping(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("raw", "field", "expected"),
    [
        ({"num-sites": "4"}, "num_sites", 4),
        ({"learning-rate": 1}, "learning_rate", 1.0),
        ({"augment": "false"}, "augment", False),
        ({"strategy": "fedadam"}, "strategy", "fedadam"),
        ({"num_server_rounds": 7}, "num_server_rounds", 7),
        ({"init-weights": "runs/x/checkpoints/best.pt"}, "init_weights", "runs/x/checkpoints/best.pt"),
        ({"trainable": "last-block+head"}, "trainable", "last-block+head"),
        ({"trainable": "norm+head"}, "trainable", "norm+head"),
        ({"dp-max-grad-norm": "2.5"}, "dp_max_grad_norm", 2.5),
        ({}, "dp_max_grad_norm", 5.0),  # the measured DP default (DP_MAX_GRAD_NORM, issue 16)
        ({}, "eval_precision", "auto"),
        ({"eval-precision": "fp32"}, "eval_precision", "fp32"),
        ({"eval_precision": "bf16"}, "eval_precision", "bf16"),
        ({}, "decision_threshold", "youden"),
        ({"decision-threshold": "accuracy"}, "decision_threshold", "accuracy"),
    ],
)
def test_values_are_coerced(raw: dict, field: str, expected: object) -> None:
    assert getattr(RunConfig.from_mapping(raw), field) == expected


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"num-sitez": 3}, ["num-sitez", "num-sites"]),
        ({"strategy": "fedsgd"}, ["strategy", "'fedsgd'", "'fedavg'", "'fedprox'", "'fedadam'"]),
        ({"partition": "random"}, ["partition", "'dirichlet'"]),
        ({"num-server-rounds": 0}, ["num-server-rounds", ">= 1"]),
        ({"learning-rate": -0.1}, ["learning-rate", "> 0"]),
        ({"num-sites": 2.5}, ["num-sites", "int"]),
        ({"augment": "maybe"}, ["augment", "bool"]),
        ({"fraction-fit": 1.5}, ["fraction-fit", "[0, 1]"]),
        ({"trainable": "backbone"}, ["trainable", "'all'", "'head'", "'last-block+head'", "'norm+head'"]),
        ({"init-weights": 1.5}, ["init-weights", "str"]),
        ({"eval-precision": "fp16"}, ["eval-precision", "'fp16'", "'auto'", "'fp32'", "'bf16'"]),
        ({"decision-threshold": "f1"}, ["decision-threshold", "'f1'", "'youden'", "'accuracy'"]),
    ],
)
def test_bad_input_names_key_and_fix(raw: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(raw, source="site.toml")
    for fragment in fragments:
        assert fragment in str(err.value)


def test_from_toml_reads_top_level_or_flower_table(tmp_path: Path) -> None:
    plain = tmp_path / "run.toml"
    plain.write_text('num-sites = 5\nstrategy = "fedprox"\n')
    assert RunConfig.from_toml(plain).num_sites == 5
    project = tmp_path / "pyproject.toml"
    project.write_text('[tool.flwr.app.config]\nnum-server-rounds = 9\n')
    assert RunConfig.from_toml(project).num_server_rounds == 9


def test_from_toml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml"):
        RunConfig.from_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("num-sites = = 3")
    with pytest.raises(ConfigError, match="broken.toml"):
        RunConfig.from_toml(broken)


def test_pyproject_app_config_is_valid() -> None:
    """The shipped [tool.flwr.app.config] parses (so `flwr run .` starts)."""
    root = Path(__file__).resolve().parents[2]
    RunConfig.from_toml(root / "pyproject.toml")
