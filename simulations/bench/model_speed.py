"""Parameter count and CPU training speed of registered models, plain and with DP-SGD.

Not a section of ``medfed bench``: a quick measurement behind the figures in ``medfed models``'
notes and ``docs/models.md``. Each case trains a few batches of random images through the
project's own loop (:func:`medfed.shared.training.train_epochs`; DP-SGD through
:func:`medfed.shared.privacy.make_private_training`, Opacus hooks mode) and reports the median
time per batch after a warm-up batch, both wall-clock and CPU time of this process (on a
shared machine the CPU time is the steadier figure: with ``OMP_NUM_THREADS=1`` it is the
single-core compute time). Rows go to ``docs/bench/results.json``, section
``"model-speed"``::

    OMP_NUM_THREADS=1 python -m medfed.simulations.bench.model_speed --models vit unetr swinunetr
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.models import DP_NORM, build_model, count_parameters, model_task
from medfed.shared.privacy import make_private_training
from medfed.shared.training import make_loss, make_optimizer, train_epochs
from medfed.simulations.bench.support import bench_command

__all__ = ["SECTION", "DEFAULT_SIDES", "measure", "main"]

logger = logging.getLogger(__name__)

SECTION: str = "model-speed"
"""The section of ``results.json`` the rows go to."""

DEFAULT_SIDES: dict[str, dict[int, int]] = {
    "classification": {2: 28, 3: 28},
    "segmentation": {2: 32, 3: 32},
}
"""Image side per task and spatial dims (MedMNIST's 28; 32 for the segmentation divisors)."""


def _data(name: str, spatial_dims: int, side: int, samples: int) -> TensorDataset:
    """``samples`` random images ``(1, *spatial)`` with labels ``()`` or masks ``(1, *spatial)``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((samples, 1, *(side,) * spatial_dims), generator=generator)
    if model_task(name) == "segmentation":
        targets = torch.randint(0, 2, (samples, 1, *(side,) * spatial_dims), generator=generator)
    else:
        targets = torch.randint(0, 2, (samples,), generator=generator)
    return TensorDataset(images, targets)


def measure(name: str, *, spatial_dims: int, side: int, batch_size: int, batches: int, dp: bool) -> dict[str, float]:
    """Seconds per training batch (median of ``batches`` after one warm-up) and parameters.

    Returns
    -------
    dict
        ``parameters``, ``trainable``, ``seconds_per_batch`` (wall), ``cpu_seconds_per_batch``
        (this process's CPU time) and ``images_per_cpu_second``.
    """
    torch.manual_seed(0)
    task = model_task(name)
    model = build_model(name, spatial_dims=spatial_dims, in_channels=1, out_channels=2, norm=DP_NORM, image_size=side)
    data = _data(name, spatial_dims, side, batch_size)
    loader = DataLoader(data, batch_size=batch_size)
    optimizer = make_optimizer(model.parameters(), name="sgd", learning_rate=0.01, weight_decay=0.0)
    criterion = make_loss(task)
    private = None
    if dp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = make_private_training(
                model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                generator=torch.Generator().manual_seed(0), criterion=criterion,
            )
        net, loader, optimizer = private.model, private.loader, private.optimizer
    else:
        net = model
    wall: list[float] = []
    cpu: list[float] = []
    try:
        for _ in range(batches + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_epochs(net, loader, optimizer, task=task, epochs=1, device=torch.device("cpu"), criterion=criterion)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    finally:
        if private is not None:
            private.close()
    cpu_seconds = statistics.median(cpu[1:])
    return {
        "parameters": count_parameters(model),
        "trainable": count_parameters(model, trainable_only=True),
        "seconds_per_batch": round(statistics.median(wall[1:]), 3),
        "cpu_seconds_per_batch": round(cpu_seconds, 3),
        "images_per_cpu_second": round(batch_size / cpu_seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Measure, print one line per case and write the rows into ``--results``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit", "unetr", "swinunetr"])
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3, help="measured batches per case (after 1 warm-up)")
    parser.add_argument("--results", type=Path, default=Path("docs/bench/results.json"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        for dims in args.dims:
            side = DEFAULT_SIDES[model_task(name)][dims]
            for dp in (False, True):
                row = {"model": name, "spatial_dims": dims, "side": side, "batch_size": args.batch_size, "dp": dp}
                row |= measure(name, spatial_dims=dims, side=side, batch_size=args.batch_size, batches=args.batches, dp=dp)
                rows.append(row)
                print(
                    f"{name:10s} {dims}D {side:3d}px dp={dp!s:5s} params={row['parameters'] / 1e6:5.2f}M "
                    f"wall {row['seconds_per_batch']:7.3f} s/batch  cpu {row['cpu_seconds_per_batch']:7.3f} s/batch "
                    f"{row['images_per_cpu_second']:7.1f} img/cpu-s",
                    flush=True,
                )
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results[SECTION] = {
        "command": bench_command("medfed.simulations.bench.model_speed", argv if argv is not None else sys.argv[1:]),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote section {SECTION!r} of {args.results}")


if __name__ == "__main__":
    main()
