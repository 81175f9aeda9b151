"""``medfed data``: turn annotations a site already has into medfed datalists.

* ``medfed data voc-to-datalist VOC_DIR --out boxes.json``: a Pascal VOC folder (``JPEGImages/``,
  ``Annotations/*.xml``, ``ImageSets/Main/{train,val,test}.txt``);
* ``medfed data kvasir-boxes-to-datalist kavsir_bboxes.json --images images/ --out boxes.json``;
* ``medfed data segmentation-datalist --layout isbi2012|kvasir|brats --root DIR --out seg.json``
  (:mod:`medfed.shared.data.layouts`).

The box converters write a box datalist (:mod:`medfed.shared.data.boxes`) whose image paths are
relative to the written file: the images stay where they are. Boxes outside an image are clipped
and boxes with no area dropped; both counts are printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["data_app", "segmentation_datalist_command"]

console = Console(stderr=True)

data_app = typer.Typer(
    help="Datalists from annotations a site has (detection boxes) and from public data sets (segmentation); "
    "the images are read in place, never copied.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _report(out: Path, datalist: dict, counts: object) -> None:
    sections = ", ".join(f"{s} {len(datalist[s])}" for s in ("training", "validation", "test") if s in datalist)
    console.print(
        f"wrote {out}: classes {datalist['classes']}; images {sections}; boxes {counts.boxes} "  # type: ignore[attr-defined]
        f"({counts.clipped} clipped to their image, {counts.dropped} without area dropped)",  # type: ignore[attr-defined]
        soft_wrap=True,
    )


@data_app.command("voc-to-datalist")
def voc_to_datalist_command(
    voc_dir: Annotated[Path, typer.Argument(help="The Pascal VOC folder (JPEGImages/, Annotations/, ImageSets/Main/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The box datalist JSON to write.")],
    classes: Annotated[
        list[str] | None,
        typer.Option("--classes", help="Class names in label order, repeated; default: the names found, sorted."),
    ] = None,
) -> None:
    """Write a box datalist from a Pascal VOC folder (train/val/test from ImageSets/Main)."""
    from medfed.shared.data.base import DataError
    from medfed.shared.data.boxes import voc_to_datalist

    try:
        datalist, counts = voc_to_datalist(voc_dir, out, classes=classes or None)
    except DataError as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from None
    _report(out, datalist, counts)


@data_app.command("kvasir-boxes-to-datalist")
def kvasir_boxes_command(
    boxes_json: Annotated[Path, typer.Argument(help="Kvasir-SEG's kavsir_bboxes.json.")],
    images: Annotated[Path, typer.Option("--images", help="The folder of <id>.jpg images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The box datalist JSON to write.")],
) -> None:
    """Write a box datalist from Kvasir-SEG's box JSON (one training section; validation and test
    are split off by the run's seed when it is loaded)."""
    from medfed.shared.data.base import DataError
    from medfed.shared.data.boxes import kvasir_boxes_to_datalist

    try:
        datalist, counts = kvasir_boxes_to_datalist(boxes_json, images, out)
    except DataError as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from None
    _report(out, datalist, counts)


@data_app.command("segmentation-datalist")
def segmentation_datalist_command(
    layout: Annotated[str, typer.Option(help="The data set's layout: isbi2012, kvasir or brats.")],
    root: Annotated[Path, typer.Option(help="The data set's folder, e.g. ../shared/data/segmentation/kvasir-seg.")],
    out: Annotated[Path, typer.Option(help="The datalist JSON to write.")],
    seed: Annotated[int, typer.Option(help="Kvasir: seed of the per-source train/validation/test split.")] = 0,
    limit: Annotated[int, typer.Option(help="Kvasir: keep about this many images (each source its share); 0: all.")] = 0,
) -> None:
    """Write a segmentation datalist (with a "site" source per entry) for ISBI 2012, Kvasir-SEG or BraTS.

    Then: medfed simulate --dataset OUT --model unet --image-size 128 --set patch-size=64 --partition source.
    See docs/segmentation.md for each layout's sources and sections.
    """
    from medfed.shared.data.base import DataError
    from medfed.shared.data.layouts import write_segmentation_datalist

    try:
        counts = write_segmentation_datalist(layout, root=root, out=out, seed=seed, limit=limit)
    except DataError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    console.print(
        f"wrote {out}: {counts['training']} training, {counts['validation']} validation, {counts['test']} test entries",
        highlight=False,
        soft_wrap=True,  # the path is one line, whatever the terminal's width
    )
