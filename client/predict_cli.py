"""The trained model at the hospital: ``medfed predict`` and ``medfed export``.

Both read a run's checkpoint (:func:`medfed.shared.inference.load_checkpoint`). ``predict`` writes one
row per image (and segmentation masks) with training's own preprocessing; ``export`` writes a
TorchScript model or a MONAI bundle (:mod:`medfed.shared.export`). See docs/after-training.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medfed.shared.cli_options import HintedChoice

__all__ = ["export_command", "predict_command"]

console = Console(stderr=True)



def _export_formats() -> tuple[str, ...]:
    """:data:`medfed.shared.export.EXPORT_FORMATS`, imported when first needed (it imports torch)."""
    from medfed.shared.export import EXPORT_FORMATS

    return EXPORT_FORMATS


ModelOption = Annotated[
    Path,
    typer.Option(
        "--model", "-m",
        help="The checkpoint: a run's checkpoints/best.pt or final.pt, or the run directory (its best.pt, else final.pt).",
    ),
]


def predict_command(
    model: ModelOption,
    input_path: Annotated[
        Path,
        typer.Option(
            "--input", "-i",
            help="What to predict: a datalist .json (every entry's image), an image file (NIfTI, DICOM, PNG/JPEG), "
            "a DICOM series folder, or a folder of images (each subfolder of DICOM files one series).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for predictions.csv, predictions.json and masks/.")],
    sliding_window: Annotated[
        bool,
        typer.Option(
            "--sliding-window/--resize",
            help="Segmentation: windows of the training size over the image at its own resolution, instead of "
            "the image resized to the training size (as trained).",
            show_default=True,
        ),
    ] = False,
    device: Annotated[
        str, typer.Option(help="Where the model runs: auto (a GPU if there is one), cpu, cuda.", show_default=True)
    ] = "auto",
    explain: Annotated[
        str | None,
        typer.Option(
            "--explain",
            help="Classification: also write a heat map per image (gradcam, gradcampp or occlusion) as PNG "
            "overlays (3D: the middle slice and a NIfTI map) into OUT/explanations, named by row index "
            "(medfed explain, docs/explain.md). Nothing leaves the site. Default: no heat maps.",
            click_type=HintedChoice(_explain_methods),
        ),
    ] = None,
) -> None:
    """Predict images with a trained model: one CSV/JSON row per image (class probabilities, the label at the
    validation-chosen threshold) and, for segmentation, NIfTI masks on the input's grid and affine;
    ``--explain`` adds heat maps for a classifier."""
    from medfed.shared.data.base import DataError
    from medfed.shared.inference import CheckpointError, load_checkpoint
    from medfed.shared.predictions import find_inputs, predict_with

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s medfed %(levelname)s: %(message)s")
    try:
        loaded = load_checkpoint(model, device=device)
        inputs = find_inputs(input_path)
        if explain is not None and loaded.task != "classification":
            raise ValueError(
                f"--explain is for classifiers; this is a {loaded.task} model, whose masks already are maps. "
                "Leave out --explain."
            )
        images: list | None = [] if explain is not None else None
        with _progress(len(inputs)) as advance:
            run = predict_with(
                loaded, inputs, out, sliding_window=sliding_window, on_image=advance, keep_images=images
            )
        if explain is not None:
            explained = _explain(loaded, inputs, images, method=explain, out_dir=Path(out) / "explanations")
    except (CheckpointError, DataError, ValueError, RuntimeError) as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    threshold = (
        f", label threshold {loaded.threshold:.4g} ({loaded.threshold_source})" if loaded.threshold is not None else ""
    )
    console.print(
        f"{len(run.rows)} image(s) predicted with {loaded.config.model} ({loaded.task}, round {loaded.round}"
        f"{threshold}): {escape(str(run.csv_path))}, {escape(str(run.json_path))}"
        + (f", masks in {escape(str(Path(out) / 'masks'))}" if loaded.task == "segmentation" else ""),
        soft_wrap=True,  # paths stay whole, whatever the terminal's width
    )
    if explain is not None:
        console.print(f"{explain} heat maps: {escape(str(explained))}", soft_wrap=True)


def _explain_methods() -> list[str]:
    """:data:`medfed.shared.explain.METHODS`, imported when first needed (it imports torch and MONAI)."""
    from medfed.shared.explain import METHODS

    return list(METHODS)


def _explain(loaded, inputs, images, *, method: str, out_dir: Path) -> Path:  # noqa: ANN001 - LoadedModel, ...
    """Heat maps for every input, on the model inputs predict made of them (``images``, in input
    order), named by its row index; returns the ``index.json`` path
    (:func:`medfed.shared.explain.write_explanations`)."""
    import numpy as np

    from medfed.shared.explain import write_explanations

    model = loaded.model.requires_grad_(True)  # Grad-CAM needs the activations' gradients
    with _progress(len(inputs)) as advance:
        return write_explanations(
            model, np.stack(images), method=method, out_dir=out_dir, ids=[item.index for item in inputs],
            on_batch=lambda n: [advance(i) for i in range(n)],
            extra={"checkpoint": loaded.path.name, "round": loaded.round},
        )


def export_command(
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the export into (created).")],
    export_format: Annotated[
        str,
        typer.Option(
            "--format", "-f",
            help="torchscript (model.ts, traced at the training input shape) or bundle (a MONAI bundle: "
            "configs/metadata.json, configs/inference.json, models/model.pt).",
            click_type=HintedChoice(_export_formats),
            show_default=True,
        ),
    ] = "bundle",
) -> None:
    """Export a trained model as TorchScript or as a MONAI bundle that monai.bundle loads and runs."""
    from medfed.shared.export import ExportError, export_bundle, export_torchscript
    from medfed.shared.inference import CheckpointError, load_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s medfed %(levelname)s: %(message)s")
    try:
        loaded = load_checkpoint(model, device="cpu")
        target = export_torchscript(loaded, out) if export_format == "torchscript" else export_bundle(loaded, out)
    except (CheckpointError, ExportError) as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    console.print(f"Exported {loaded.config.model} ({loaded.task}, round {loaded.round}) as {export_format}: {escape(str(target))}", soft_wrap=True)
    if export_format == "bundle":
        console.print(
            "Run it: python -m monai.bundle run --config_file "
            f"{escape(str(target / 'configs' / 'inference.json'))} --meta_file "
            f"{escape(str(target / 'configs' / 'metadata.json'))} --bundle_root {escape(str(target))} "
            "--input_path DATA --output_dir OUT",
            soft_wrap=True,  # one line the user can copy
        )


class _progress:
    """A rich progress bar on a terminal (nothing otherwise); ``with`` gives the per-image callback."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Progress | None = None

    def __enter__(self):  # noqa: ANN204 - returns the callback
        if not console.is_terminal:
            return lambda index: None
        self.bar = Progress(
            TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("predict", total=self.total)
        bar = self.bar
        return lambda index: bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
