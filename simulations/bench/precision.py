"""Benchmark: bf16 autocast for the evaluation passes and the BatchNorm re-estimation pass, against fp32.

Run ``python -m medfed.simulations.bench.precision`` (defaults: the three cases of :data:`CASES`,
MedMNIST files from ``../shared/data/medmnist``). Each case trains one model in fp32 with medfed's
own loop (:func:`medfed.shared.training.train_epochs`, the recipe of the README's command for that
data set) and then, on the SAME weights, in one process:

``eval``
    a round's evaluation, :func:`~medfed.shared.training.evaluate_at_validation_threshold`: the
    decision threshold from an fp32 validation pass, the test pass in fp32 and in bf16 autocast
    (the row also reports the threshold a bf16 validation pass would have chosen);
``bn-reestimation``
    the BatchNorm re-estimation pass (:func:`~medfed.shared.training.update_bn_stats`) over the
    training loader, as every site runs it after local training, in fp32 and in bf16, each
    followed by the evaluation in fp32 (and the bf16 pass also in bf16: the whole evaluation
    in bf16). In the federated case the pass runs at every site on its own data from its
    trained weights of the last round, and the sites' models are averaged (FedAvg) afterwards,
    so the averaged statistics come from bf16 passes.
``bn-reorder-noise``
    the fp32 BatchNorm pass over another batch order (not timed): the noise of the pass itself.

Each row reports the test AUC and accuracy, the AUC difference to the fp32 reference of the same
pass, the largest difference of a test probability from fp32, the pass's seconds (median of
``--repeats`` interleaved repeats after a warm-up: all variants alternate, so load changes on a
shared machine hit them alike) and the speed-up over fp32. Rows go to
``docs/bench/results.json``, section ``"precision"`` (only that key is rewritten, through
:func:`~medfed.simulations.bench.support.write_results_section`). Trained models are kept under ``--cache`` so that a second run
re-measures without training. ``--threads-check 1 2`` instead times the passes of the first case's
(untrained) model at 1 and 2 torch threads, interleaved (rows ``<case>-threads``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfed.shared.config import RunConfig
from medfed.shared.config_sources import mapping_layer, resolve_config
from medfed.shared.data.base import ImageSet
from medfed.shared.metrics import youden_threshold
from medfed.shared.partition import partition_indices, training_pool
from medfed.shared.precision import native_bf16
from medfed.shared.preflight import preflight
from medfed.shared.seeding import seed_everything
from medfed.shared.task import initial_model, round_settings
from medfed.shared.training import (
    TrainSettings,
    evaluate_at_validation_threshold,
    make_optimizer,
    make_train_loader,
    predict,
    train_epochs,
    update_bn_stats,
)
from medfed.simulations.bench.support import bench_command, fmt, read_results_section, write_results_section

__all__ = ["SECTION", "Case", "CASES", "run_case", "main"]

logger = logging.getLogger(__name__)

SECTION = "precision"
"""The section of ``results.json`` the rows go to."""

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One trained model to evaluate.

    Parameters
    ----------
    file
        MedMNIST file name in the data folder.
    config
        Run-config keys (kebab-case) of the training recipe.
    sites
        0: pooled training; else the number of FedAvg sites (Dirichlet label skew, ``alpha``).
    """

    file: str
    config: dict[str, Any]
    sites: int = 0
    alpha: float = 0.5


CASES: dict[str, Case] = {
    # README: medfed simulate --centralized --dataset breastmnist.npz --model resnet18 --set optimizer=adam
    # --lr 0.001 --set augment=false (50 rounds there; 6 epochs here: the AUC is already near its plateau)
    "breastmnist-resnet18-pooled": Case(
        file="breastmnist.npz",
        config={"model": "resnet18", "optimizer": "adam", "learning-rate": 0.001, "augment": False,
                "num-server-rounds": 6, "local-epochs": 1},
    ),
    # README: the same recipe federated over 4 Dirichlet(0.5) sites, FedAvg with BatchNorm statistics averaged
    "breastmnist-resnet18-fedavg4": Case(
        file="breastmnist.npz",
        config={"model": "resnet18", "optimizer": "adam", "learning-rate": 0.001, "augment": False,
                "num-server-rounds": 4, "local-epochs": 1},
        sites=4,
    ),
    # README: medfed simulate --dataset adrenalmnist3d.npz --model simplecnn --lr 0.05 (SGD, augmentation)
    "adrenalmnist3d-simplecnn-pooled": Case(
        file="adrenalmnist3d.npz",
        config={"model": "simplecnn", "learning-rate": 0.05, "num-server-rounds": 4, "local-epochs": 1},
    ),
}
"""Case name -> what is trained (``--cases`` picks them)."""


