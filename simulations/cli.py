"""``medfed simulate``, ``medfed models`` and ``medfed bench``: the researcher's commands.

The ``medfed`` command itself is composed in :mod:`medfed.cli`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from medfed.shared.cli_options import HintedChoice, config_option, dry_run_option, given_values, verbose_option
from medfed.shared.config import NORMS, PARTITIONS, STRATEGIES, ConfigError, RunConfig
from medfed.shared.config_sources import ResolvedConfig, file_layer, flag_layer, resolve_config, set_layer
from medfed.shared.data.base import DataError

app = typer.Typer(
    name="medfed-simulations",
    help="The researcher's commands (composed into `medfed` by medfed.cli).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold pixel data: never print them
)
console = Console()

__all__ = ["app", "build_config", "resolve_simulate_config", "SIMULATE_FLAGS", "simulate", "models", "bench"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    flwr_logger = logging.getLogger("flwr")
    for flt in [f for f in flwr_logger.filters if isinstance(f, _QuietFilter)]:
        flwr_logger.removeFilter(flt)
    if not verbose:
        # Flower resets its handler levels inside run_simulation; a filter on its logger survives.
        flwr_logger.addFilter(_QuietFilter())


class _QuietFilter(logging.Filter):
    """Drop Flower's records below WARNING (the progress view says what matters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "`run_simulation` function is deprecated" in record.getMessage():
            return False  # medfed drives the simulation engine from Python on purpose
        return record.levelno >= logging.WARNING


SIMULATE_FLAGS: dict[str, str] = {
    "dataset": "--dataset", "num-sites": "--sites", "partition": "--partition", "dirichlet-alpha": "--alpha",
    "num-server-rounds": "--rounds", "local-epochs": "--local-epochs", "model": "--model", "norm": "--norm",
    "strategy": "--strategy", "learning-rate": "--lr", "batch-size": "--batch-size", "image-size": "--image-size",
    "seed": "--seed", "run-dir": "--run-dir",
}  # fmt: skip
"""Run-config key -> the ``medfed simulate`` flag that sets it (the option declarations below use it)."""


def _model_names() -> list[str]:
    from medfed.shared.models import MODELS  # imports torch: only when the choices are needed

    return list(MODELS)


def resolve_simulate_config(config_file: Path | None, overrides: dict[str, Any], sets: list[str]) -> ResolvedConfig:
    """The run config of ``medfed simulate``: defaults < TOML file < flags < ``--set``, validated once.

    Parameters
    ----------
    config_file
        ``--config`` (``None``: not given).
    overrides
        Run-config key -> flag value (``None``: flag not given); keys of :data:`SIMULATE_FLAGS`.
    sets
        The ``--set key=value`` items.

    Raises
    ------
    ConfigError
        A malformed ``--set``, an unknown key, a bad value (naming the key and its source),
        ``min-fit-clients`` above ``num-sites``, or an unregistered ``model``.
    """
    layers = [file_layer(config_file)] if config_file is not None else []
    layers += [flag_layer(overrides, flags=SIMULATE_FLAGS), set_layer(sets)]
    return resolve_config(*layers)


def build_config(config_file: Path | None, overrides: dict[str, Any], sets: list[str]) -> RunConfig:
    """The validated run config of :func:`resolve_simulate_config` (without the sources)."""
    return resolve_simulate_config(config_file, overrides, sets).config


def _flag(key: str, help: str, *, choices: Any = None, metavar: str | None = None) -> Any:
    return config_option(key, help, SIMULATE_FLAGS[key], choices=choices, metavar=metavar)


