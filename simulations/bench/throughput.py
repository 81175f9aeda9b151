"""Training and inference throughput on CPU: images per second per core against the model's FLOPs.

Usage::

    python -m medfed.simulations.bench.throughput --models resnet18:2:28 resnet18:3:28 --threads 1 2

For each model (``name:spatial_dims:side``), thread count and dtype (``fp32``, ``bf16``: CPU
autocast to bfloat16), this times training steps (SGD, cross-entropy, batch of random images
held as tensors, so no data loading is timed) and inference (``eval``, ``no_grad``), after one
warm-up step. The model's FLOPs per image come from ``torch.utils.flop_counter`` (one forward
and backward); the hardware estimate is the rate of a large matrix product in the same dtype
and thread count, measured in the same process, so ``fraction_of_matmul`` says how close the
training gets to what the cores do on their best kernel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medfed.shared.models import build_model

if TYPE_CHECKING:
    from medfed.simulations.bench import BenchContext, SectionResult

__all__ = ["DTYPES", "parse_model", "matmul_gflops", "model_flops", "measure", "bench_section", "main"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
"""Name -> CPU autocast dtype (``None``: no autocast)."""


def parse_model(text: str) -> tuple[str, int, int]:
    """``"resnet18:3:28"`` -> ``("resnet18", 3, 28)``.

    Raises
    ------
    ValueError
        Naming the expected form.
    """
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or parts[1] not in ("2", "3"):
        raise ValueError(f"--models {text!r} is invalid: use NAME:DIMS:SIDE with DIMS 2 or 3, e.g. resnet18:2:28.")
    return parts[0], int(parts[1]), int(parts[2])


def _autocast(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is invalid; valid: {', '.join(DTYPES)}.")
    target = DTYPES[dtype]
    return torch.autocast("cpu", dtype=target, enabled=target is not None)


def matmul_gflops(*, dtype: str, threads: int, size: int = 1024, seconds: float = 0.5) -> float:
    """GFLOP/s of ``size x size`` matrix products in ``dtype`` with ``threads`` threads (the cores' best rate)."""
    torch.set_num_threads(threads)
    kind = DTYPES[dtype] or torch.float32
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def model_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """FLOPs of one forward and backward pass over ``images`` (shape ``(B, C, *spatial)``), per image."""
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]


def measure(
    *, model: str, spatial_dims: int, side: int, dtype: str, threads: int, batch: int = 32, steps: int = 5,
    classes: int = 2,
) -> dict[str, Any]:
    """Training and inference images per second of one configuration (see the module docstring).

    Returns
    -------
    dict
        ``model``, ``spatial_dims``, ``image_size``, ``dtype``, ``threads``, ``images_per_s``
        (training), ``images_per_s_per_core``, ``inference_images_per_s``, ``gflop_per_image``
        (training, forward + backward), ``achieved_gflops``, ``matmul_gflops``, ``fraction_of_matmul``.
    """
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = build_model(model, spatial_dims=spatial_dims, in_channels=1, out_channels=classes, image_size=side)
        images = torch.randn(batch, 1, *([side] * spatial_dims))
        labels = torch.randint(0, classes, (batch,))
        flops = model_flops(net, images, labels)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        net.train()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with _autocast(dtype):
                loss = nn.functional.cross_entropy(net(images), labels)
            loss.backward()
            opt.step()

        step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        train_s = time.perf_counter() - start
        net.eval()
        with torch.no_grad(), _autocast(dtype):
            net(images)
            start = time.perf_counter()
            for _ in range(steps):
                net(images)
            infer_s = time.perf_counter() - start
        peak = matmul_gflops(dtype=dtype, threads=threads)
    finally:
        torch.set_num_threads(before)
    per_s = batch * steps / train_s
    return {
        "model": model, "spatial_dims": spatial_dims, "image_size": side, "dtype": dtype, "threads": threads,
        "batch": batch, "images_per_s": round(per_s, 2), "images_per_s_per_core": round(per_s / threads, 2),
        "inference_images_per_s": round(batch * steps / infer_s, 2), "gflop_per_image": round(flops / 1e9, 4),
        "achieved_gflops": round(per_s * flops / 1e9, 2), "matmul_gflops": round(peak, 2),
        "fraction_of_matmul": round(per_s * flops / 1e9 / peak, 3), "load": os.getloadavg()[0],
    }