def _config(case: Case, data_dir: Path) -> RunConfig:
    values = {**case.config, "dataset": str(data_dir / case.file), "num-sites": max(case.sites, 1),
              "min-fit-clients": max(case.sites, 1)}
    return resolve_config(mapping_layer(values, source=f"case {case.file}")).config


Site = tuple[nn.Module, ImageSet, TrainSettings]
"""A site's model after its last local training (before its BatchNorm pass), its data and settings."""


def _train_pooled(cfg: RunConfig, model: nn.Module, train: ImageSet, device: torch.device) -> list[Site]:
    """Train ``model`` in fp32 as the pooled baseline does (one site holding all the data)."""
    for server_round in range(1, cfg.num_server_rounds + 1):
        settings = round_settings(cfg, server_round=server_round, site_index=-1)
        seed_everything(settings.seed)
        optimizer = make_optimizer(model.parameters(), name=settings.optimizer,
                                   learning_rate=settings.learning_rate, weight_decay=settings.weight_decay)
        loader = make_train_loader(train, settings)
        last = server_round == cfg.num_server_rounds
        # the last round's BatchNorm pass is the one measured (below), in both dtypes
        train_epochs(model, loader, optimizer, task="classification", epochs=settings.epochs, device=device,
                     reestimate_bn=not last)
    return [(model, train, settings)]


def _average(models: Sequence[tuple[nn.Module, int]]) -> nn.Module:
    """FedAvg of ``(model, examples)`` state dicts (parameters and BatchNorm buffers), weighted by examples."""
    total = sum(n for _, n in models)
    target = copy.deepcopy(models[0][0])
    state = target.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = sum(m.state_dict()[key] * (n / total) for m, n in models)
        else:  # num_batches_tracked
            state[key] = models[0][0].state_dict()[key]
    target.load_state_dict(state)
    return target


def _layout(cfg: RunConfig, case: Case, train: ImageSet) -> list[Site]:
    """Fresh models with the data and last-round settings of ``case``'s sites (to load cached weights into)."""
    if not case.sites:
        return [(initial_model(cfg, train), train, round_settings(cfg, server_round=cfg.num_server_rounds,
                                                                   site_index=-1))]
    return [(initial_model(cfg, train), data, round_settings(cfg, server_round=cfg.num_server_rounds, site_index=i))
            for i, data in enumerate(_site_data(cfg, train, sites=case.sites, alpha=case.alpha))]


def _site_data(cfg: RunConfig, train: ImageSet, *, sites: int, alpha: float) -> list[ImageSet]:
    """The Dirichlet(``alpha``) split of ``train`` over ``sites`` sites."""
    parts = partition_indices(train.class_labels(), num_sites=sites, method="dirichlet", alpha=alpha,
                              seed=cfg.seed, min_per_site=8)
    return [train.subset(p) for p in parts]


def _train_federated(
    cfg: RunConfig, model: nn.Module, train: ImageSet, device: torch.device, *, sites: int, alpha: float
) -> list[Site]:
    """FedAvg over ``sites`` Dirichlet sites (fp32, each site's BatchNorm pass in fp32 but the last
    round's, which is measured); return every site's last-round model, data and settings."""
    site_data = _site_data(cfg, train, sites=sites, alpha=alpha)
    global_model = model
    trained: list[Site] = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        last = server_round == cfg.num_server_rounds
        trained = []
        for index, data in enumerate(site_data):
            settings = round_settings(cfg, server_round=server_round, site_index=index)
            seed_everything(settings.seed)
            local = copy.deepcopy(global_model)
            optimizer = make_optimizer(local.parameters(), name=settings.optimizer,
                                       learning_rate=settings.learning_rate, weight_decay=settings.weight_decay)
            loader = make_train_loader(data, settings)
            train_epochs(local, loader, optimizer, task="classification", epochs=settings.epochs, device=device,
                         reestimate_bn=not last)
            trained.append((local, data, settings))
        if not last:
            global_model = _average([(m, len(d)) for m, d, _ in trained])
    return trained


def _evaluate(model: nn.Module, val: ImageSet, test: ImageSet, *, device: torch.device,
              dtype: torch.dtype | None) -> tuple[dict[str, float], torch.Tensor]:
    """A round's evaluation (:func:`~medfed.shared.training.evaluate_at_validation_threshold`: threshold
    on fp32 validation scores, test pass in ``dtype``) and the test probabilities ``(N, K)`` in ``dtype``."""
    metrics = evaluate_at_validation_threshold(model, test, val=val, device=device, dtype=dtype)
    logits, _, _ = predict(model, test, device=device, dtype=dtype)
    return metrics, torch.softmax(logits, dim=1)