@app.command()
def simulate(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML file with run-config keys (flags and --set override it).")
    ] = None,
    dataset: Annotated[
        str, _flag("dataset", "'synthetic', a MedMNIST .npz file or a datalist .json.")
    ] = RunConfig.dataset,
    sites: Annotated[int, _flag("num-sites", "Number of simulated hospitals.")] = RunConfig.num_sites,
    partition: Annotated[
        str, _flag("partition", "How the dataset is split into sites.", choices=PARTITIONS)
    ] = RunConfig.partition,
    alpha: Annotated[
        float, _flag("dirichlet-alpha", "Dirichlet concentration (smaller = more skew).")
    ] = RunConfig.dirichlet_alpha,
    rounds: Annotated[int, _flag("num-server-rounds", "Federated rounds.")] = RunConfig.num_server_rounds,
    local_epochs: Annotated[int, _flag("local-epochs", "Local epochs per round.")] = RunConfig.local_epochs,
    model: Annotated[
        str, _flag(
            "model", "Model registry name: simplecnn, densenet121, resnet18, resnet34, vit (classification); unet, "
            "unetr, swinunetr (segmentation); retinanet (detection). `medfed models` describes them.",
            choices=_model_names, metavar="NAME",
        )
    ] = RunConfig.model,
    norm: Annotated[
        str, _flag("norm", "Normalisation layers (group or instance for --set dp=true).", choices=NORMS)
    ] = RunConfig.norm,
    strategy: Annotated[
        str, _flag("strategy", f"Aggregation strategy: {', '.join(STRATEGIES)}.", choices=STRATEGIES, metavar="NAME")
    ] = RunConfig.strategy,
    lr: Annotated[
        float, _flag("learning-rate", "Local learning rate (cosine-decayed over rounds).")
    ] = RunConfig.learning_rate,
    batch_size: Annotated[int, _flag("batch-size", "Local batch size.")] = RunConfig.batch_size,
    image_size: Annotated[int, _flag("image-size", "Resize images to this side (0 = keep).")] = RunConfig.image_size,
    seed: Annotated[int, _flag("seed", "The one seed; every random choice derives from it.")] = RunConfig.seed,
    run_dir: Annotated[str, _flag("run-dir", "Folder for run directories.")] = RunConfig.run_dir,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any run-config key: --set key=value (repeatable; wins over flags and --config)."),
    ] = None,
    centralized: Annotated[
        bool, typer.Option("--centralized", help="Train the same model on the pooled data instead.")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help=escape(
                "Continue this run directory after its last completed round, with its own config "
                "(same directory, same run-store run). Takes no other config option. [key: resume]"
            ),
        ),
    ] = None,
    cross_site_only: Annotated[
        Path | None,
        typer.Option(
            "--cross-site-only",
            metavar="CHECKPOINT",
            help=escape(
                "Train nothing: every simulated site of this checkpoint's run scores it on its local "
                "test split (per subgroup too), written to the run directory's cross_site[_<name>].json "
                "and the run store. Takes no other config option. Default: off (train a run)."
            ),
        ),
    ] = None,
    dry_run: Annotated[bool, dry_run_option(instead="without training")] = False,
    verbose: Annotated[bool, verbose_option(what="Flower's and medfed's logs")] = False,
) -> None:
    """Simulate several hospitals training one model (or the pooled baseline with --centralized).

    The run config is the defaults, then --config, then the flags, then --set (a later one
    wins); --dry-run prints it with each key's source.
    """
    _setup_logging(verbose)
    overrides = given_values(ctx, flags=SIMULATE_FLAGS)  # key -> value typed, None if not given
    try:
        if cross_site_only is not None:
            given = [SIMULATE_FLAGS[k] for k, v in overrides.items() if v is not None]
            given += ["--config"] * (config is not None) + ["--set"] * bool(set_) + ["--centralized"] * centralized
            given += ["--resume"] * (resume is not None) + ["--dry-run"] * dry_run
            if given:
                raise ConfigError(
                    f"--cross-site-only evaluates the checkpoint with its run's own config; leave out the "
                    f"other options (given: {', '.join(given)})."
                )
            _cross_site_only(cross_site_only)
            return
        if resume is not None:
            given = [SIMULATE_FLAGS[k] for k, v in overrides.items() if v is not None]
            given += ["--config"] * (config is not None) + ["--set"] * bool(set_) + ["--centralized"] * centralized
            if given:
                raise ConfigError(
                    f"--resume continues the run with its own config ({resume / 'config.json'}); "
                    f"leave out the other options (given: {', '.join(given)})."
                )
            from medfed.server.resume import resolve_run_config

            resolved = resolve_run_config(resume)
        else:
            resolved = resolve_simulate_config(config, overrides, set_ or [])
        cfg = resolved.config
        if dry_run:
            typer.echo(resolved.describe())
            if cfg.init_weights or cfg.trainable != "all":
                typer.echo("\n".join(f"# {line}" for line in _start_plan(cfg)))
            typer.echo(f"# {_precision_line(cfg)}")
            if not centralized:
                typer.echo(f"# {_backend_line(cfg)}")
            return
        _run_and_report(cfg, centralized=centralized, verbose=verbose)
    except (ConfigError, DataError, ValueError) as err:
        console.print(f"[bold red]error:[/] {escape(_name_flag(str(err), overrides))}")
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:  # before the run started (or after it ended): nothing to mark
        _stop(130, "interrupted before the run started: nothing was written")
    except Exception as err:  # noqa: BLE001 - every failure ends in one line and a non-zero exit
        from medfed.server.failures import RunFailedError
        from medfed.simulations.interrupt import RunInterrupted

        if isinstance(err, RunInterrupted):
            _stop(err.exit_code, str(err))
        if not isinstance(err, RunFailedError):
            if verbose:
                logging.getLogger(__name__).error("the run failed", exc_info=err)
            err = RunFailedError(
                f"the run failed: {type(err).__name__}: {err}" + ("" if verbose else " (-v shows the traceback)")
            )
        elif verbose and err.__cause__ is not None:
            logging.getLogger(__name__).error("the run failed", exc_info=err.__cause__)
        console.print(f"[bold red]error:[/] {escape(str(err))}")
        raise typer.Exit(code=1) from None


