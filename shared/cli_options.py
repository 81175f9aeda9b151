"""Command-line options shared by the ``medfed`` commands (Typer / click; no Flower).

* :func:`config_option`: a flag that sets a run-config key; its help names the key and shows
  its default, which the command takes from :class:`~medfed.shared.config.RunConfig` (the one source
  of defaults); :func:`given_values` keeps only the flags the user typed (click's parameter
  source), so the config pipeline (``medfed.shared.config_sources``) knows which keys the user set.
* :class:`HintedChoice`: click's ``Choice`` whose choices may be computed on first use (the
  model registry imports torch) and whose error suggests the closest choice.
* :func:`verbose_option`: ``-v/--verbose`` and ``-q/--quiet``, with help.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import click
import typer
from rich.markup import escape

from medfed.shared.config import RunConfig, close_matches

__all__ = ["HintedChoice", "config_default", "config_option", "dry_run_option", "given_values", "verbose_option"]


class HintedChoice(click.Choice):
    """``click.Choice`` with lazily computed choices and a "Did you mean" hint.

    Parameters
    ----------
    choices
        The valid values, or a function returning them (called when first needed).
    """

    def __init__(self, choices: Sequence[str] | Callable[[], Sequence[str]]) -> None:
        self._source = choices
        self._loaded: tuple[str, ...] | None = None
        super().__init__((), case_sensitive=True)

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        """The valid values (computed on first use)."""
        if self._loaded is None:
            source = self._source
            self._loaded = tuple(source() if callable(source) else source)
        return self._loaded

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:  # click.Choice.__init__ assigns it
        if value:
            self._loaded = tuple(value)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The value if it is one of the choices, else a usage error with the closest one."""
        if value in self.choices:
            return value
        hint = close_matches(str(value), list(self.choices))
        self.fail(
            f"{value!r} is not one of {', '.join(repr(c) for c in self.choices)}.{hint}", param, ctx
        )


def config_default(key: str) -> Any:
    """The :class:`RunConfig` default of the kebab-case ``key``."""
    name = key.replace("-", "_")
    for f in fields(RunConfig):
        if f.name == name:
            return f.default
    raise KeyError(f"{key!r} is not a run-config key.")


def config_option(
    key: str,
    help: str,
    *param_decls: str,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    metavar: str | None = None,
) -> Any:
    """A Typer option that sets run-config ``key``; give it the default ``RunConfig.<field>``.

    Parameters
    ----------
    key
        The kebab-case run-config key (``num-server-rounds``).
    help
        What the option does; ``[key: <key>]`` is appended.
    *param_decls
        The flag names (default: ``--<key>``).
    choices
        Valid values as click choices (a function: computed when first needed).
    metavar
        Shown instead of the list of choices (a long list widens every line of ``--help``).
    """
    config_default(key)  # a typo in a declaration fails at import
    return typer.Option(
        *param_decls,
        help=escape(f"{help} [key: {key}]"),  # escaped: rich would read [key: ...] as markup
        show_default=True,
        click_type=HintedChoice(choices) if choices is not None else None,
        metavar=metavar,
    )


def given_values(ctx: click.Context, *, flags: dict[str, str]) -> dict[str, Any]:
    """``{key: value or None}``: the value of each flag the user gave, ``None`` for the others.

    Parameters
    ----------
    ctx
        The command's click context (its ``params`` hold every option's value).
    flags
        Run-config key -> the flag that sets it (``--sites``: parameter ``sites``).
    """
    untyped = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP, None)
    out: dict[str, Any] = {}
    for key, flag in flags.items():
        name = flag.removeprefix("--").replace("-", "_")
        out[key] = None if ctx.get_parameter_source(name) in untyped else ctx.params[name]
    return out


def dry_run_option(*, instead: str) -> Any:
    """``--dry-run``: print the resolved run config (each key's value and source) and exit 0 ``instead``."""
    return typer.Option(
        "--dry-run",
        help=f"Print the resolved config (every key, its value and where it came from) and exit {instead}.",
    )


def verbose_option(*, what: str) -> Any:
    """``--verbose/-v`` and ``--quiet/-q``: whether ``what`` is shown (INFO logs) or only warnings."""
    return typer.Option(
        "--verbose/--quiet",
        "-v/-q",
        help=f"--verbose shows {what}; --quiet only warnings and errors.",
        show_default=True,
    )
