"""Every ``medfed`` command's --help shows defaults, config keys, choices and an off switch for
every -v (issue 13)."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.config import NORMS, PARTITIONS, STRATEGIES, RunConfig
from medfed.shared.models import MODELS
from medfed.simulations.cli import SIMULATE_FLAGS

ROOT = typer.main.get_command(app)


def _commands(group: click.Command = ROOT, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    if isinstance(group, click.Group):
        return [c for name, sub in group.commands.items() for c in _commands(sub, (*path, name))]
    return [(" ".join(path), group)]


COMMANDS = dict(_commands())
NO_DEFAULT = {"config", "set_", "san", "resume", "section", "workdir"}
"""Options whose absence is their default (nothing given: no file, no override, every section)."""


def test_every_documented_command_is_covered() -> None:
    expected = {"simulate", "run", "provision", "server start", "site check", "site start", "dashboard", "bench",
                "predict", "export", "report", "export-run"}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_or_states_its_default(name: str) -> None:
    for param in COMMANDS[name].params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        assert param.help, f"medfed {name} {param.opts[0]} has no help"
        if param.required or (param.is_flag and not param.secondary_opts) or param.name in NO_DEFAULT:
            continue
        if param.default is None:
            assert "default" in param.help.lower(), f"medfed {name} {param.opts[0]}: default neither shown nor stated"
        else:
            assert param.show_default, f"medfed {name} {param.opts[0]} hides its default {param.default!r}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_verbose_flag_has_help_and_an_off_switch(name: str) -> None:
    for param in COMMANDS[name].params:
        if isinstance(param, click.Option) and "-v" in param.opts:
            assert param.help and "--quiet" in param.secondary_opts and "-q" in param.secondary_opts, name


def test_simulate_flags_name_their_key_and_show_the_run_configs_default() -> None:
    params = {p.name: p for p in COMMANDS["simulate"].params}
    defaults = RunConfig().to_run_config()
    for key, flag in SIMULATE_FLAGS.items():
        param = params[flag.removeprefix("--").replace("-", "_")]
        assert flag in param.opts
        assert f"[key: {key}]" in param.help.replace("\\[", "["), (flag, param.help)
        assert param.default == defaults[key] and param.show_default, flag


@pytest.mark.parametrize(
    ("flag", "choices"),
    [("partition", PARTITIONS), ("norm", NORMS), ("strategy", STRATEGIES), ("model", tuple(MODELS))],
)
def test_simulate_choices_are_click_choices_from_the_one_definition(flag: str, choices: tuple[str, ...]) -> None:
    param = {p.name: p for p in COMMANDS["simulate"].params}[flag]
    assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == tuple(choices)


def test_the_rendered_help_shows_key_and_default_on_the_options_line() -> None:
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    rounds = next(line for line in result.output.splitlines() if "--rounds" in line)
    assert "[key: num-server-rounds]" in rounds and "[default: 3]" in rounds, rounds
    lr = next(line for line in result.output.splitlines() if "--lr " in line)
    assert "[key: learning-rate]" in lr and f"[default: {RunConfig.learning_rate}]" in lr, lr


def test_a_mistyped_choice_suggests_the_closest() -> None:
    result = CliRunner().invoke(app, ["simulate", "--strategy", "fedprx"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "Did you mean 'fedprox'" in " ".join(result.output.split())


def test_the_model_flag_names_every_registered_model() -> None:
    """``--model``'s help lists the registry's names by hand (the registry imports torch): it must
    name each of them, so a model added to the registry without the help fails here."""
    from medfed.shared.models import MODELS

    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    start = text.index("Model registry name:")
    listed = text[start:text.index("`medfed models`", start)]
    assert all(name in listed.replace(",", " ").split() for name in MODELS), listed
