"""Benchmark: the cost of one DP-SGD step per ``trainable`` fine-tuning mode.

Run ``python -m medfed.simulations.bench.trainable_speed`` (defaults: ResNet-18 with GroupNorm,
28x28 one-channel inputs, 2 classes, batch 32, one CPU thread). For each mode of
:data:`medfed.shared.config.TRAINABLE_MODES` it times one optimizer step (forward, backward,
per-sample clipping in the default ``dp-grad-sample-mode``, secure noise as a site draws it, update) with DP-SGD and
without, on the same fixed batches of random images (speed only: no data is read), interleaved
(every variant once per repeat) so that load changes on a shared machine affect all alike. The
first repeat is a warm-up; the figures are medians over ``--repeats`` repeats of ``--steps``
steps. Rows go to ``docs/bench/results.json``, section ``"trainable-speed"``.

``--dp-speed`` times instead one logical DP-SGD step per per-sample gradient mode
(``--grad-sample-modes``, default Opacus's ``hooks`` and medfed's ``bookkeeping``) against a plain
step, side by side in one process (:func:`dp_speed`), for a 2D or 3D model (``--spatial-dims``),
optionally in physical batches (``--physical-batch``, as Opacus's ``BatchMemoryManager``); rows go
to section ``"dp-speed"`` (rows of the same model, dims, size, batch, physical batch and mode are
replaced, the others kept).

The figures are indicative: a shared CPU is noisy, and the conditions are stated with them.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.config import DP_GRAD_SAMPLE_MODES, TRAINABLE_MODES
from medfed.shared.models import build_model
from medfed.shared.privacy import make_private_training, secure_generator
from medfed.shared.trainable import apply_trainable, trainable_parameters
from medfed.shared.training import make_optimizer
from medfed.simulations.bench.support import write_results_section

__all__ = ["DP_SECTION", "SECTION", "dp_speed", "step_times", "main"]

logger = logging.getLogger(__name__)

SECTION = "trainable-speed"
"""The section of ``results.json`` the rows go to."""
DEFAULT_GRAD_SAMPLE_MODE: str = inspect.signature(make_private_training).parameters["grad_sample_mode"].default
"""The per-sample gradient mode of the ``trainable-speed`` rows: a site's default (before issue 16's
``bookkeeping`` default, those rows were measured with Opacus's ``hooks``)."""
DP_SECTION = "dp-speed"
"""The section of ``--dp-speed``'s rows (per-sample gradient modes against plain training)."""


def _variant(name: str, mode: str, *, private: bool, side: int, batch: int, seed: int) -> tuple[nn.Module, Any]:
    """A model with ``mode`` applied and its optimizer (Opacus-wrapped when ``private``)."""
    torch.manual_seed(seed)
    model = build_model(name, spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=side)
    apply_trainable(model, mode=mode, model_name=name)
    optimizer = make_optimizer(trainable_parameters(model), name="sgd", learning_rate=0.01, weight_decay=0.0)
    if not private:
        return model, optimizer
    loader = DataLoader(TensorDataset(torch.zeros(batch * 8, 1, side, side), torch.zeros(batch * 8).long()),
                        batch_size=batch)
    wrapped = make_private_training(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                    generator=secure_generator(), secure_noise=True)
    return wrapped.model, wrapped.optimizer