def _val_threshold(model: nn.Module, val: ImageSet, *, device: torch.device, dtype: torch.dtype | None) -> float:
    """The Youden threshold on ``val`` scored in ``dtype`` (what a bf16 validation pass would choose)."""
    logits, targets, _ = predict(model, val, device=device, dtype=dtype)
    return youden_threshold(torch.softmax(logits, dim=1)[:, 1], targets)


def _bn_pass(sites: Sequence[Site], *, device: torch.device, dtype: torch.dtype | None, reorder: int = 0) -> nn.Module:
    """Every site's BatchNorm pass on a copy of its model over a fresh training loader, then FedAvg
    (one site: its model). A fresh loader has the same batches every time (its seeded shuffle and
    augmentation restart), so fp32 and bf16 see the same batches; ``reorder`` shifts the seed (another
    batch order: the noise of the pass itself)."""
    done = []
    for model, data, settings in sites:
        local = copy.deepcopy(model)
        loader = make_train_loader(data, dataclasses.replace(settings, seed=settings.seed + reorder))
        update_bn_stats(local, loader, device=device, dtype=dtype)
        done.append((local, len(data)))
    return _average(done) if len(done) > 1 else done[0][0]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_case(name: str, case: Case, *, data_dir: Path, repeats: int = 3, device: torch.device | None = None,
             command: str = "", cache: Path | None = None) -> list[dict[str, Any]]:
    """Train the model of ``case`` in fp32, then measure every pass in fp32 and bf16 (module docstring).

    ``cache``: a folder where the trained sites' models are kept (``<case>.pt``) and read back by a
    later run of the same case (the evaluation is then re-measured without training again)."""
    device = device or torch.device("cpu")
    cfg = _config(case, data_dir)
    seed_everything(cfg.seed)
    splits = preflight(cfg, federated=False).splits
    if splits is None:
        raise RuntimeError(f"case {name}: no data")
    pool, _ = training_pool(splits.train.class_labels(), seed=cfg.seed, local_test_fraction=cfg.local_test_fraction)
    train = splits.train.subset(pool)
    model = initial_model(cfg, train)
    cached = cache / f"{name}.pt" if cache is not None else None
    start = time.perf_counter()
    if cached is not None and cached.exists():  # the same case trained before: its sites' models
        states = torch.load(cached, weights_only=True)
        sites = _layout(cfg, case, train)
        for (site_model, _, _), state in zip(sites, states["models"], strict=True):
            site_model.load_state_dict(state)
        train_seconds = float(states["train_seconds"])
        logger.info("case %s: trained models read from %s", name, cached)
    else:
        if case.sites:
            sites = _train_federated(cfg, model, train, device, sites=case.sites, alpha=case.alpha)
        else:
            sites = _train_pooled(cfg, model, train, device)
        train_seconds = time.perf_counter() - start
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"models": [m.state_dict() for m, _, _ in sites], "train_seconds": train_seconds}, cached)
    logger.info("case %s trained in %.0f s", name, train_seconds)
    # The weights every evaluation variant scores: the fp32 BatchNorm pass (the reference).
    reference = _bn_pass(sites, device=device, dtype=None)

    variants: dict[str, Callable[[], Any]] = {
        "eval-fp32": lambda: evaluate_at_validation_threshold(reference, splits.test, val=splits.val, device=device),
        "eval-bf16": lambda: evaluate_at_validation_threshold(reference, splits.test, val=splits.val, device=device,
                                                              dtype=torch.bfloat16),
        "bn-fp32": lambda: _bn_pass(sites, device=device, dtype=None),
        "bn-bf16": lambda: _bn_pass(sites, device=device, dtype=torch.bfloat16),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, Any] = {}
    for repeat in range(repeats + 1):  # the first repeat warms up (oneDNN kernels, allocator)
        for key, fn in variants.items():
            seconds, outputs[key] = _timed(fn)
            if repeat:
                times[key].append(seconds)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    reordered = _bn_pass(sites, device=device, dtype=None, reorder=7919)
    bn_fp32_model, bn_bf16_model = outputs["bn-fp32"], outputs["bn-bf16"]
    results = {
        ("eval", "fp32", "fp32"): _evaluate(reference, splits.val, splits.test, device=device, dtype=None),
        ("eval", "bf16", "bf16"): _evaluate(reference, splits.val, splits.test, device=device, dtype=torch.bfloat16),
        ("bn-reestimation", "fp32", "fp32"): _evaluate(bn_fp32_model, splits.val, splits.test, device=device,
                                                        dtype=None),
        ("bn-reestimation", "bf16", "fp32"): _evaluate(bn_bf16_model, splits.val, splits.test, device=device,
                                                        dtype=None),
        ("bn-reestimation", "bf16", "bf16"): _evaluate(bn_bf16_model, splits.val, splits.test, device=device,
                                                        dtype=torch.bfloat16),
        # the noise floor: the fp32 pass over another batch order (not timed)
        ("bn-reorder-noise", "fp32", "fp32"): _evaluate(reordered, splits.val, splits.test, device=device,
                                                                  dtype=None),
    }
    ref_metrics, ref_probs = results[("eval", "fp32", "fp32")]
    # Why the threshold is chosen on fp32 validation scores: what a bf16 validation pass would choose instead.
    val_threshold_shift = None
    if splits.test.num_classes == 2:
        val_threshold_shift = round(_val_threshold(reference, splits.val, device=device, dtype=torch.bfloat16)
                                    - _val_threshold(reference, splits.val, device=device, dtype=None), 4)
    dataset = Path(case.file).stem
    rows = []
    for (pass_name, dtype, eval_dtype), (metrics, probs) in results.items():
        timed = pass_name != "bn-reorder-noise"
        time_key = f"{'eval' if pass_name == 'eval' else 'bn'}-{dtype}"
        fp32_key = f"{'eval' if pass_name == 'eval' else 'bn'}-fp32"
        auc = metrics.get("auc", float("nan"))
        rows.append({
            "case": name, "model": cfg.model, "dataset": dataset, "sites": case.sites, "pass": pass_name,
            "dtype": dtype, "eval_dtype": eval_dtype, "test_auc": round(auc, 4),
            "auc_diff_vs_fp32": round(auc - ref_metrics.get("auc", float("nan")), 4),
            "test_accuracy": round(metrics["accuracy"], 4),
            "accuracy_diff_vs_fp32": round(metrics["accuracy"] - ref_metrics["accuracy"], 4),
            **{f"{key.replace('-', '_')}_diff_vs_fp32": round(metrics[key] - ref_metrics[key], 4)
               for key in ("balanced-accuracy", "sensitivity", "specificity") if key in metrics},
            "threshold_if_validation_in_bf16_diff": val_threshold_shift if pass_name == "eval" else None,
            "max_prob_diff": float(f"{(probs - ref_probs).abs().max().item():.3g}"),
            # binary: the validation-chosen decision threshold the round records (and a checkpoint keeps)
            "threshold": round(metrics["threshold"], 4) if "threshold" in metrics else None,
            "threshold_diff_vs_fp32": (round(metrics["threshold"] - ref_metrics["threshold"], 4)
                                       if "threshold" in metrics and "threshold" in ref_metrics else None),
            "seconds": round(seconds[time_key], 3) if timed else None,
            "speedup": round(seconds[fp32_key] / seconds[time_key], 2) if timed else None,
            "images": len(splits.val) + len(splits.test) if pass_name == "eval" else len(train),
            "train_seconds": round(train_seconds, 1), "repeats": repeats, "threads": torch.get_num_threads(),
            "native_bf16": native_bf16(device), "device": device.type,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "load": round(os.getloadavg()[0], 2), "measured_at": datetime.date.today().isoformat(),
            "command": command,
        })
    return rows


