"""``medfed dashboard``: serve the coordinator dashboard over a run store.

The URL that carries the bearer token is printed only to a terminal; when the output goes to a
file or a pipe (a log, a service manager), the URL is printed without the token, with the path
of the token file (mode 0600) instead. A store that does not exist is refused unless
``--create-store`` asks for an empty one.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from medfed.shared.config import RunConfig

if TYPE_CHECKING:
    from medfed.server.store import RunStore

__all__ = ["dashboard_command", "access_lines", "open_store"]

logger = logging.getLogger(__name__)
console = Console()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_lines(*, base_url: str, token: str, token_path: Path, terminal: bool) -> list[str]:
    """What ``medfed dashboard`` prints to say how to open it.

    Parameters
    ----------
    base_url
        ``http://HOST:PORT``.
    token
        The bearer token.
    token_path
        The file that holds it.
    terminal
        Whether the output is a terminal (``sys.stdout.isatty()``). Only then does a line carry
        the token (``open: BASE/?token=...``); otherwise the URL is printed without it, with
        where the token is, so a log file or a service manager's journal never holds it.
    """
    if terminal:
        return [f"open: {base_url}/?token={token}"]
    return [
        f"open: {base_url}/",
        f"  the token is not printed (the output is not a terminal): it is in {token_path} (mode 0600). "
        f"Open {base_url}/?token=<that token> on this machine, or send 'Authorization: Bearer <that token>'.",
    ]


def open_store(url: str, *, create: bool) -> RunStore:
    """The run store at ``url``; a missing SQLite file is refused unless ``create``.

    Raises
    ------
    StoreError
        If the store does not exist and ``create`` is false (the message names the path and
        ``--create-store``), or it cannot be opened.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from medfed.server.store import RunStore, StoreError

    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None  # RunStore names an invalid URL
    if parsed is not None and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not path.exists() and not create:
            raise StoreError(
                f"no run store at {path} (from --store / --run-dir): give the store your runs wrote "
                "(--run-dir DIR, or --store sqlite:///PATH/medfed.db), or pass --create-store to start "
                "an empty one there."
            )
    return RunStore(url, create=create)


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
    create_store: Annotated[
        bool,
        typer.Option("--create-store", help="Create the store if it does not exist (default: refuse a missing store)."),
    ] = False,
) -> None:
    """Serve the live coordinator dashboard (runs, rounds, sites, privacy, SecAgg+, events)."""
    import uvicorn

    from medfed.server.dashboard.app import create_app, default_token_path, load_or_create_token
    from medfed.server.dashboard.read_models import RunReader
    from medfed.server.store import StoreError
    from medfed.shared.config import ConfigError
    from medfed.shared.config_sources import flag_layer, resolve_config

    try:
        flags = {"run-dir": run_dir, "store": store}
        url = resolve_config(
            flag_layer(flags, flags={"run-dir": "--run-dir", "store": "--store"}), check_model=False
        ).config.store_url
        if url is None:
            raise ConfigError("--store off: there is no store to show; give a store URL.")
        run_store = open_store(url, create=create_store)
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
    for line in access_lines(base_url=f"http://{shown}:{port}", token=token, token_path=token_path,
                             terminal=sys.stdout.isatty()):
        console.print(escape(line), soft_wrap=True)
    console.print("Ctrl+C stops it.")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", ws="none")
    finally:
        run_store.close()
