"""``medfed explain``: heat-map explanations of a checkpoint's predictions on one split, at the site.

Reads a checkpoint (``<run dir>/checkpoints/best.pt`` or ``final.pt``) and a dataset the site holds,
and writes one PNG overlay per image (the middle slice for 3D, plus a NIfTI map), and
``index.json`` (see :func:`medfed.shared.explain.write_explanations`). It opens no network
connection: nothing leaves the site.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medfed.shared.cli_options import HintedChoice

__all__ = ["explain_command", "SPLITS"]

console = Console(stderr=True)

SPLITS: dict[str, str] = {"test": "test", "validation": "val", "training": "train"}
"""``--split`` choices (datalist section names) -> :class:`~medfed.shared.data.base.DataSplits` fields."""


class ExplainError(ValueError):
    """A bad checkpoint, dataset or option; the message says which and how to fix it."""


def _method_names() -> list[str]:
    from medfed.shared.explain import METHODS

    return list(METHODS)


def explain_command(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="The checkpoint (<run dir>/checkpoints/best.pt or final.pt).")
    ],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            "-d",
            help="The site's data: a MedMNIST .npz file, a datalist .json, or 'synthetic' (the checkpoint's "
            "synthetic settings).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs, NIfTI maps and index.json.")],
    split: Annotated[
        str, typer.Option(help="Which split to explain.", click_type=HintedChoice(tuple(SPLITS)), show_default=True)
    ] = "test",
    method: Annotated[
        str,
        typer.Option(help="Explanation method.", click_type=HintedChoice(_method_names), show_default=True),
    ] = "gradcam",
    limit: Annotated[
        int | None, typer.Option(min=1, help="Explain only the first N images of the split (default: all).")
    ] = None,
    target_layer: Annotated[
        str | None,
        typer.Option(
            help="Grad-CAM layer (a name from model.named_modules()); default: the last layer with a spatial "
            "feature map."
        ),
    ] = None,
    class_index: Annotated[
        int | None,
        typer.Option("--class", min=0, help="The class to explain for every image (default: each image's prediction)."),
    ] = None,
    occlusion_mask: Annotated[
        int | None,
        typer.Option(min=1, help="Occlusion patch side in pixels (default: a quarter of the smallest side)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.", show_default=True)] = 16,
) -> None:
    """Write heat-map explanations of a checkpoint's predictions on one split (PNG overlays; NIfTI maps for 3D).

    Runs locally and contacts nobody: the maps show the site's images and never leave the site.
    index.json holds one row per image (its index in the split, predicted class, probability,
    method, file names) and no file paths or patient identifiers.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medfed.shared.data.base import DataError
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.explain import write_explanations
    from medfed.shared.inference import CheckpointError, load_checkpoint

    logging.basicConfig(level=logging.WARNING, force=True)
    try:
        try:
            loaded = load_checkpoint(model)
        except CheckpointError as err:
            raise ExplainError(f"--model: {err}") from None
        cfg, server_round = loaded.config, loaded.round
        if dataset != "synthetic" and Path(dataset).suffix not in (".npz", ".json"):
            raise ExplainError(
                f"--dataset {Path(dataset).name}: give a MedMNIST .npz file, a datalist .json or 'synthetic'."
            )
        splits = load_dataset(cfg.replace(dataset=dataset))
        data = getattr(splits, SPLITS[split])
        if data.task != "classification":
            raise ExplainError(
                f"--dataset holds {data.task} data: explanations are for classifiers (a segmentation "
                "model's output already is a map)."
            )
        if len(data) == 0:
            raise ExplainError(f"--split {split} is empty in this dataset: choose another split.")
        shape = loaded.shape
        held = (data.in_channels, tuple(data.spatial_shape), splits.num_classes)
        if held != (shape.in_channels, tuple(shape.spatial_shape), shape.num_classes):
            raise ExplainError(
                f"--model {model.name} does not fit --dataset: the model takes {shape.in_channels} channel(s) "
                f"of {tuple(shape.spatial_shape)} with {shape.num_classes} classes, the dataset holds "
                f"{held[0]} of {held[1]} with {held[2]} classes. The dataset must have the channels, classes "
                "and image size the model was trained on."
            )
        network = loaded.model.requires_grad_(True)  # Grad-CAM needs the activations' gradients
        network.eval()
        count = len(data) if limit is None else min(limit, len(data))
        with Progress(
            TextColumn("[bold]explain[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        ) as progress:
            task = progress.add_task(f"{method} on {split}", total=count)
            index = write_explanations(
                network,
                data.images[:count],
                method=method,
                out_dir=out,
                labels=data.targets[:count],
                target_layer=target_layer,
                class_index=class_index,
                occlusion_mask=occlusion_mask,
                batch_size=batch_size,
                on_batch=lambda n: progress.advance(task, n),
                extra={"split": split, "model": cfg.model, "checkpoint_round": server_round},
            )
    except (ExplainError, DataError, ValueError) as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    console.print(f"Wrote {count} {method} explanations ({split}) to {out} (index: {index.name}).", soft_wrap=True)