def step_times(
    *, name: str = "resnet18", side: int = 28, batch: int = 32, steps: int = 3, repeats: int = 4, seed: int = 0
) -> list[dict[str, Any]]:
    """Median seconds per step of every (mode, DP or not) variant; see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.rand(batch, 1, side, side, generator=g), torch.randint(0, 2, (batch,), generator=g))
               for _ in range(steps)]
    loss_fn = nn.CrossEntropyLoss()
    variants = {(mode, private): _variant(name, mode, private=private, side=side, batch=batch, seed=seed)
                for mode in TRAINABLE_MODES for private in (False, True)}
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in variants}
    for repeat in range(repeats + 1):
        for key, (model, optimizer) in variants.items():
            model.train()
            start = time.perf_counter()
            for images, targets in batches:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(images), targets).backward()
                optimizer.step()
            if repeat:  # the first repeat warms up
                times[key].append((time.perf_counter() - start) / steps)
    rows = []
    for mode in TRAINABLE_MODES:
        model = variants[(mode, False)][0]
        plain, dp = statistics.median(times[(mode, False)]), statistics.median(times[(mode, True)])
        rows.append({
            "model": name, "norm": "group", "image_size": side, "batch_size": batch, "threads": torch.get_num_threads(),
            "mode": mode, "grad_sample_mode": DEFAULT_GRAD_SAMPLE_MODE,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in model.parameters()),
            "plain_step_seconds": round(plain, 4), "dp_step_seconds": round(dp, 4),
            "dp_over_plain": round(dp / plain, 2),
            "steps": steps, "repeats": repeats, "machine": platform.processor() or platform.machine(),
            "load": round(os.getloadavg()[0], 1), "measured_at": datetime.date.today().isoformat(),
            "command": f"python -m medfed.simulations.bench.trainable_speed --models {name} --image-size {side} "
                       f"--batch-size {batch} --steps {steps} --repeats {repeats} --threads {torch.get_num_threads()}",
        })
    all_dp = rows[0]["dp_step_seconds"]
    for row in rows:
        row["dp_step_vs_all"] = round(row["dp_step_seconds"] / all_dp, 3)
    return rows


def _dp_variant(name: str, mode: str | None, *, spatial_dims: int, side: int, batch: int, seed: int) -> tuple[
        nn.Module, Any]:
    """A fresh model and optimizer; DP-SGD with ``mode`` (secure generator and noise, as a site
    runs it) unless ``mode`` is ``None``."""
    torch.manual_seed(seed)
    model = build_model(name, spatial_dims=spatial_dims, in_channels=1, out_channels=2, norm="group", image_size=side)
    optimizer = make_optimizer(trainable_parameters(model), name="sgd", learning_rate=0.01, weight_decay=0.0)
    if mode is None:
        return model, optimizer
    shape = (batch * 8, 1, *(side,) * spatial_dims)
    loader = DataLoader(TensorDataset(torch.zeros(shape), torch.zeros(batch * 8).long()), batch_size=batch)
    wrapped = make_private_training(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                    generator=secure_generator(), secure_noise=True, grad_sample_mode=mode,
                                    criterion=nn.CrossEntropyLoss())
    return wrapped.model, wrapped.optimizer


def dp_speed(
    *, name: str = "resnet18", spatial_dims: int = 2, side: int = 28, batch: int = 64, physical: int = 0,
    modes: tuple[str, ...] = ("hooks", "bookkeeping"), steps: int = 2, repeats: int = 3, seed: int = 0,
) -> list[dict[str, Any]]:
    """Seconds per logical DP-SGD step of each of ``modes`` and per plain step, side by side.

    Every variant takes ``steps`` steps on the same fixed batches of ``batch`` random images per
    repeat, interleaved (plain, mode 1, mode 2, plain, ...), after one warm-up repeat; the
    figures are medians over ``repeats``. With ``physical`` > 0 a DP step runs its logical batch
    in physical batches of that size, as Opacus's ``BatchMemoryManager`` does (the optimizer
    skips the noisy step until the last one); the plain step always runs the whole batch.
    ``dp_time_ratio`` = DP seconds per step / plain seconds per step, the ratio of epoch times
    at equal batches (wall clock); ``dp_cpu_time_ratio`` the same in this process's CPU seconds,
    which other processes on a shared machine disturb much less (one thread: CPU time is close
    to the wall time of an idle machine).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, *(side,) * spatial_dims)
    batches = [(torch.rand(shape, generator=g), torch.randint(0, 2, (batch,), generator=g)) for _ in range(steps)]
    loss_fn = nn.CrossEntropyLoss()
    chunk = physical if 0 < physical < batch else batch
    variants = {mode: _dp_variant(name, mode, spatial_dims=spatial_dims, side=side, batch=batch, seed=seed)
                for mode in (None, *modes)}
    times: dict[str | None, list[float]] = {mode: [] for mode in variants}
    cpu: dict[str | None, list[float]] = {mode: [] for mode in variants}
    loads = [os.getloadavg()[0]]
    for repeat in range(repeats + 1):
        for mode, (model, optimizer) in variants.items():
            model.train()
            start, start_cpu = time.perf_counter(), time.process_time()
            for images, targets in batches:
                if mode is None:
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn(model(images), targets).backward()
                    optimizer.step()
                    continue
                for first in range(0, batch, chunk):
                    optimizer.zero_grad(set_to_none=True)
                    part = slice(first, first + chunk)
                    loss_fn(model(images[part]), targets[part]).backward()
                    optimizer.signal_skip_step(do_skip=first + chunk < batch)
                    optimizer.step()
            if repeat:  # the first repeat warms up
                times[mode].append((time.perf_counter() - start) / steps)
                cpu[mode].append((time.process_time() - start_cpu) / steps)
        loads.append(os.getloadavg()[0])
    plain, plain_cpu = statistics.median(times[None]), statistics.median(cpu[None])
    model = variants[None][0]
    command = (f"python -m medfed.simulations.bench.trainable_speed --dp-speed --models {name} --spatial-dims "
               f"{spatial_dims} --image-size {side} --batch-size {batch} --physical-batch {physical} --grad-sample-modes "
               f"{' '.join(modes)} --steps {steps} --repeats {repeats} --threads {torch.get_num_threads()}")
    rows = []
    for mode in modes:
        dp, dp_cpu = statistics.median(times[mode]), statistics.median(cpu[mode])
        rows.append({
            "model": name, "norm": "group", "spatial_dims": spatial_dims, "image_size": side, "batch": batch,
            "physical_batch": chunk, "mode": mode, "secure_noise": True,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dp_s_per_step": round(dp, 4), "nondp_s_per_step": round(plain, 4), "dp_time_ratio": round(dp / plain, 3),
            "dp_cpu_s_per_step": round(dp_cpu, 4), "nondp_cpu_s_per_step": round(plain_cpu, 4),
            "dp_cpu_time_ratio": round(dp_cpu / plain_cpu, 3),
            "threads": torch.get_num_threads(), "steps": steps, "repeats": repeats,
            "load_min": round(min(loads), 1), "load_max": round(max(loads), 1),
            "machine": platform.processor() or platform.machine(), "measured_at": datetime.date.today().isoformat(),
            "command": command,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line: measure, print the table, write the results section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"], help="registered models (each gets its rows)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path("docs/bench/results.json"))
    parser.add_argument("--dp-speed", action="store_true",
                        help=f"time DP-SGD per --grad-sample-modes against plain training (section {DP_SECTION!r})")
    parser.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3), help="--dp-speed: 2D or 3D models")
    parser.add_argument("--physical-batch", type=int, default=0,
                        help="--dp-speed: physical batch of a DP step (0: the whole batch)")
    parser.add_argument("--grad-sample-modes", nargs="+", default=["hooks", "bookkeeping"],
                        choices=list(DP_GRAD_SAMPLE_MODES), help="--dp-speed: the per-sample gradient modes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.dp_speed:
        _main_dp_speed(args)
        return
    rows: list[dict[str, Any]] = []
    header = f"{'mode':<17}{'trainable':>12}{'plain s/step':>14}{'DP s/step':>11}{'DP/plain':>10}{'DP vs all':>11}"
    for name in args.models:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            model_rows = step_times(name=name, side=args.image_size, batch=args.batch_size, steps=args.steps,
                                    repeats=args.repeats)
        print(f"{name}, GroupNorm, {args.image_size}px, batch {args.batch_size}, {args.threads} thread(s)")
        print(header)
        for r in model_rows:
            print(f"{r['mode']:<17}{r['trainable_parameters']:>12,}{r['plain_step_seconds']:>14.3f}"
                  f"{r['dp_step_seconds']:>11.3f}{r['dp_over_plain']:>10.2f}{r['dp_step_vs_all']:>11.3f}")
        rows += model_rows
    write_results_section(args.results, SECTION, rows)
    print(json.dumps({"written": str(args.results), "section": SECTION}))



def _main_dp_speed(args: argparse.Namespace) -> None:
    """``--dp-speed``: measure, print, and replace this configuration's rows in the section."""
    rows: list[dict[str, Any]] = []
    for name in args.models:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            model_rows = dp_speed(name=name, spatial_dims=args.spatial_dims, side=args.image_size,
                                  batch=args.batch_size, physical=args.physical_batch,
                                  modes=tuple(args.grad_sample_modes), steps=args.steps, repeats=args.repeats)
        first = model_rows[0]
        print(f"{name} {args.spatial_dims}D, GroupNorm, {args.image_size} px, batch {args.batch_size} (physical "
              f"{first['physical_batch']}), {args.threads} thread(s), load {first['load_min']}-{first['load_max']}")
        print(f"{'mode':<13}{'DP s/step':>11}{'plain s/step':>14}{'DP/plain':>10}{'CPU s DP':>10}{'CPU s plain':>13}"
              f"{'CPU ratio':>11}")
        for r in model_rows:
            print(f"{r['mode']:<13}{r['dp_s_per_step']:>11.3f}{r['nondp_s_per_step']:>14.3f}{r['dp_time_ratio']:>10.2f}"
                  f"{r['dp_cpu_s_per_step']:>10.3f}{r['nondp_cpu_s_per_step']:>13.3f}{r['dp_cpu_time_ratio']:>11.2f}")
        rows += model_rows
    fields = ("model", "spatial_dims", "image_size", "batch", "physical_batch", "mode")
    keys = {tuple(r[f] for f in fields) for r in rows}
    kept = [r for r in _section(args.results, DP_SECTION) if tuple(r.get(f) for f in fields) not in keys]
    write_results_section(args.results, DP_SECTION, kept + rows)
    print(json.dumps({"written": str(args.results), "section": DP_SECTION}))


def _section(path: Path, section: str) -> list[dict[str, Any]]:
    """The rows already in ``section`` of the results file (none if absent)."""
    if not path.exists():
        return []
    value = json.loads(path.read_text(encoding="utf-8")).get(section, [])
    return list(value) if isinstance(value, list) else []


if __name__ == "__main__":
    main()
