"""Coordinator commands: ``medfed provision``, ``medfed server start``, ``medfed run``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medfed.server.provision import ProvisionError, load_federation, main_describe, provision
from medfed.shared.config import ConfigError, RunConfig

__all__ = ["provision_command", "server_app", "run_command", "deployment_config"]

console = Console(stderr=True)
logger = logging.getLogger(__name__)

server_app = typer.Typer(
    help="The coordinator's SuperLink.", no_args_is_help=True, pretty_exceptions_show_locals=False
)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s medfed %(levelname)s: %(message)s",
        force=True,
    )
    for name in ("server", "client", "shared"):
        logging.getLogger(name).setLevel(logging.INFO)


def provision_command(
    folder: Annotated[Path, typer.Argument(help="The federation folder (created if missing).")],
    site: Annotated[list[str], typer.Option("--site", "-s", help="A site to enroll (repeatable).")],
    address: Annotated[
        str, typer.Option("--address", help="HOST:PORT of the SuperLink, as the sites dial it.")
    ] = "localhost:8000",
    san: Annotated[
        list[str] | None, typer.Option("--san", help="Extra DNS name or IP for the certificate (repeatable).")
    ] = None,
    name: Annotated[str, typer.Option(help="Federation name.")] = "medfed",
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing keys and certificates (every kit must be resent).")
    ] = False,
) -> None:
    """Create a federation folder: CA, SuperLink certificate, one startup kit per site."""
    try:
        result = provision(folder, sites=site, superlink_address=address, hosts=san or [], name=name, force=force)
    except ProvisionError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None
    typer.echo(main_describe(result))


@server_app.command("start")
def server_start(
    federation: Annotated[Path, typer.Option("--federation", "-f", help="The federation folder.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default: the federation address's).")
    ] = None,
    database: Annotated[
        Path | None, typer.Option(help="State database (default <federation>/superlink/state.db).")
    ] = None,
    control_allow: Annotated[
        list[str] | None,
        typer.Option(
            "--control-allow",
            help="Network (CIDR) allowed to submit runs and manage the federation, besides this host (repeatable).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = True,
) -> None:
    """Start the SuperLink (TLS, SuperNode authentication, persistent state) and enroll the sites' keys.

    The Control and Runtime APIs answer only this host (and --control-allow networks); the sites
    reach only the Fleet API, authenticated with their keys.
    """
    from medfed.server.deploy import DeployError, run_superlink

    _logging(verbose)
    try:
        fed = load_federation(federation)
        code = run_superlink(fed, database=database, host=host, port=port, control_allow=control_allow or [])
    except (ProvisionError, DeployError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)


def deployment_config(fed_sites: int, run_dir: Path, config_file: Path | None, sets: list[str]) -> RunConfig:
    """The run config of a deployed run: defaults, then the TOML file, then ``--set`` pairs.

    ``dataset`` is always ``"deployment"``; ``num-sites`` defaults to the enrolled sites,
    ``run-dir`` to ``<federation>/runs`` and ``secagg`` to true (SecAgg+).
    """
    # SecAgg+ is on by default in deployment (the coordinator sees only the aggregate); "secagg = false" turns it off.
    merged: dict[str, Any] = {"dataset": "deployment", "num-sites": fed_sites, "run-dir": str(run_dir), "secagg": True}
    if config_file is not None:
        merged.update(_toml_keys(config_file))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is invalid: write --set key=value.")
        merged[key.strip()] = value.strip()
    if str(merged.get("dataset")) != "deployment":
        raise ConfigError(
            f"dataset = {merged.get('dataset')!r} cannot be used on a federation: sites train on "
            'their own datalists (dataset = "deployment"). Remove the dataset key.'
        )
    cfg = RunConfig.from_mapping(merged, source=str(config_file) if config_file else "command line")
    if cfg.num_sites > fed_sites:
        raise ConfigError(f"num-sites = {cfg.num_sites} but only {fed_sites} site(s) are enrolled.")
    from medfed.shared.models import check_model_name

    check_model_name(cfg.model)
    return cfg


def _toml_keys(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid TOML: {err}") from None
    return dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data))


def run_command(
    federation: Annotated[Path, typer.Option("--federation", "-f", help="The federation folder.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with run-config keys.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any run-config key: --set key=value.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the run finishes.")] = True,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds to wait for the run (>= 1).")] = 3600.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Sign the medfed app for this run config and submit it to the federation (`flwr run`)."""
    from medfed.server.deploy import DeployError, describe_run_command, submit_run, wait_for_run
    from medfed.server.signing import AppSignatureError

    _logging(verbose)
    try:
        fed = load_federation(federation)
        cfg = deployment_config(len(fed.sites), fed.root / "runs", config, set_ or [])
        run_id, signed = submit_run(fed, cfg)
        typer.echo(f"run {run_id} submitted (app bundle {signed.fab_sha256[:12]}..., signed by the coordinator)")
        typer.echo("follow it with: FLWR_HOME=" + str(fed.flwr_home) + " " + " ".join(describe_run_command(fed, run_id)))
        if wait:
            status = wait_for_run(fed, run_id, timeout=timeout)
            typer.echo(f"run {run_id}: {status}; results under {cfg.run_dir}")
            if status != "finished:completed":
                raise typer.Exit(code=1)
    except (ProvisionError, DeployError, ConfigError, AppSignatureError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None