def bench_section(ctx: BenchContext) -> SectionResult:
    """Section ``throughput`` of ``medfed bench``: ResNet-18 at 28 px (2D) and at the profile's 3D size,
    fp32 and bf16, 1 thread (quick) or 1 and 2 threads (full)."""
    from medfed.simulations.bench import SectionResult, Table
    from medfed.simulations.bench.support import fmt

    quick = ctx.profile.name == "quick"
    side_3d = ctx.profile.image_size_3d or 28  # the 3D quality runs' size (16^3 in both profiles)
    configs = [("resnet18", 2, 28), ("resnet18", 3, side_3d)]
    batch, steps = (2, 1) if quick else (16, 4)  # quick: a smoke test of the section, seconds
    threads_list = (1,) if quick else (1, 2)
    table = Table(
        title="Training throughput on CPU (random tensors in memory, SGD, one warm-up step)",
        columns=["model", "image", "dtype", "threads", "train images/s", "train images/s per core",
                 "inference images/s", "GFLOP per image (fwd+bwd)", "achieved GFLOP/s", "matmul GFLOP/s",
                 "fraction of matmul rate"],
    )
    result = SectionResult(tables=[table])
    for model, dims, side in configs:
        for threads in threads_list:
            for dtype in DTYPES:
                row = measure(model=model, spatial_dims=dims, side=side, dtype=dtype, threads=threads,
                              batch=batch, steps=steps)
                result.figures.setdefault("throughput", []).append(row)
                table.add(model, f"{side}^{dims}", dtype, threads, fmt(row["images_per_s"], 1),
                          fmt(row["images_per_s_per_core"], 1), fmt(row["inference_images_per_s"], 1),
                          fmt(row["gflop_per_image"], 3), fmt(row["achieved_gflops"], 1),
                          fmt(row["matmul_gflops"], 1), fmt(row["fraction_of_matmul"], 2))
    table.notes.append(
        "bf16 is CPU autocast; it halves training time on CPUs with bf16 instructions but collapsed pooled "
        "BreastMNIST to the majority class (AUC 0.916 -> 0.670), so training stays fp32 (see BENCHMARKS.md, "
        "'Performance close to the limit'). The matmul rate is a 1024x1024 product in the same dtype and threads."
    )
    result.commands.append(ctx.reproduce("throughput"))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Print one JSON object per configuration."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18:2:28", "resnet18:3:28"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--record", type=Path, default=None, metavar="RESULTS_JSON",
                        help="append the rows to section 'throughput' of this file (e.g. docs/bench/results.json)")
    args = parser.parse_args(argv)
    try:
        models = [parse_model(m) for m in args.models]
    except ValueError as err:
        parser.error(str(err))
    rows = []
    for name, dims, side in models:
        for threads in args.threads:
            for dtype in args.dtypes:
                row = measure(model=name, spatial_dims=dims, side=side, dtype=dtype, threads=threads,
                              batch=args.batch, steps=args.steps)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.record is not None:
        from medfed.simulations.bench.figures import check_rows
        from medfed.simulations.bench.support import append_results_rows, bench_command

        command = bench_command("medfed.simulations.bench.throughput", sys.argv[1:] if argv is None else argv)
        stamp = time.strftime("%Y-%m-%d", time.gmtime())
        append_results_rows(args.record, "throughput",
                            check_rows("throughput", [{**r, "command": command, "measured_at": stamp} for r in rows]))


if __name__ == "__main__":
    main()
