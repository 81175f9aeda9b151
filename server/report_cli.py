"""``medfed report`` and ``medfed export-run``: what a coordinator does with a run after training.

* ``report``: the run's model card (:mod:`medfed.server.report`), HTML and optionally PDF;
* ``export-run``: the run's rounds, sites, params and artifacts into MLflow and/or TensorBoard
  (:mod:`medfed.server.tracking`).

This module stays light (Typer only): the heavy modules are imported when a command runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["export_run_command", "report_command"]

console = Console(stderr=True)


def report_command(
    run: Annotated[Path, typer.Argument(help="The run directory (runs/<UTC time>-<strategy>-s<seed>).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="The HTML file to write (default: RUN/report.html).")
    ] = None,
    intended_use: Annotated[
        str | None,
        typer.Option("--intended-use", help="The model's intended use (default: the run config's intended-use)."),
    ] = None,
    explanations: Annotated[
        Path | None,
        typer.Option(help="A folder `medfed explain --out` wrote that a site shared (default: RUN/explanations)."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="The run's dataset for the class mix and calibration (default: where its config says)."),
    ] = None,
    pdf: Annotated[bool, typer.Option("--pdf", help="Also print a PDF beside the HTML (Chromium or WeasyPrint).")] = False,
    calibration: Annotated[
        bool, typer.Option("--calibration/--no-calibration", help="Compute the final model's calibration.")
    ] = True,
) -> None:
    """Write a run's model card: one self-contained HTML page (and a PDF with --pdf)."""
    from medfed.server.model_card import ReportError
    from medfed.server.report import NoPdfPrinterError, write_pdf, write_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        target = write_report(run, out=out, intended_use=intended_use, explanations=explanations, dataset=dataset,
                              calibrate=calibration)
    except ReportError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"model card: {target}")
    if pdf:
        pdf_file = target.with_suffix(".pdf")
        try:
            printer = write_pdf(target, pdf_file)
        except NoPdfPrinterError as err:
            console.print(f"[bold yellow]no PDF:[/] {err}", highlight=False, soft_wrap=True)
            return
        except ReportError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        typer.echo(f"PDF ({printer}): {pdf_file}")


def export_run_command(
    run: Annotated[Path, typer.Argument(help="The run directory (runs/<UTC time>-<strategy>-s<seed>).")],
    mlflow: Annotated[
        str | None,
        typer.Option("--mlflow", help="MLflow tracking URI, or a local folder (e.g. ./mlruns, works offline). Default: no MLflow export."),
    ] = None,
    tensorboard: Annotated[
        Path | None, typer.Option("--tensorboard", help="TensorBoard log folder (the run goes in FOLDER/<run id>). Default: no TensorBoard export.")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "medfed",
    checkpoints: Annotated[
        bool, typer.Option("--checkpoints", help="Also copy checkpoints/*.pt as MLflow artifacts (can be large).")
    ] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace an MLflow run already exported from this run.")
    ] = False,
) -> None:
    """Export a run's metrics per round and per site, params and artifacts to MLflow and/or TensorBoard."""
    from medfed.server.tracking import TrackingError, export_run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = export_run(run, mlflow=mlflow, tensorboard=tensorboard, experiment=experiment,
                            checkpoints=checkpoints, replace=replace)
    except TrackingError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    what = f"{result.rounds} rounds, {result.scalars} scalars, {result.params} params, {len(result.artifacts)} artifacts"
    if result.mlflow_run_id:
        typer.echo(f"MLflow: run {result.mlflow_run_id} in {result.mlflow_uri} ({what})")
    if result.tensorboard_dir:
        typer.echo(f"TensorBoard: {result.tensorboard_dir} ({what}); view with: tensorboard --logdir {result.tensorboard_dir.parent}")