def _precision_line(cfg: RunConfig) -> str:
    """``--dry-run``'s line saying which precision the evaluation passes use on this machine."""
    from medfed.shared.models import model_task
    from medfed.shared.precision import describe_eval_precision
    from medfed.shared.training import select_device

    return describe_eval_precision(cfg.eval_precision, device=select_device("auto"), task=model_task(cfg.model))


def _backend_line(cfg: RunConfig) -> str:
    """``--dry-run``'s line saying where the simulated sites run on this machine (``sim-backend``)."""
    from medfed.simulations.in_process import SITES_RUN, choose_backend

    backend, why = choose_backend(cfg.sim_backend)
    return f"sim-backend: {cfg.sim_backend} -> sites run {SITES_RUN[backend]} ({why})"


def _start_plan(cfg: RunConfig) -> list[str]:
    """``--dry-run``'s model lines: what ``init-weights`` loads and what ``trainable`` trains."""
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.seeding import seed_everything
    from medfed.shared.task import start_plan

    seed_everything(cfg.seed)
    return start_plan(cfg, None if cfg.is_deployment else load_dataset(cfg).train)


def _cross_site_only(checkpoint: Path) -> None:
    """``--cross-site-only``: the sites' evaluation of ``checkpoint``, printed as a table."""
    from medfed.simulations.cross_site import cross_site_of_checkpoint

    path, report = cross_site_of_checkpoint(checkpoint)
    table = Table(title=f"cross-site evaluation: {report['checkpoint']} model (round {report['round']})")
    for column in ("site", "subgroup", "n", "metrics"):
        table.add_column(column)

    def figures(metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())

    for site in report["sites"]:
        table.add_row(site["site"], "all", str(site["n"]), figures(site["metrics"]))
        for group in site["subgroups"]:
            table.add_row("", f"{group['key']} = {group['value']}", str(group["n"]), figures(group["metrics"]))
    console.print(table)
    for gap in report["gaps"]:
        console.print(
            f"gap {gap['key']} {gap['metric']}: {gap['best_value']} {gap['best']:.3f} - "
            f"{gap['worst_value']} {gap['worst']:.3f} = {gap['gap']:.3f}", markup=False,
        )
    suppressed = sum(s["suppressed"] for s in report["sites"])
    console.print(f"{suppressed} subgroup(s) below cross-site-min-count = {report['min_count']} not reported; "
                  f"report: {path}", markup=False)


def _stop(code: int, line: str) -> NoReturn:
    """Print ``line`` and exit with ``code`` now.

    A federated run stopped by a signal can leave threads of Flower's simulation engine waiting
    for sites that are gone (its processes are ended already); the interpreter would wait for
    them at exit, so the process leaves without waiting when any such thread is alive.
    """
    import os
    import sys
    import threading

    console.print(line, markup=False, highlight=False, soft_wrap=True)
    waiting = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if waiting:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code=code)


_FLAGS = {key: flag for key, flag in SIMULATE_FLAGS.items() if flag != f"--{key}"}
"""Run-config keys whose ``medfed simulate`` flag has another name (the others: ``--<key>``)."""


def _name_flag(message: str, overrides: dict[str, Any]) -> str:
    """Add the flag to an error about a key that came from one: ``num-sites (--sites) = 0 ...``."""
    for key, value in overrides.items():
        if value is not None and f"{key} = " in message:
            return message.replace(f"{key} = ", f"{key} ({_FLAGS.get(key, '--' + key)}) = ", 1)
    return message


