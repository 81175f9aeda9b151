"""Coordinator commands: ``medfed provision``, ``medfed server start``, ``medfed run``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medfed.server.provision import ProvisionError, load_federation, main_describe, provision
from medfed.shared.cli_options import dry_run_option, verbose_option
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.config_sources import Layer, ResolvedConfig, file_layer, resolve_config, set_layer

__all__ = ["provision_command", "server_app", "run_command", "deployment_config", "resolve_deployment_config"]

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
    logging.getLogger("medfed").setLevel(logging.INFO if verbose else logging.WARNING)


def _site_public_keys(items: list[str]) -> dict[str, Path]:
    """``--site-public-key NAME=FILE`` values -> ``{NAME: FILE}``."""
    keys: dict[str, Path] = {}
    for item in items:
        site, sep, file = item.partition("=")
        if not sep or not site.strip() or not file.strip():
            raise ProvisionError(
                f"--site-public-key {item!r} is invalid: write NAME=FILE, e.g. --site-public-key "
                "charite=charite-site-auth.pub (the site-auth.pub from `medfed site keygen`)."
            )
        if site.strip() in keys:
            raise ProvisionError(f"--site-public-key gives site {site.strip()!r} twice.")
        keys[site.strip()] = Path(file.strip())
    return keys


def provision_command(
    folder: Annotated[Path, typer.Argument(help="The federation folder (created if missing).")],
    site: Annotated[
        list[str] | None, typer.Option("--site", "-s", help="A site to enroll with a key generated here (repeatable; default: none, give --site or --site-public-key).")
    ] = None,
    site_public_key: Annotated[
        list[str] | None,
        typer.Option(
            "--site-public-key",
            help="NAME=FILE: enroll site NAME with its own public key (`medfed site keygen`); its kit then "
            "holds no private key (repeatable; default: none).",
        ),
    ] = None,
    address: Annotated[
        str, typer.Option("--address", help="HOST:PORT of the SuperLink, as the sites dial it.")
    ] = "localhost:8000",
    san: Annotated[
        list[str] | None, typer.Option("--san", help="Extra DNS name or IP for the certificate (repeatable).")
    ] = None,
    name: Annotated[str, typer.Option(help="Federation name.")] = "medfed",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace existing keys and certificates (every kit must be resent); enroll exactly the given "
            "sites. What is replaced or dropped is backed up first.",
        ),
    ] = False,
    ca_key: Annotated[
        Path | None,
        typer.Option("--ca-key", help="Where the CA private key is kept (default <folder>/ca/ca.key, with a warning)."),
    ] = None,
) -> None:
    """Create a federation folder: CA, SuperLink certificate, one startup kit per site."""
    try:
        result = provision(
            folder, sites=site or [], superlink_address=address, hosts=san or [], name=name, force=force,
            site_public_keys=_site_public_keys(site_public_key or []), ca_key=ca_key,
        )
    except ProvisionError as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    for dropped in result.dropped:
        console.print(f"[bold yellow]dropped:[/] site {dropped} (its kit is in the backup)", soft_wrap=True)
    for rekeyed in result.rekeyed:
        console.print(f"[bold yellow]re-keyed:[/] site {rekeyed} (send it its new kit)", soft_wrap=True)
    if result.dropped or result.rekeyed:
        console.print(
            "[bold yellow]note:[/] the old keys of these sites are unregistered from the SuperLink when "
            "`medfed server start` next starts; until then they can still connect."
        )
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
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
            help="Network (CIDR) allowed to submit runs and manage the federation, besides this host (repeatable; default: this host only).",
        ),
    ] = None,
    verbose: Annotated[bool, verbose_option(what="the SuperLink's and medfed's logs")] = True,
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
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)


def deployment_layer(fed_sites: int, run_dir: Path) -> Layer:
    """The defaults of a deployed run, below the TOML file and ``--set``.

    ``dataset = "deployment"``, ``num-sites`` = the enrolled sites, ``run-dir`` =
    ``<federation>/runs``, ``secagg = true`` (SecAgg+: the coordinator sees only the aggregate).
    """
    return Layer(
        values={"dataset": "deployment", "num-sites": fed_sites, "run-dir": str(run_dir), "secagg": True},
        source="deployment default",
    )


def resolve_deployment_config(
    fed_sites: int, run_dir: Path, config_file: Path | None, sets: list[str]
) -> ResolvedConfig:
    """The run config of a deployed run: defaults < deployment defaults < TOML file < ``--set``.

    Raises
    ------
    ConfigError
        An unknown key or bad value (naming it and its source), a ``dataset`` other than
        ``"deployment"``, more ``num-sites`` than enrolled sites, an unregistered model.
    """
    layers = [deployment_layer(fed_sites, run_dir)]
    if config_file is not None:
        layers.append(file_layer(config_file))
    layers.append(set_layer(sets))
    return resolve_config(*layers, enrolled_sites=fed_sites)


def deployment_config(fed_sites: int, run_dir: Path, config_file: Path | None, sets: list[str]) -> RunConfig:
    """The validated run config of :func:`resolve_deployment_config` (without the sources)."""
    return resolve_deployment_config(fed_sites, run_dir, config_file, sets).config


def run_command(
    federation: Annotated[Path, typer.Option("--federation", "-f", help="The federation folder.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML file with run-config keys (--set overrides it).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any run-config key: --set key=value (repeatable; wins over --config)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the run finishes.")] = True,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds to wait for the run (>= 1).")] = 3600.0,
    dry_run: Annotated[bool, dry_run_option(instead="without submitting anything")] = False,
    verbose: Annotated[bool, verbose_option(what="medfed's progress logs")] = False,
) -> None:
    """Sign the medfed app for this run config and submit it to the federation (`flwr run`).

    The run config is the defaults, then the deployment defaults (dataset = "deployment",
    num-sites = the enrolled sites, secagg = true), then --config, then --set.
    """
    from medfed.server.deploy import DeployError, describe_run_command, submit_run, wait_for_run
    from medfed.server.signing import AppSignatureError
    from medfed.shared.preflight import preflight

    _logging(verbose)
    try:
        fed = load_federation(federation)
        resolved = resolve_deployment_config(len(fed.sites), fed.root / "runs", config, set_ or [])
        if dry_run:
            typer.echo(resolved.describe())
            if resolved.config.init_weights or resolved.config.trainable != "all":
                from medfed.shared.task import start_plan

                typer.echo("\n".join(f"# {line}" for line in start_plan(resolved.config, None)))
            typer.echo(f"# eval-precision: {resolved.config.eval_precision}: each site resolves it on its own device "
                       "(auto: bf16 autocast where the device has native bf16, else fp32; docs/precision.md)")
            return
        cfg = resolved.config
        if cfg.init_weights:  # the ServerApp may run in another folder: send the file's absolute path
            from medfed.shared.init_weights import resolve_weights_path

            cfg = cfg.replace(init_weights=str(resolve_weights_path(cfg.init_weights)))
        preflight(cfg)  # e.g. dp = true with norm = "batch": refused here, before anything is submitted
        run_id, signed = submit_run(fed, cfg)
        typer.echo(f"run {run_id} submitted (app bundle {signed.fab_sha256[:12]}..., signed by the coordinator)")
        typer.echo("follow it with: FLWR_HOME=" + str(fed.flwr_home) + " " + " ".join(describe_run_command(fed, run_id)))
        if wait:
            status = wait_for_run(fed, run_id, timeout=timeout)
            typer.echo(f"run {run_id}: {status}; results under {cfg.run_dir}")
            if status != "finished:completed":
                raise typer.Exit(code=1)
    except (ProvisionError, DeployError, ConfigError, AppSignatureError) as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
