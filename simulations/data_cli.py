"""``medfed data``: datalists for public data sets, read in place (:mod:`medfed.shared.data.layouts`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medfed.shared.data.base import DataError
from medfed.shared.data.layouts import LAYOUTS, write_segmentation_datalist

__all__ = ["data_app", "segmentation_datalist_command"]

console = Console()
data_app = typer.Typer(
    name="data",
    help="Datalists for public data sets (their files are read in place, never copied).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@data_app.command("segmentation-datalist")
def segmentation_datalist_command(
    layout: Annotated[str, typer.Option(help=f"The data set's layout: {', '.join(LAYOUTS)}.")],
    root: Annotated[Path, typer.Option(help="The data set's folder, e.g. ../shared/data/segmentation/kvasir-seg.")],
    out: Annotated[Path, typer.Option(help="The datalist JSON to write.")],
    seed: Annotated[int, typer.Option(help="Kvasir: seed of the per-source train/validation/test split.")] = 0,
    limit: Annotated[int, typer.Option(help="Kvasir: keep about this many images (each source its share); 0: all.")] = 0,
) -> None:
    """Write a segmentation datalist (with a "site" source per entry) for ISBI 2012, Kvasir-SEG or BraTS.

    Then: medfed simulate --dataset OUT --model unet --image-size 128 --set patch-size=64 --partition source.
    See docs/segmentation.md for each layout's sources and sections.
    """
    try:
        counts = write_segmentation_datalist(layout, root=root, out=out, seed=seed, limit=limit)
    except DataError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(code=2) from None
    console.print(
        f"wrote {out}: {counts['training']} training, {counts['validation']} validation, {counts['test']} test entries",
        highlight=False,
    )
