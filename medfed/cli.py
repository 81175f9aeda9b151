"""The ``medfed`` command: one Typer app composed from each side's commands.

* researcher: ``simulate``, ``models``, ``bench`` (:mod:`medfed.simulations.cli`);
* coordinator: ``provision``, ``run``, ``server``, ``dashboard``, ``report``, ``export-run``, ``pretrain``
  (:mod:`medfed.server.cli`, :mod:`medfed.server.dashboard_cli`, :mod:`medfed.server.report_cli`,
  :mod:`medfed.server.pretrain_cli`);
* hospital site: ``site`` (:mod:`medfed.client.cli`), ``predict``, ``export``
  (:mod:`medfed.client.predict_cli`), ``explain`` (:mod:`medfed.client.explain_cli`), ``data``
  (:mod:`medfed.client.data_cli`).

This module is the composition root: the only place that imports all of them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from medfed import __version__
from medfed.client.cli import site_app
from medfed.client.data_cli import data_app
from medfed.client.explain_cli import explain_command
from medfed.client.predict_cli import export_command, predict_command
from medfed.server.cli import provision_command, run_command, server_app
from medfed.server.dashboard_cli import dashboard_command
from medfed.server.pretrain_cli import pretrain_command
from medfed.server.report_cli import export_run_command, report_command
from medfed.simulations.cli import bench, models, simulate

__all__ = ["app", "main"]

app = typer.Typer(
    name="medfed",
    help="Federated learning for medical imaging (Flower + MONAI + Opacus).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold pixel data: never print them
)


def _print_version(value: bool) -> None:
    if value:
        import flwr
        import monai
        import opacus
        import torch

        typer.echo(
            f"medfed {__version__} (flwr {flwr.__version__}, torch {torch.__version__}, "
            f"monai {monai.__version__}, opacus {opacus.__version__})"
        )
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print medfed's version and exit."),
    ] = False,
) -> None:
    """Federated learning for medical imaging (Flower + MONAI + Opacus)."""


app.command("simulate")(simulate)
app.command("models")(models)
app.command("bench")(bench)
app.command("provision")(provision_command)
app.command("run")(run_command)
app.command("dashboard")(dashboard_command)
app.command("explain")(explain_command)
app.command("predict")(predict_command)
app.command("export")(export_command)
app.command("report")(report_command)
app.command("export-run")(export_run_command)
app.command("pretrain")(pretrain_command)
app.add_typer(server_app, name="server")
app.add_typer(site_app, name="site")
app.add_typer(data_app, name="data")


def main() -> None:
    """Console entry point (``medfed``)."""
    app()


if __name__ == "__main__":
    main()
