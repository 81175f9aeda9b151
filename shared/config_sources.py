"""One config pipeline: raw sources merged, then validated once into a :class:`RunConfig`.

Every entry point (``medfed simulate``, ``medfed run``, ``--resume``, the ServerApp and ClientApp
under ``flwr run``, ``python -m medfed.simulations.bench.quality``) builds its run config the same way:

1. each source is a :class:`Layer` of raw kebab-case keys: the defaults of
   :class:`~medfed.shared.config.RunConfig`, then (in the order given) a TOML file
   (:func:`file_layer`), command-line flags (:func:`flag_layer`), ``--set key=value`` pairs
   (:func:`set_layer`), or any other mapping such as Flower's ``context.run_config``
   (:func:`mapping_layer`);
2. :func:`resolve_config` checks each layer's keys and value types (errors name the layer:
   the file, the flag, ``--set``), merges them (a later layer wins), and validates the merged
   mapping once, returning a :class:`ResolvedConfig`: the frozen ``RunConfig`` and where each
   key came from.

No layer is validated on its own: a file's ``min-fit-clients = 4`` and ``--sites 5`` are
checked together. ``min-fit-clients`` is never lowered when a user gave it: one larger than
``num-sites`` is an error naming both keys and where each came from. Only the default (2)
is capped to ``num-sites`` (a one-site run), and :attr:`ResolvedConfig.notes` says so.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medfed.shared.config import (
    DEFAULT_MIN_FIT_CLIENTS,
    ConfigError,
    RunConfig,
    close_matches,
    coerce_value,
)
from medfed.shared.files import read_toml

__all__ = [
    "DEFAULT",
    "Layer",
    "ResolvedConfig",
    "file_layer",
    "flag_layer",
    "mapping_layer",
    "parse_set",
    "set_layer",
    "resolve_config",
    "config_from_run_config",
]

DEFAULT = "default"
"""The source of a key no layer set."""


@dataclass(frozen=True)
class Layer:
    """One raw source of run-config keys.

    Parameters
    ----------
    values
        Keys (kebab-case or snake_case) to raw values (strings from ``--set`` are coerced).
    source
        Where the values came from, as a user reads it: ``"file f.toml"``, ``"--set"``,
        ``"run config"``.
    labels
        Per-key sources that replace ``source`` (a flag layer: ``{"num-sites": "flag --sites"}``).
    """

    values: Mapping[str, Any]
    source: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def label(self, key: str) -> str:
        """Where ``key`` (kebab-case) came from."""
        return self.labels.get(key, self.source)


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated run config and where each of its keys came from.

    Parameters
    ----------
    config
        The frozen, validated run config.
    sources
        Every kebab-case key to its source: ``"default"``, ``"file <path>"``,
        ``"flag --<name>"``, ``"--set"``, or the ``source`` of another layer.
    notes
        What the pipeline decided on its own (a capped default), one sentence each.
    """

    config: RunConfig
    sources: Mapping[str, str]
    notes: tuple[str, ...] = ()

    def rows(self) -> list[tuple[str, Any, str]]:
        """``(key, value, source)`` for every key, in :meth:`RunConfig.keys` order."""
        values = self.config.to_run_config()
        return [(key, values[key], self.sources[key]) for key in RunConfig.keys()]

    def describe(self) -> str:
        """The resolved config as TOML lines, each key's source in a comment (``--dry-run``).

        The output is itself a valid TOML file: ``--config`` reads it back.
        """
        rows = self.rows()
        width = max(len(f"{k} = {_toml_value(v)}") for k, v, _ in rows)
        lines = ["# medfed run config: every key, its value and where it came from"]
        lines += [f"# note: {note}" for note in self.notes]
        for key, value, source in rows:
            lines.append(f"{key} = {_toml_value(value)}".ljust(width) + f"  # {source}")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


# --------------------------------------------------------------------------- layers
def _kebab(key: object) -> str:
    return str(key).strip().replace("_", "-")


def mapping_layer(values: Mapping[str, Any], *, source: str) -> Layer:
    """A layer of a raw mapping (Flower's ``context.run_config``, a recipe, ``config.json``)."""
    return Layer(values=dict(values), source=source)


