"""``medfed pretrain``: the coordinator trains an initialization on public data it holds.

The command reads a public MedMNIST npz file or datalist, pretrains a registry model on it
(:mod:`medfed.shared.pretrain`: supervised on the data's labels, or SimCLR contrastive on its images)
and writes a medfed checkpoint (``--out``) that the ``init-weights`` run-config key loads.

This module stays light (Typer only): torch and MONAI are imported when the command runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medfed.shared.cli_options import HintedChoice, verbose_option
from medfed.shared.config import NORMS

__all__ = ["pretrain_command", "PRETRAIN_MODE_CHOICES"]

console = Console(stderr=True)

PRETRAIN_MODE_CHOICES: tuple[str, ...] = ("supervised", "contrastive")
"""The ``--mode`` values (the same as :data:`medfed.shared.pretrain.PRETRAIN_MODES`; kept here so that
``--help`` does not import torch; a test checks they agree)."""


def _model_names() -> list[str]:
    from medfed.shared.models import MODELS

    return list(MODELS)


def pretrain_command(
    data: Annotated[
        Path,
        typer.Option("--data", help="Public data: a MedMNIST-style .npz file or a datalist .json (never the target's test data)."),
    ],
    model: Annotated[
        str,
        typer.Option("--model", help="Registry model to pretrain (`medfed models` lists them); the target's model.",
                     click_type=HintedChoice(_model_names), metavar="NAME"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The checkpoint file to write (e.g. pretrained/resnet18.pt).")],
    mode: Annotated[
        str,
        typer.Option("--mode", help="supervised: train on the data's labels; contrastive: SimCLR on its images (no labels).",
                     click_type=HintedChoice(PRETRAIN_MODE_CHOICES), show_default=True),
    ] = "contrastive",
    norm: Annotated[
        str,
        typer.Option("--norm", help="Normalisation layers; the target's (group for DP fine-tuning).",
                     click_type=HintedChoice(NORMS), show_default=True),
    ] = "group",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the public training split.", show_default=True)] = 10,
    image_size: Annotated[
        int,
        typer.Option("--image-size", min=0, help="Resize images to this side (0: the npz file's own); use the target's.", show_default=True),
    ] = 0,
    in_channels: Annotated[
        int,
        typer.Option("--in-channels", min=0, help="Channels the model takes: 1 turns RGB into grey (BT.601 luma), "
                     "3 grey into RGB; 0 keeps the data's. Use the target's.", show_default=True),
    ] = 0,
    num_classes: Annotated[
        int,
        typer.Option("--num-classes", min=0, help="contrastive: classes of the (untrained) head, the target's "
                     "(0: 2); supervised: leave 0 (the data's classes).", show_default=True),
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Images per step (contrastive: pairs).", show_default=True)] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine decay over the epochs).", show_default=True)] = 1e-3,
    optimizer: Annotated[
        str,
        typer.Option("--optimizer", help="Optimizer.", click_type=HintedChoice(("adam", "sgd")), show_default=True),
    ] = "adam",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.", show_default=True)] = 1e-6,
    temperature: Annotated[float, typer.Option("--temperature", help="contrastive: NT-Xent temperature.", show_default=True)] = 0.2,
    all_splits: Annotated[
        bool, typer.Option("--all-splits", help="contrastive: also train on the public set's validation and test images.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seeds weights, shuffling and augmentation.", show_default=True)] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu or cuda.", show_default=True)] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    verbose: Annotated[bool, verbose_option(what="data loading and per-epoch logs")] = True,
) -> None:
    """Pretrain a registry model on public data and write a checkpoint that init-weights loads."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s medfed %(levelname)s: %(message)s", force=True)
    logging.getLogger("medfed").setLevel(level)
    if out.is_dir():
        _fail(f"--out {out} is a folder. Give a file name, e.g. --out {out / (model + '.pt')}.")
    if out.exists() and not overwrite:
        _fail(f"--out {out} exists. Give another file, or --overwrite to replace it.")
    from medfed.shared.config import ConfigError
    from medfed.shared.data.base import DataError
    from medfed.shared.files import file_sha256
    from medfed.shared.pretrain import PretrainError, PretrainSettings, load_public_data, pretrain
    from medfed.shared.training import select_device

    try:
        settings = PretrainSettings(
            model=model, mode=mode, norm=norm, epochs=epochs, batch_size=batch_size, learning_rate=lr,
            optimizer=optimizer, weight_decay=weight_decay, seed=seed, in_channels=in_channels,
            num_classes=num_classes, temperature=temperature, all_splits=all_splits,
        )
        target_device = select_device(device)
        splits = load_public_data(data, image_size=image_size, seed=seed)
        with _EpochBar(epochs=epochs, title=f"{mode} {model}") as bar:
            result = pretrain(splits, settings=settings, data_name=data.name, data_sha256=file_sha256(data),
                              device=target_device, on_epoch=bar.epoch_done)
        from medfed.shared.pretrain import write_checkpoint

        write_checkpoint(out, result.payload)
    except (PretrainError, DataError, ConfigError, FloatingPointError) as err:
        _fail(str(err))
    except (RuntimeError, ValueError) as err:  # e.g. a model that cannot take this image size
        _fail(f"{type(err).__name__}: {err}", code=1)
    losses = " ".join(f"{x:.4f}" for x in result.epoch_losses)
    typer.echo(f"wrote {out} ({mode}, {len(result.epoch_losses)} epochs, {result.seconds:.1f} s; loss per epoch: {losses})")


def _fail(message: str, *, code: int = 2) -> None:
    """Print ``message`` as an error and exit ``code`` (2: bad input; 1: the run failed)."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


class _EpochBar:
    """A rich progress bar over the epochs on a terminal; one log line per epoch elsewhere."""

    def __init__(self, *, epochs: int, title: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.live = console.is_terminal
        self.epochs = epochs
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[loss]}"), console=console,
                                 disable=not self.live)
        self.task = self.progress.add_task(title, total=epochs, loss="")

    def __enter__(self) -> _EpochBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def epoch_done(self, epoch: int, loss: float) -> None:
        """Advance the bar (terminal) or log a line: epoch ``epoch`` ended with mean ``loss``."""
        self.progress.update(self.task, completed=epoch, loss=f"loss {loss:.4f}")
        if not self.live:
            logging.getLogger("medfed.pretrain").info("epoch %d/%d  loss %.4f", epoch, self.epochs, loss)
