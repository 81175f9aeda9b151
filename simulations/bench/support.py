"""Helpers the benchmark sections share: data slices, number formatting, small PNG plots.

Never imports Flower; matplotlib is imported only when a plot is drawn (Agg backend, no display).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfed.shared.files import write_atomically

__all__ = [
    "fmt", "mean_spread", "ratio", "slice_npz", "medmnist_file", "line_plot", "read_results_section",
    "write_results_section", "NOT_MEASURED", "SCRATCH_OPTIONS", "bench_command",
]

logger = logging.getLogger(__name__)

NOT_MEASURED = "n/a: not measured in this profile"

SCRATCH_OPTIONS: tuple[str, ...] = ("--run-dir", "--workdir")
"""Benchmark options naming a scratch folder: they do not change a figure, so a recorded command
leaves them out (each benchmark has a default)."""


def bench_command(module: str, argv: Sequence[str]) -> str:
    """The command line a ``results.json`` row records, as anyone can rerun it from the repository.

    ``python -m <module> <argv>`` without :data:`SCRATCH_OPTIONS` and their values, and with
    absolute paths at or below the current folder's parent (the checkout, ``../shared``) written
    relative to the current folder: no machine's own paths in the record.
    """
    parts: list[str] = []
    skip = False
    base = Path.cwd().parent
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in SCRATCH_OPTIONS:
            skip = "=" not in arg
            continue
        if os.path.isabs(arg) and Path(arg).resolve().is_relative_to(base):
            arg = os.path.relpath(arg)
        parts.append(arg)
    return " ".join(["python -m", module, *parts])


def fmt(value: float | None, digits: int = 3, *, reason: str = "n/a: no value was produced") -> str:
    """``value`` with ``digits`` decimals, or ``reason`` when it is missing or not finite."""
    if value is None or not math.isfinite(float(value)):
        return reason
    return f"{float(value):.{digits}f}"


def mean_spread(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± sd (n=k)"`` over the finite ``values`` (sample standard deviation); one value alone."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return "n/a: every run of this cell failed or produced no value"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(finite):.{digits}f} ± {statistics.stdev(finite):.{digits}f} (n={len(finite)})"


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> str:
    """``numerator / denominator`` formatted, or the reason it cannot be formed."""
    if numerator is None or denominator is None:
        return "n/a: one side was not measured"
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return "n/a: one side is zero or not finite"
    return f"{numerator / denominator:.{digits}f}"


def _stratified(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices (at least one per class) in the class proportions of ``labels``, sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    chosen = []
    for c, n in zip(classes, counts, strict=True):
        k = max(1, int(round(count * n / len(labels))))
        chosen.append(rng.permutation(np.flatnonzero(labels == c))[:k])
    return np.sort(np.concatenate(chosen))


def slice_npz(source: Path, target: Path, *, train: int, val: int, test: int, seed: int) -> Path:
    """Write a class-stratified slice of a MedMNIST ``.npz`` file (same keys, same dtypes).

    Parameters
    ----------
    source
        A MedMNIST-style file with ``{train,val,test}_{images,labels}``; images ``(N, *spatial)``.
    target
        The slice to write (overwritten).
    train, val, test
        Images per split (at least one per class; a split smaller than asked is taken whole).
    seed
        Seeds the choice.
    """
    rng = np.random.default_rng(seed)
    sizes = {"train": train, "val": val, "test": test}
    with np.load(source) as data:
        arrays: dict[str, np.ndarray] = {}
        for split, size in sizes.items():
            labels = np.asarray(data[f"{split}_labels"]).reshape(len(data[f"{split}_labels"]), -1)[:, 0]
            idx = np.arange(len(labels)) if size >= len(labels) else _stratified(labels, size, rng)
            arrays[f"{split}_images"] = np.asarray(data[f"{split}_images"])[idx]
            arrays[f"{split}_labels"] = np.asarray(data[f"{split}_labels"])[idx]
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, **arrays)
    return target


def medmnist_file(data_dir: Path, name: str, *, workdir: Path, train: int, val: int, test: int, seed: int = 0) -> Path:
    """``data_dir / name``, or a slice of it under ``workdir`` when any of ``train/val/test`` is > 0.

    Raises
    ------
    FileNotFoundError
        If the file is not in ``data_dir``; the message names the file and the folder option.
    """
    source = data_dir / name
    if not source.exists():
        raise FileNotFoundError(
            f"{name} is not in the data folder {data_dir}: put the MedMNIST files there or pass --data-dir."
        )
    if train <= 0 and val <= 0 and test <= 0:
        return source
    target = workdir / "data" / f"{source.stem}-slice-{train}-{val}-{test}-s{seed}.npz"
    if not target.exists():
        slice_npz(source, target, train=train, val=val, test=test, seed=seed)
    return target


def line_plot(
    path: Path,
    *,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: Mapping[str, float] | None = None,
    logx: bool = False,
) -> Path:
    """A small PNG (about 500x330 px): one line per ``series`` entry ``label -> (x, y)``.

    ``hlines`` draws dashed horizontal reference lines (``label -> y``). Non-finite points are
    left out. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(5.0, 3.3), dpi=100)
    try:
        for label, (xs, ys) in series.items():
            points = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(float(y))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1.2, label=label)
        for label, y in (hlines or {}).items():
            if math.isfinite(y):
                ax.axhline(y, linestyle="--", linewidth=1.0, color="grey", label=label)
        if logx:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({float(x) for xs, _ in series.values() for x in xs}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif all(float(x).is_integer() for xs, _ in series.values() for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(textwrap.fill(title, 72), fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _read_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}): fix it or move it aside; "
            "nothing was written."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of sections; move it aside to start a new one.")
    return data


def read_results_section(path: Path, section: str) -> Any:
    """Section ``section`` of the results file ``path`` (``docs/bench/results.json``), ``None`` if absent.

    Raises
    ------
    ValueError
        The file is not a JSON object (naming the file).
    """
    return _read_results(path).get(section)


def write_results_section(path: Path, section: str, value: Any) -> Path:
    """Set ``section`` of the results file ``path`` to ``value``; the other sections are kept as they are.

    The file is one JSON object, section name -> that section's data, written atomically
    (sorted sections, two-space indent).

    Raises
    ------
    ValueError
        The existing file is not a JSON object (it is left untouched).
    """
    data = _read_results(path)
    data[section] = value
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomically(path, lambda fh: fh.write(text.encode()), mode=0o644)
    return path


def append_results_rows(path: Path, section: str, rows: list[dict[str, Any]]) -> Path:
    """Append ``rows`` to the list in section ``section`` of ``path``; everything else is kept.

    Raises
    ------
    ValueError
        The existing file is not a JSON object, or the section is not a list (naming them).
    """
    existing = read_results_section(path, section) or []
    if not isinstance(existing, list):
        raise ValueError(f"{path}: section {section!r} is not a list of rows; move it aside to append.")
    return write_results_section(path, section, [*existing, *rows])
