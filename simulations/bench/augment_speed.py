"""Benchmark: one local training epoch with augmentation per image (MONAI) and per batch (medfed).

Run ``python -m medfed.simulations.bench.augment_speed`` (defaults: the quality study's four MedMNIST
sets from ``--data-dir``, each with the study's model and image size, batch 32, SGD, one thread).
For each set it times :func:`medfed.shared.training.train_epochs` over the whole training split
(forward, backward, step and the BatchNorm re-estimation pass, as a site's round) with two loaders
of the same images and the same augmentation distribution:

* ``per_image``: MONAI's ``RandFlipd`` and ``RandAffined`` applied to one image at a time in the
  dataset (:func:`medfed.shared.transforms.train_transforms`; medfed's classification loader until
  2026-12-07, and its segmentation loader still);
* ``batched``: :func:`medfed.shared.training.make_train_loader`, whose classification batches are
  augmented whole (:class:`medfed.shared.transforms.BatchFlipShift`).

Both run alternately in one process, ``--repeats`` times each after one warm-up epoch of each
(medians), so machine load affects both alike. Rows go to ``docs/bench/results.json``, section
``"augment-speed"`` (a set's row is replaced, the others kept). ``--synthetic`` times small
synthetic 2D and 3D sets instead (no data files; what the test runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from medfed.shared.data.base import ImageSet
from medfed.shared.models import build_model
from medfed.shared.training import TrainSettings, make_optimizer, make_train_loader, train_epochs
from medfed.shared.transforms import ImageSetDataset, train_transforms
from medfed.simulations.bench.support import bench_command, read_results_section, write_results_section

__all__ = ["SECTION", "epoch_seconds", "per_image_loader", "main"]

logger = logging.getLogger(__name__)

SECTION = "augment-speed"
CPU = torch.device("cpu")


def per_image_loader(data: ImageSet, settings: TrainSettings) -> DataLoader:
    """The loader with MONAI's transforms applied one image at a time (the comparison's baseline)."""
    transform = train_transforms(task=data.task, spatial_dims=data.spatial_dims)
    return DataLoader(ImageSetDataset(data, transform=transform, seed=settings.seed),
                      batch_size=min(settings.batch_size, len(data)), shuffle=True,
                      generator=torch.Generator().manual_seed(settings.seed))


def epoch_seconds(data: ImageSet, *, model_name: str, batch_size: int, repeats: int,
                  image_size: int) -> dict[str, Any]:
    """Median seconds of one training epoch over ``data`` with each loader (alternating).

    Returns
    -------
    dict
        ``per_image_s``, ``batched_s`` (medians over ``repeats``), ``speedup`` (their ratio),
        ``images`` and the conditions.
    """
    settings = TrainSettings(epochs=1, batch_size=batch_size, learning_rate=0.05, optimizer="sgd", augment=True,
                             seed=0)
    model = build_model(model_name, spatial_dims=data.spatial_dims, in_channels=int(data.images.shape[1]),
                        out_channels=data.num_classes, norm="batch", image_size=image_size)
    loaders = {"per_image": lambda: per_image_loader(data, settings), "batched": lambda: make_train_loader(data, settings)}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    loads: list[float] = []
    for repeat in range(repeats + 1):  # the first pass of each is a warm-up
        for name, make in loaders.items():
            optimizer = make_optimizer(model.parameters(), name="sgd", learning_rate=0.05, weight_decay=0.0)
            start = time.perf_counter()
            train_epochs(model, make(), optimizer, task=data.task, epochs=1, device=CPU)
            if repeat:
                times[name].append(time.perf_counter() - start)
                loads.append(os.getloadavg()[0])
    per_image, batched = statistics.median(times["per_image"]), statistics.median(times["batched"])
    return {
        "model": model_name, "spatial_dims": data.spatial_dims, "image_size": image_size, "images": len(data),
        "batch_size": batch_size, "threads": torch.get_num_threads(), "repeats": repeats,
        "per_image_s": round(per_image, 4), "batched_s": round(batched, 4), "speedup": round(per_image / batched, 2),
        "load_min": round(min(loads), 2), "load_max": round(max(loads), 2),
    }


def _sets(args: argparse.Namespace) -> list[tuple[str, ImageSet, str, int]]:
    """``(name, training split, model, image size)`` per set to time."""
    if args.synthetic:
        from medfed.shared.data.synthetic import make_synthetic

        return [(f"synthetic-{d}d", make_synthetic(task="classification", spatial_dims=d, num_samples=args.synthetic,
                                                   image_size=16, seed=0).train, "simplecnn", 16) for d in (2, 3)]
    from medfed.shared.config_sources import mapping_layer, resolve_config
    from medfed.shared.data.loading import load_dataset
    from medfed.simulations.bench.quality_study import STUDY_MODELS

    out = []
    for name in args.datasets:
        path = args.data_dir / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass --data-dir with the MedMNIST files, or --synthetic N.")
        study = STUDY_MODELS.get(name, {"model": "simplecnn"})
        cfg = resolve_config(mapping_layer({"dataset": str(path), **study}, source="augment_speed")).config
        train = load_dataset(cfg).train
        out.append((name, train, study["model"], int(train.images.shape[-1])))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure, print a table, write the section; 2 on bad input."""
    from medfed.simulations.bench.suite import default_data_dir

    parser = argparse.ArgumentParser(prog="python -m medfed.simulations.bench.augment_speed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--datasets", nargs="+", default=["breastmnist", "retinamnist", "adrenalmnist3d", "vesselmnist3d"])
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="time synthetic 2D and 3D sets of N images instead of --datasets")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path("docs/bench/results.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        sets = _sets(args)
        existing = read_results_section(args.results, SECTION) or []
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}")
        return 2
    rows = []
    print(f"{'set':<16}{'model':>10}{'size':>6}{'images':>8}{'per image s':>13}{'batched s':>11}{'speedup':>9}")
    for name, data, model, size in sets:
        row = {"dataset": name, **epoch_seconds(data, model_name=model, batch_size=args.batch_size,
                                                repeats=args.repeats, image_size=size),
               "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "command": bench_command("medfed.simulations.bench.augment_speed", sys.argv[1:] if argv is None else argv)}
        rows.append(row)
        print(f"{name:<16}{model:>10}{size:>6}{row['images']:>8}{row['per_image_s']:>13.2f}"
              f"{row['batched_s']:>11.2f}{row['speedup']:>9.2f}", flush=True)
    names = {r["dataset"] for r in rows}
    write_results_section(args.results, SECTION, [r for r in existing if r.get("dataset") not in names] + rows)
    print(json.dumps({"written": str(args.results), "section": SECTION, "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
