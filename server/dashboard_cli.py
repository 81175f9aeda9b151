"""``medfed dashboard``: serve the coordinator dashboard over a run store."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from medfed.shared.config import RunConfig

__all__ = ["dashboard_command"]

logger = logging.getLogger(__name__)
console = Console()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_command(
    store: Annotated[
        str | None,
        typer.Option(
            help=escape("Run store URL (default: sqlite:///<run-dir>/medfed.db, where `medfed simulate` writes). [key: store]")
        ),
    ] = None,
    run_dir: Annotated[
        str, typer.Option(help=escape("Runs folder whose medfed.db to show (when --store is not given). [key: run-dir]"))
    ] = RunConfig.run_dir,
    host: Annotated[
        str, typer.Option(help="Bind address. 127.0.0.1: this machine only; anything else exposes it on the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    token_file: Annotated[
        Path | None,
        typer.Option(help="Bearer token file (e.g. written by provisioning). Default: dashboard.token next to "
                          "the database, generated (mode 0600) on first start."),
    ] = None,
) -> None:
    """Serve the live coordinator dashboard (runs, rounds, sites, privacy, SecAgg+, events)."""
    import uvicorn

    from medfed.server.dashboard.app import create_app, default_token_path, load_or_create_token
    from medfed.server.dashboard.read_models import RunReader
    from medfed.server.store import RunStore, StoreError
    from medfed.shared.config import ConfigError
    from medfed.shared.config_sources import flag_layer, resolve_config

    try:
        flags = {"run-dir": run_dir, "store": store}
        url = resolve_config(
            flag_layer(flags, flags={"run-dir": "--run-dir", "store": "--store"}), check_model=False
        ).config.store_url
        if url is None:
            raise ConfigError("--store off: there is no store to show; give a store URL.")
        run_store = RunStore(url)
        token_path = token_file or default_token_path(url)
        token = load_or_create_token(token_path, create=token_file is None)
        app = create_app(store=run_store, token=token)
    except (StoreError, ConfigError, FileNotFoundError, ValueError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None
    if not _is_loopback(host):
        console.print(
            f"[bold yellow]warning:[/] binding {host}: the dashboard is reachable from the network, "
            "over plain HTTP. Put it behind a TLS reverse proxy, or keep the default 127.0.0.1."
        )
    shown = f"[{host}]" if ":" in host else host
    runs = len(RunReader(run_store).list_runs())
    console.print(f"medfed dashboard for {run_store.url} ({runs} run(s))")
    console.print(f"token file: {token_path}")
    console.print(f"open: [bold]http://{shown}:{port}/?token={token}[/]", soft_wrap=True)
    console.print("Ctrl+C stops it.")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", ws="none")
    finally:
        run_store.close()