def _run_and_report(cfg: RunConfig, *, centralized: bool, verbose: bool) -> None:
    from medfed.shared.preflight import preflight

    preflight(cfg, federated=not centralized)  # a run that cannot work stops here, before Flower and Ray load
    from medfed.simulations.pooled import run_pooled
    from medfed.simulations.progress import RunProgress, summary_lines
    from medfed.simulations.simulate import run_federated

    dataset = "synthetic (generated demo data)" if cfg.is_synthetic else Path(cfg.dataset).name
    if centralized:
        title = f"pooled baseline: {cfg.model} on {dataset}"
    else:
        title = (
            f"federated: {cfg.strategy}, {cfg.num_sites} sites ({cfg.partition}), "
            f"{cfg.model} on {dataset}"
        )
        if cfg.resume:
            title += f", resuming {Path(cfg.resume).name}"
    if not centralized and not cfg.resume:
        _print_site_classes(cfg)
    view = RunProgress(title=title, rounds=cfg.num_server_rounds, console=console)
    with view:
        if centralized:
            result = run_pooled(cfg, hooks=view.hooks())
        else:
            result = run_federated(cfg, hooks=view.hooks(), verbose=verbose)
    if not view.live:  # a log file or a pipe: plain lines, each on its own
        _print_plain_summary(cfg, result)
        return
    summary = Table(title="summary", show_header=False)
    for label, text in summary_lines(result.summary):
        summary.add_row(label, f"[bold red]{escape(text)}[/]" if label == "warning" else escape(text))
    summary.add_row("wall time", f"{result.wall_seconds:.1f} s")
    summary.add_row("run directory", str(result.run_dir))
    if cfg.store_url:  # the run store: `medfed dashboard` shows it
        default = cfg.store_url == RunConfig().store_url
        summary.add_row("dashboard", "medfed dashboard" + ("" if default else f" --store {cfg.store_url}"))
    console.print(summary)


def _print_site_classes(cfg: RunConfig) -> None:
    """Each simulated site's class counts in its training, validation and local test splits, and the
    optimizer steps an average site takes a round (:func:`medfed.shared.local_schedule.schedule_line`)."""
    from medfed.client.site_data import simulated_class_counts
    from medfed.shared.local_schedule import schedule_line
    from medfed.simulations.progress import site_class_lines

    if cfg.is_deployment:
        return
    lines = [
        "sites' class counts (0/1/...; segmentation: images without/with foreground; detection: images by "
        "most frequent box class), train / val / local test:"
    ]
    counts = simulated_class_counts(cfg)
    lines += [f"  {line}" for line in site_class_lines(counts)]
    train = sum(sum(c["train"]) for _, c in counts)
    lines.append(schedule_line(train_samples=train, num_sites=cfg.num_sites, batch_size=cfg.batch_size,
                               rounds=cfg.num_server_rounds, local_epochs=cfg.local_epochs))
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()


def _print_plain_summary(cfg: RunConfig, result: Any) -> None:
    """The summary as ``key: value`` lines (for logs and pipes)."""
    from medfed.simulations.progress import summary_lines

    lines = ["summary"]
    lines += [f"  {label}: {text}" for label, text in summary_lines(result.summary)]
    lines.append(f"  wall time: {result.wall_seconds:.1f} s")
    lines.append(f"  run directory: {result.run_dir}")
    if cfg.store_url:
        default = cfg.store_url == RunConfig().store_url
        lines.append("  dashboard: medfed dashboard" + ("" if default else f" --store {cfg.store_url}"))
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()


@app.command()
def models() -> None:
    """List the registered models."""
    from medfed.shared.models import MODELS

    table = Table(title="models")
    table.add_column("name")
    table.add_column("task")
    table.add_column("description")
    table.add_column("notes")
    for name, spec in MODELS.items():
        table.add_row(name, spec.task, spec.description, spec.notes)
    console.print(table)


def _bench_profiles() -> list[str]:
    from medfed.simulations.bench import PROFILES

    return list(PROFILES)


def _bench_sections() -> list[str]:
    from medfed.simulations.bench import SECTIONS

    return list(SECTIONS)


@app.command()
def bench(
    profile: Annotated[
        str,
        typer.Option(
            help="quick (CI smoke, minutes) or full (the BENCHMARKS.md figures, about an hour).",
            click_type=HintedChoice(_bench_profiles),
        ),
    ] = "quick",
    out: Annotated[Path, typer.Option(help="Markdown file whose bench regions are (re)written.")] = Path("BENCHMARKS.md"),
    plots: Annotated[Path, typer.Option(help="Folder for the PNG plots.")] = Path("docs/bench"),
    data_dir: Annotated[
        Path | None, typer.Option(help="MedMNIST folder (default $MEDFED_DATA_DIR or ../shared/data/medmnist).")
    ] = None,
    section: Annotated[
        list[str] | None,
        typer.Option(
            "--section", help="Run only this section (repeatable); default all.", click_type=HintedChoice(_bench_sections)
        ),
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep run directories here (default: a temporary folder).")] = None,
) -> None:
    """Benchmark suite: quality, privacy cost, overhead and peers, measured side by side into BENCHMARKS.md."""
    import sys

    from medfed.simulations.bench import bench_command, default_data_dir
    code = bench_command(
        profile=profile, out=out, plots=plots, data_dir=data_dir or default_data_dir(), sections=section,
        workdir=workdir, argv=["medfed", *sys.argv[1:]],
    )
    console.print(f"wrote {out} and the plots in {plots}" + ("" if code == 0 else " (with incomplete cells, see above)"))
    raise typer.Exit(code=code)