def file_layer(path: str | Path) -> Layer:
    """The run-config keys of a TOML file: its top level, or ``[tool.flwr.app.config]``.

    Raises
    ------
    ConfigError
        The file does not exist or is not valid TOML (naming the file).
    """
    data = read_toml(path, error=ConfigError, what="Config file")
    data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    return mapping_layer(data, source=f"file {path}")


def flag_layer(values: Mapping[str, Any], *, flags: Mapping[str, str]) -> Layer:
    """The keys a command's flags set (``None``: not given, left out).

    Parameters
    ----------
    values
        Kebab-case key to the flag's value.
    flags
        Kebab-case key to the flag a user types (``{"num-sites": "--sites"}``); a key without
        an entry is ``--<key>``.
    """
    given = {_kebab(k): v for k, v in values.items() if v is not None}
    labels = {k: f"flag {flags.get(k, '--' + k)}" for k in given}
    return Layer(values=given, source="flag", labels=labels)


def parse_set(items: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b = x"]`` -> ``{"a": "1", "b": "x"}`` (the one ``--set`` parser).

    Raises
    ------
    ConfigError
        An item without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is invalid: write --set key=value (e.g. --set num-sites=4).")
        out[key.strip()] = value.strip()
    return out


def set_layer(items: Sequence[str]) -> Layer:
    """The ``--set key=value`` pairs (repeatable; a later pair wins)."""
    return mapping_layer(parse_set(items), source="--set")


# --------------------------------------------------------------------------- resolving
def resolve_config(
    *layers: Layer,
    check_model: bool = True,
    enrolled_sites: int | None = None,
) -> ResolvedConfig:
    """Merge ``layers`` over the defaults (a later layer wins) and validate the result once.

    Parameters
    ----------
    *layers
        Raw sources, lowest precedence first (e.g. file, flags, ``--set``).
    check_model
        Also check that ``model`` is a registered model name (imports the model registry).
    enrolled_sites
        A deployed federation's enrolled sites: ``dataset`` must be ``"deployment"`` and
        ``num-sites`` at most this.

    Returns
    -------
    ResolvedConfig
        The run config and each key's source.

    Raises
    ------
    ConfigError
        An unknown key or a value of the wrong type (naming its layer), an invalid value
        (naming the key and its source: ``num-sites (--sites) = 0``, or with one source in
        front, ``file f.toml: num-sites = 0``), ``min-fit-clients`` above ``num-sites``, an
        unregistered model, a ``run-dir`` that is a file.
    """
    defaults = {f.name.replace("_", "-"): f.default for f in fields(RunConfig)}
    merged: dict[str, Any] = {}
    sources: dict[str, str] = dict.fromkeys(defaults, DEFAULT)
    for layer in layers:
        for raw_key, raw_value in layer.values.items():
            key = _kebab(raw_key)
            where = layer.label(key)
            if key not in defaults:
                hint = close_matches(key, RunConfig.keys())
                raise ConfigError(
                    f"Unknown key {raw_key!r} in {where}.{hint} Valid keys: {', '.join(RunConfig.keys())}."
                )
            merged[key] = coerce_value(key, raw_value, defaults[key], where)
            sources[key] = where
    notes: list[str] = []
    num_sites = merged.get("num-sites", defaults["num-sites"])
    min_fit = merged.get("min-fit-clients", defaults["min-fit-clients"])
    if isinstance(num_sites, int) and isinstance(min_fit, int) and num_sites >= 1 and min_fit > num_sites:
        if sources["min-fit-clients"] == DEFAULT:
            merged["min-fit-clients"] = num_sites
            notes.append(
                f"min-fit-clients: the default {DEFAULT_MIN_FIT_CLIENTS} is capped to num-sites = {num_sites}."
            )
        else:
            raise ConfigError(
                f"min-fit-clients ({_shown(sources['min-fit-clients'])}) = {min_fit} exceeds num-sites "
                f"({_shown(sources['num-sites'])}) = {num_sites}: no round could collect {min_fit} sites' results. "
                "Lower it "
                f"(--set min-fit-clients={num_sites}) or add sites (--set num-sites={min_fit}"
                f"{', or --sites ' + str(min_fit) + ' with medfed simulate' if enrolled_sites is None else ''})."
            )
    if enrolled_sites is not None:
        _check_deployment(merged, sources, enrolled_sites=enrolled_sites)
    given = [layer for layer in layers if layer.values]
    try:
        cfg = RunConfig(**{k.replace("-", "_"): v for k, v in merged.items()})
        if check_model:
            from medfed.shared.models import check_model_name

            check_model_name(cfg.model)
    except ConfigError as err:
        if len(given) == 1 and not given[0].labels:  # one source: say it once
            raise ConfigError(f"{given[0].source}: {err}") from None
        raise ConfigError(_name_sources(str(err), sources)) from None
    if cfg.loss == "auto":
        notes.append(
            f"loss: 'auto' trains classification sites with {cfg.loss_for('classification')!r} over their own "
            "class counts (label skew across hospitals, issue 14; see BENCHMARKS.md), segmentation with Dice + CE, "
            "DP-SGD with plain CE; set loss to 'ce' for plain cross-entropy."
        )
    if Path(cfg.run_dir).expanduser().is_file():
        raise ConfigError(
            f"run-dir ({_shown(sources['run-dir'])}) = {cfg.run_dir!r} is a file: give a folder (created if missing)."
        )
    return ResolvedConfig(config=cfg, sources=sources, notes=tuple(notes))


def _check_deployment(merged: Mapping[str, Any], sources: Mapping[str, str], *, enrolled_sites: int) -> None:
    dataset = merged.get("dataset", RunConfig.dataset)
    if dataset != "deployment":
        raise ConfigError(
            f"dataset ({_shown(sources['dataset'])}) = {dataset!r} cannot be used on a federation: sites train on "
            'their own datalists (dataset = "deployment"). Remove the dataset key.'
        )
    num_sites = merged.get("num-sites", RunConfig.num_sites)
    if num_sites > enrolled_sites:
        raise ConfigError(
            f"num-sites ({_shown(sources['num-sites'])}) = {num_sites} but only {enrolled_sites} site(s) are enrolled: "
            f"use --set num-sites={enrolled_sites} or fewer, or enroll more sites with `medfed provision --site`."
        )


def _name_sources(message: str, sources: Mapping[str, str]) -> str:
    """``num-sites = 0 ...`` -> ``num-sites (--sites) = 0 ...`` for every key not from the defaults.

    (With a single source without per-key labels, :func:`resolve_config` names it once in front
    of the message instead: ``run config: num-sites = 0 ...``.)

    A flag is shown as the user typed it (``--sites``), a file by its path, ``--set`` as is.
    """
    for key, source in sources.items():
        if source == DEFAULT:
            continue
        message = re.sub(rf"(?<![\w-]){re.escape(key)} = ", f"{key} ({_shown(source)}) = ", message, count=1)
    return message


def _shown(source: str) -> str:
    """A source as a user reads it in a message: ``--sites``, ``f.toml``, ``--set``, ``default``."""
    return source.removeprefix("flag ").removeprefix("file ")


@functools.lru_cache(maxsize=8)
def _cached(items: tuple[tuple[str, Any], ...], source: str) -> RunConfig:
    return resolve_config(mapping_layer(dict(items), source=source)).config


def config_from_run_config(run_config: Mapping[str, Any], *, source: str = "run config") -> RunConfig:
    """The run config of Flower's ``context.run_config`` (``flwr run``), through :func:`resolve_config`.

    Resolved once per distinct mapping and cached: the ClientApp asks for every message.

    Raises
    ------
    ConfigError
        As :func:`resolve_config` (``source`` named in front of the message).
    """
    items = tuple(sorted((str(k), v) for k, v in run_config.items()))
    try:
        hash(items)
    except TypeError:  # a value Flower would not send (a list): resolve without the cache
        return resolve_config(mapping_layer(dict(items), source=source)).config
    return _cached(items, source)