def threads_check(name: str, case: Case, *, data_dir: Path, repeats: int = 3, threads: Sequence[int] = (1, 2),
                  command: str = "") -> list[dict[str, Any]]:
    """Seconds of the evaluation and BatchNorm passes of ``case``'s model (untrained: the time does not
    depend on the weights) per torch thread count and dtype, interleaved; ``speedup`` is over 1 thread
    in the same dtype. Checks the one-thread-per-site setting with the process's ``OMP_WAIT_POLICY``."""
    device = torch.device("cpu")
    cfg = _config(case, data_dir)
    seed_everything(cfg.seed)
    splits = preflight(cfg, federated=False).splits
    if splits is None:
        raise RuntimeError(f"case {name}: no data")
    model = initial_model(cfg, splits.train)
    settings = round_settings(cfg, server_round=1, site_index=-1)
    sites: list[Site] = [(model, splits.train, settings)]
    before = torch.get_num_threads()
    times: dict[tuple[str, str, int], list[float]] = {}
    try:
        for repeat in range(repeats + 1):
            for count in threads:
                torch.set_num_threads(count)
                for dtype_name, dtype in DTYPES.items():
                    for pass_name, fn in (
                        ("eval", lambda d=dtype: _evaluate(model, splits.val, splits.test, device=device, dtype=d)),
                        ("bn-reestimation", lambda d=dtype: _bn_pass(sites, device=device, dtype=d)),
                    ):
                        seconds, _ = _timed(fn)
                        if repeat:
                            times.setdefault((pass_name, dtype_name, count), []).append(seconds)
    finally:
        torch.set_num_threads(before)
    rows = []
    for (pass_name, dtype_name, count), values in times.items():
        median = statistics.median(values)
        one = statistics.median(times[(pass_name, dtype_name, threads[0])])
        rows.append({
            "case": f"{name}-threads", "model": cfg.model, "dataset": Path(case.file).stem, "pass": pass_name,
            "dtype": dtype_name, "threads": count, "seconds": round(median, 3), "speedup": round(one / median, 2),
            "repeats": repeats, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "load": round(os.getloadavg()[0], 2), "measured_at": datetime.date.today().isoformat(),
            "command": command,
        })
    return rows


def _print(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'case':<34}{'pass':<18}{'dtype':<6}{'eval':<6}{'AUC':>7}{'dAUC':>8}{'acc':>7}{'max|dp|':>9}"
          f"{'dthr':>8}{'s':>8}{'speedup':>9}")
    for r in rows:
        print(f"{r['case']:<34}{r['pass']:<18}{r['dtype']:<6}{r['eval_dtype']:<6}{r['test_auc']:>7.4f}"
              f"{r['auc_diff_vs_fp32']:>+8.4f}{r['test_accuracy']:>7.3f}{r['max_prob_diff']:>9.3g}"
              f"{fmt(r['threshold_diff_vs_fp32'], 4, reason='-'):>8}"
              f"{fmt(r['seconds'], 2, reason='-'):>8}{fmt(r['speedup'], 2, reason='-'):>9}", flush=True)


def _write(path: Path, rows: list[dict[str, Any]], *, replace_threads: bool) -> None:
    """Section ``precision`` := ``rows`` plus the earlier rows of the other kind (precision cases or
    thread checks), so that either command leaves the other's figures in place."""
    earlier = read_results_section(path, SECTION) or []
    kept = [r for r in earlier if r["case"].endswith("-threads") != replace_threads]
    write_results_section(path, SECTION, kept + rows if replace_threads else rows + kept)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train each case, measure, print the table, write the results section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/medmnist"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path("docs/bench/results.json"))
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-cache/precision"),
                        help="folder for the trained models (a later run re-measures without training); '' disables")
    parser.add_argument("--threads-check", type=int, nargs="+", metavar="N", default=None,
                        help="instead: time the passes of the first case's model at these torch thread counts "
                             "(e.g. 1 2); its rows replace the earlier threads rows in the section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = bench_command("medfed.simulations.bench.precision", argv if argv is not None else sys.argv[1:])
    if args.threads_check:
        name = args.cases[0]
        found = threads_check(name, CASES[name], data_dir=args.data_dir, repeats=args.repeats,
                              threads=args.threads_check, command=command.strip())
        for r in found:
            print(f"{r['case']:<40}{r['pass']:<17}{r['dtype']:<6}{r['threads']:>3} thread(s) {r['seconds']:>8.3f} s"
                  f"{r['speedup']:>7.2f}x", flush=True)
        _write(args.results, found, replace_threads=True)
        print(f"written: {args.results} section {SECTION!r}")
        return
    rows: list[dict[str, Any]] = []
    for name in args.cases:
        rows += run_case(name, CASES[name], data_dir=args.data_dir, repeats=args.repeats, command=command.strip(),
                         cache=args.cache if str(args.cache) not in ("", ".") else None)
        _print([r for r in rows if r["case"] == name])
        _write(args.results, rows, replace_threads=False)  # after every case: a long run keeps what it measured
    bf16 = [r for r in rows if "bf16" in (r["dtype"], r["eval_dtype"])]
    held = all(np.isfinite(r["auc_diff_vs_fp32"]) and abs(r["auc_diff_vs_fp32"]) <= 0.01 for r in bf16)
    print(f"bf16 AUC within 0.01 of fp32 in every bf16 row: {held}")
    print(f"written: {args.results} section {SECTION!r}")


if __name__ == "__main__":
    main()
