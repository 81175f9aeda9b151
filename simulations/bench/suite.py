"""``medfed bench``: the benchmark suite, measured side by side in one run, written into BENCHMARKS.md.

Three questions, answered with ratios measured in one process on one machine:

* quality: how close does federated training get to training on the pooled data
  (section ``quality``: pooled, local-only, FedAvg, FedProx, FedAdam over seeds);
* privacy cost: test AUC under DP-SGD at several epsilons, DP-SGD epoch time, SecAgg+ round time
  and upload bytes (sections ``privacy-dp`` and ``secagg``);
* scale and overhead: Flower's simulation engine against the same work in a plain loop
  (``overhead``), medfed beside a minimal Flower app and NVIDIA FLARE (``peers``), and the
  sections other modules plug in (``scale``, ``robustness``).

Sections
--------
A section is a function ``section(ctx: BenchContext) -> SectionResult``: it reads its sizes from
``ctx.profile`` and returns tables (rows of text cells) and the plots it wrote under
``ctx.plots_dir``. :data:`SECTIONS` maps a section name to the *module and function* that
implement it, imported only when the section runs. To plug in a new section (the hook)::

    # in simulations/bench/scale.py
    def bench_section(ctx: BenchContext) -> SectionResult: ...

    # in this file, SECTIONS (already present for "scale" and "robustness"):
    "scale": SectionSpec(title=..., module="medfed.simulations.bench.scale", function="bench_section")

or, from other code, :func:`register_section`. A section whose module (or function) is missing
still gets a table: one row whose cells say ``not available: <reason>``; a section that raises
gets ``failed: <error>``. Both count as a stated reason in :func:`incomplete_cells`, the check
that every cell is filled or says why it is not.

Output
------
The rendered sections go into marked regions ``<!-- bench:NAME -->`` ... ``<!-- /bench -->`` of
the output Markdown file (``BENCHMARKS.md``): everything outside the markers (the hand-written
notes) is kept as it is; a region not yet in the file is appended at its end. Plots (small
PNGs, matplotlib) go to ``--plots`` and are linked relative to the output file.

Usage::

    medfed bench --profile quick --out BENCHMARKS.md --plots docs/bench/
    python -m medfed.simulations.bench --profile full --out BENCHMARKS.md --plots docs/bench/
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from medfed.shared.files import write_atomically
from medfed.simulations.bench.figures import check_rows
from medfed.simulations.bench.support import write_results_section

__all__ = [
    "BenchContext",
    "PROFILES",
    "Profile",
    "REASON_PREFIXES",
    "SECTIONS",
    "SectionResult",
    "SectionSpec",
    "Table",
    "Target",
    "incomplete_cells",
    "register_section",
    "render_section",
    "run_bench",
    "write_regions",
    "main",
]

logger = logging.getLogger(__name__)

REASON_PREFIXES: tuple[str, ...] = ("n/a:", "not available:", "not run:", "failed:")
"""A cell that starts with one of these (followed by the reason) counts as filled."""

_EMPTY_VALUES = frozenset({"", "nan", "none", "-", "n/a", "?", "inf", "-inf"})


# --------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """The sizes of every section of one benchmark profile.

    Parameters
    ----------
    name
        ``"quick"`` (CI smoke: tiny data slices, 2-3 sites, 1-2 rounds) or ``"full"`` (the figures
        of BENCHMARKS.md).
    seeds
        Quality runs repeat over these seeds (mean and spread); other sections use the first.
    quality_recipes
        Recipe names of :data:`medfed.simulations.bench.quality.RECIPES` (BreastMNIST, AdrenalMNIST3D).
    quality_sites, quality_splits, quality_strategies
        The grid: number of sites, ``"iid"`` / ``"dirichlet"`` (alpha 0.5), Flower strategies.
    quality_rounds, quality_rounds_3d, quality_local_epochs
        Federated schedule (2D, 3D recipes); pooled and local-only runs train the same number of
        epochs.
    slice_train, slice_val, slice_test
        ``> 0``: a seeded, class-stratified slice of that many images per split (quick profile);
        ``0``: the whole file.
    image_size_3d
        Side length 3D volumes are resized to (``0`` keeps 28^3).
    dp_epsilons, dp_sites, dp_rounds, dp_local_epochs
        Federated DP-SGD runs (BreastMNIST): one run per epsilon plus one without DP.
    dp_speed_models, dp_speed_samples, dp_speed_repeats
        DP-SGD epoch-time ratio (:func:`medfed.simulations.bench.dp.epoch_speed`, ``hooks`` mode).
    secagg_sites, secagg_params, secagg_rounds
        SecAgg+ protocol benchmark (:func:`medfed.simulations.bench.secagg.run_bench`).
    secagg_train_model
        Also time SecAgg+ with real sites training this model one local epoch (``""``: skip).
    peer_sites, peer_rounds, peer_local_epochs
        The common task of the overhead and peer comparison (BreastMNIST, simplecnn, IID).
    nvflare
        Install NVIDIA FLARE into a separate virtual environment and run its simulator.
    scale_sites
        Site counts for the ``scale`` section (its module reads them), every site sampled.
    scale_large_sites, scale_fraction
        One more ``scale`` run with this many sites, ``scale_fraction`` of them sampled per
        round (``0``: skipped).
    robust_strategies, robust_sites, robust_rounds, robust_samples, robust_clean
        The poisoning benchmark (:func:`medfed.simulations.bench.robust.run_bench`); ``robust_clean``:
        also run each strategy without the poisoning site.
    """

    name: str
    seeds: tuple[int, ...]
    quality_recipes: tuple[str, ...]
    quality_sites: tuple[int, ...]
    quality_splits: tuple[str, ...]
    quality_strategies: tuple[str, ...]
    quality_rounds: int
    quality_rounds_3d: int
    quality_local_epochs: int
    slice_train: int
    slice_val: int
    slice_test: int
    image_size_3d: int
    dp_epsilons: tuple[float, ...]
    dp_sites: int
    dp_rounds: int
    dp_local_epochs: int
    dp_speed_models: tuple[str, ...]
    dp_speed_samples: int
    dp_speed_repeats: int
    secagg_sites: tuple[int, ...]
    secagg_params: tuple[int, ...]
    secagg_rounds: int
    secagg_train_model: str
    peer_sites: int
    peer_rounds: int
    peer_local_epochs: int
    nvflare: bool
    scale_sites: tuple[int, ...] = (4, 16, 64)
    scale_large_sites: int = 0
    scale_fraction: float = 0.1
    robust_strategies: tuple[str, ...] = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
    robust_sites: int = 7
    robust_rounds: int = 3
    robust_samples: int = 840
    robust_clean: bool = True


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        seeds=(0,),
        quality_recipes=("breastmnist", "adrenalmnist3d"),
        quality_sites=(2,),
        quality_splits=("dirichlet",),  # the split that matters; each split adds every strategy's runs
        quality_strategies=("fedavg", "fedprox", "fedadam"),
        quality_rounds=2,
        quality_rounds_3d=2,
        quality_local_epochs=1,
        slice_train=96,
        slice_val=32,
        slice_test=64,
        image_size_3d=16,
        dp_epsilons=(1.0, 3.0, 8.0),
        dp_sites=2,
        dp_rounds=2,
        dp_local_epochs=1,
        dp_speed_models=("simplecnn",),
        dp_speed_samples=32,
        dp_speed_repeats=1,
        secagg_sites=(3,),
        secagg_params=(100_000,),
        secagg_rounds=2,
        secagg_train_model="",
        peer_sites=2,
        peer_rounds=2,
        peer_local_epochs=1,
        nvflare=False,
        scale_sites=(4,),  # one size: each size is its own child process and Ray start (about 30 s)
        robust_strategies=("fedmedian",),
        robust_sites=3,
        robust_rounds=1,
        robust_samples=120,
        robust_clean=False,  # each run is a start of the engine (about 10 s); the full profile runs both
    ),
    "full": Profile(
        name="full",
        seeds=(0, 1, 2),
        quality_recipes=("breastmnist", "adrenalmnist3d"),
        quality_sites=(4, 8),
        quality_splits=("iid", "dirichlet"),
        quality_strategies=("fedavg", "fedprox", "fedadam"),
        quality_rounds=10,
        quality_rounds_3d=4,
        quality_local_epochs=1,
        slice_train=0,
        slice_val=0,
        slice_test=0,
        image_size_3d=16,
        dp_epsilons=(1.0, 3.0, 8.0),
        dp_sites=4,
        dp_rounds=10,
        dp_local_epochs=3,
        dp_speed_models=("simplecnn", "resnet18"),
        dp_speed_samples=64,
        dp_speed_repeats=3,
        secagg_sites=(4, 8, 16),
        secagg_params=(1_000_000, 7_000_000),
        secagg_rounds=3,
        secagg_train_model="unet",  # 1.6M parameters: the "about 1M" model, really training
        peer_sites=4,
        peer_rounds=5,
        peer_local_epochs=1,
        nvflare=True,
        scale_sites=(4, 16, 64),
        scale_large_sites=1000,
    ),
}
"""The two profiles. ``full`` is sized for about 45-60 minutes on 2 idle CPU cores."""


# --------------------------------------------------------------------------- results
@dataclass
class Table:
    """One Markdown table of a section.

    Parameters
    ----------
    title
        A short heading (rendered in bold above the table).
    columns
        Column headers.
    rows
        Text cells, one list per row, each as long as ``columns``. A value that could not be
        measured must say why (``"n/a: <reason>"``, see :data:`REASON_PREFIXES`).
    notes
        Sentences printed under the table (conditions, what limits a figure).
    """

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append a row; every cell is turned into text."""
        if len(cells) != len(self.columns):
            raise ValueError(
                f"table {self.title!r}: a row has {len(cells)} cells but there are {len(self.columns)} "
                f"columns ({', '.join(self.columns)})."
            )
        self.rows.append([str(c) for c in cells])

    def add_unavailable(self, reason: str, *leading: object) -> None:
        """Append a row of ``leading`` cells, ``reason`` in the next and "n/a: see left" in the rest."""
        rest = len(self.columns) - len(leading) - 1
        if rest < 0:
            raise ValueError(f"table {self.title!r}: {len(leading)} leading cells leave no room for the reason.")
        self.add(*leading, reason, *(["n/a: see left"] * rest))


@dataclass(frozen=True)
class Target:
    """A target set by another issue, checked against a figure of this run.

    Parameters
    ----------
    name
        What is measured (``"overhead ratio"``).
    source
        Where the target comes from (``"issue 2"``).
    goal
        The target as text (``"<= 1.3"``).
    measured
        The figure of this run as text (or the reason there is none).
    met
        ``True`` / ``False``; ``None`` when nothing was measured.
    limits
        What limits the figure when the target is not met (said plainly in BENCHMARKS.md).
    """

    name: str
    source: str
    goal: str
    measured: str
    met: bool | None
    limits: str = ""

    @classmethod
    def check(cls, name: str, source: str, *, value: float | None, at_most: float | None = None,
              at_least: float | None = None, digits: int = 2, limits: str = "") -> Target:
        """A target ``value <= at_most`` or ``value >= at_least``; ``met`` is ``None`` for a missing value."""
        goal = f"<= {at_most:g}" if at_most is not None else f">= {at_least:g}"
        if value is None or value != value:
            return cls(name, source, goal, "n/a: not measured in this run", None, limits)
        met = value <= at_most if at_most is not None else value >= at_least  # type: ignore[operator]
        return cls(name, source, goal, f"{value:.{digits}f}", bool(met), "" if met else limits)


@dataclass
class SectionResult:
    """What a section returns.

    Parameters
    ----------
    tables
        Its tables (at least one).
    plots
        PNG files it wrote (under ``ctx.plots_dir``).
    commands
        Shell commands that reproduce the section's figures.
    notes
        Sentences printed after the tables.
    targets
        Targets of other issues this section's figures are checked against (gathered into
        one table, region ``targets``).
    figures
        ``results.json`` section -> rows: the section's figures, machine-readable (schema:
        :mod:`medfed.simulations.bench.figures`), written to ``results.json`` in the plots folder.
    seconds
        Wall time of the section (set by the orchestrator).
    """

    tables: list[Table] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    figures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class BenchContext:
    """What every section receives.

    Parameters
    ----------
    profile
        The sizes of this run.
    workdir
        Scratch folder for run directories, data slices and virtual environments (removed at
        the end unless ``--keep-workdir``).
    plots_dir
        Where sections write their PNGs.
    data_dir
        The MedMNIST folder (``../shared/data/medmnist`` by default).
    command
        The command line of this benchmark run (for "reproduce with").
    out
        The Markdown file this run writes (quoted in the per-section commands).
    cache
        Results shared between sections of one run (see :meth:`memo`).
    """

    profile: Profile
    workdir: Path
    plots_dir: Path
    data_dir: Path
    command: str
    out: Path = Path("BENCHMARKS.md")
    cache: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run; later calls with the same ``key`` return the same value.

        Sections share expensive runs this way (the overhead and peer sections time the same
        medfed simulation).
        """
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def reproduce(self, section: str) -> str:
        """The command that re-measures ``section`` alone into the same file and plot folder."""
        return (f"medfed bench --profile {self.profile.name} --section {section} --out {self.out} "
                f"--plots {self.plots_dir}")

    def plot_path(self, name: str) -> Path:
        """``plots_dir / name`` (the folder is created)."""
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        return self.plots_dir / name


SectionFn = Callable[[BenchContext], SectionResult]


@dataclass(frozen=True)
class SectionSpec:
    """Where a section lives; imported only when it runs.

    Parameters
    ----------
    title
        Heading in BENCHMARKS.md.
    module, function
        ``importlib.import_module(module).<function>(ctx)`` returns its :class:`SectionResult`.
    columns
        Columns of the placeholder table when the section is not available.
    owner
        Who provides the module when it is missing (quoted in the reason).
    """

    title: str
    module: str
    function: str = "bench_section"
    columns: tuple[str, ...] = ("figure", "value")
    owner: str = ""


SECTIONS: dict[str, SectionSpec] = {
    "quality": SectionSpec(
        title="Quality: federated vs pooled vs local-only",
        module="medfed.simulations.bench.quality",
        function="quality_section",
    ),
    "privacy-dp": SectionSpec(
        title="Privacy cost: DP-SGD accuracy and time",
        module="medfed.simulations.bench.dp",
        function="dp_section",
    ),
    "secagg": SectionSpec(
        title="Privacy cost: SecAgg+ round time and upload",
        module="medfed.simulations.bench.secagg",
        function="secagg_section",
    ),
    "overhead": SectionSpec(
        title="Federation overhead: simulation vs plain loop",
        module="medfed.simulations.bench.overhead",
        function="overhead_section",
    ),
    "peers": SectionSpec(
        title="Peers: medfed, a minimal Flower app, NVIDIA FLARE",
        module="medfed.simulations.bench.peers",
        function="peers_section",
    ),
    "scale": SectionSpec(
        title="Scale: seconds per round and peak memory vs sites",
        module="medfed.simulations.bench.scale",
        function="bench_section",
        columns=("sites", "model", "seconds per round", "peak memory (MiB)"),
    ),
    "throughput": SectionSpec(
        title="Training throughput on CPU: images per second per core",
        module="medfed.simulations.bench.throughput",
        function="bench_section",
        columns=("model", "dtype", "threads", "train images/s"),
    ),
    "robustness": SectionSpec(
        title="Robustness: poisoned sites",
        module="medfed.simulations.bench.robust",
        function="bench_section",
        columns=("attack", "defence", "test AUC"),
    ),
}
"""Section name -> where it is implemented, in the order they are run and written."""


def register_section(name: str, spec: SectionSpec, *, replace: bool = False) -> None:
    """Add (or with ``replace``, change) a section of :data:`SECTIONS`.

    Raises
    ------
    ValueError
        If ``name`` is taken and ``replace`` is false, or is not usable as a marker name.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"section name {name!r} is invalid: use lower-case letters, digits and '-'.")
    if name in SECTIONS and not replace:
        raise ValueError(f"section {name!r} is already registered; pass replace=True to change it.")
    SECTIONS[name] = spec


def _load_section(spec: SectionSpec) -> tuple[SectionFn | None, str]:
    """The section function, or ``None`` and why it is not available."""
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as err:
        if err.name and spec.module.startswith(err.name):
            owner = f" ({spec.owner})" if spec.owner else ""
            return None, f"not available: module {spec.module} is not in this tree{owner}"
        return None, f"not available: {spec.module} needs the missing module {err.name}"
    function = getattr(module, spec.function, None)
    if not callable(function):
        return None, f"not available: {spec.module} has no function {spec.function}(ctx)"
    return function, ""


def _placeholder(spec: SectionSpec, reason: str) -> SectionResult:
    table = Table(title=spec.title, columns=list(spec.columns))
    table.add_unavailable(reason)
    return SectionResult(tables=[table])


def run_section(name: str, ctx: BenchContext) -> SectionResult:
    """Run one registered section; a missing module or an error becomes a table that says so."""
    if name not in SECTIONS:
        raise ValueError(f"unknown section {name!r}. Valid sections: {', '.join(SECTIONS)}.")
    spec = SECTIONS[name]
    function, reason = _load_section(spec)
    start = time.perf_counter()
    if function is None:
        logger.warning("section %s: %s", name, reason)
        result = _placeholder(spec, reason)
    else:
        logger.warning("section %s: running (%s profile) ...", name, ctx.profile.name)
        try:
            result = function(ctx)
        except Exception as err:  # one failed section must not lose the others' figures
            first = (str(err).splitlines() or [""])[0][:200]
            logger.error("section %s failed: %s: %s\n%s", name, type(err).__name__, first, traceback.format_exc())
            result = _placeholder(spec, f"failed: {type(err).__name__}: {first}".replace("|", "/"))
    result.seconds = time.perf_counter() - start
    logger.warning("section %s: done in %.0f s", name, result.seconds)
    return result


# --------------------------------------------------------------------------- checking
def _cell_missing(cell: str) -> bool:
    text = cell.strip()
    lowered = text.lower()
    for prefix in REASON_PREFIXES:
        if lowered.startswith(prefix):
            return not text[len(prefix):].strip()  # a prefix without a reason is still empty
    return lowered in _EMPTY_VALUES or "nan" in re.findall(r"[a-z]+", lowered)


def incomplete_cells(results: dict[str, SectionResult]) -> list[str]:
    """Every cell that is empty (or ``nan``) without a stated reason, as ``section/table/row/column``.

    A cell is filled when it holds a value, or starts with one of :data:`REASON_PREFIXES`
    followed by a reason.
    """
    problems: list[str] = []
    for name, result in results.items():
        if not result.tables:
            problems.append(f"{name}: no table")
        for table in result.tables:
            if not table.rows:
                problems.append(f"{name}/{table.title}: no rows")
            for i, row in enumerate(table.rows):
                if len(row) != len(table.columns):
                    problems.append(f"{name}/{table.title}/row {i}: {len(row)} cells, {len(table.columns)} columns")
                for column, cell in zip(table.columns, row, strict=False):
                    if _cell_missing(cell):
                        problems.append(f"{name}/{table.title}/row {i}/{column}: {cell!r}")
    return problems


# --------------------------------------------------------------------------- Markdown
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(table: Table) -> str:
    """A Markdown table with its title and notes."""
    lines = [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
    lines.append("| " + " | ".join("---" for _ in table.columns) + " |")
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows)
    if table.notes:
        lines.append("")
        lines.extend(table.notes)
    return "\n".join(lines)


def render_section(name: str, result: SectionResult, *, out_dir: Path) -> str:
    """Markdown of one section: heading, tables, plots (linked relative to ``out_dir``), commands."""
    spec = SECTIONS.get(name)
    title = spec.title if spec else name
    parts = [f"### {title}", "", f"_Section `{name}`, {result.seconds:.0f} s in this run._", ""]
    for table in result.tables:
        parts += [render_table(table), ""]
    for plot in result.plots:
        rel = os.path.relpath(plot, out_dir)
        parts += [f"![{plot.stem}]({Path(rel).as_posix()})", ""]
    parts += [note for note in result.notes] + ([""] if result.notes else [])
    if result.commands:
        parts += ["Reproduce:", "", "```bash", *result.commands, "```", ""]
    return "\n".join(parts).rstrip() + "\n"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "monai", "opacus", "flwr", "numpy", "ray", "matplotlib"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "unknown"


def _load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def render_conditions(ctx: BenchContext, *, started: datetime, wall: float, load_start: str,
                      results: dict[str, SectionResult]) -> str:
    """The conditions block: machine, versions, seeds, command, load, time per section."""
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    timings = ", ".join(f"{name} {r.seconds:.0f} s" for name, r in results.items())
    return "\n".join(
        [
            f"## Benchmark suite (`medfed bench`, profile `{ctx.profile.name}`)",
            "",
            "Generated by the command below; every figure in the sections that follow was measured in "
            "this one run, on this one machine. Compare ratios, not absolute seconds.",
            "",
            "| condition | value |",
            "| --- | --- |",
            f"| command | `{_md_cell(ctx.command)}` |",
            f"| date (UTC) | {started.strftime('%Y-%m-%d %H:%M')} |",
            f"| machine | {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({_md_cell(_cpu_model())}), "
            f"{_memory_gib()} RAM, no GPU used |",
            f"| load average (1, 5, 15 min) | start {load_start}; end {_load()} |",
            f"| versions | {versions} |",
            f"| seeds | {', '.join(str(s) for s in ctx.profile.seeds)} (quality); {ctx.profile.seeds[0]} elsewhere |",
            f"| wall time | {wall / 60:.1f} min ({timings}) |",
            "",
        ]
    )


def render_targets(results: dict[str, SectionResult], *, profile: str = "full") -> str:
    """One table of every section's :class:`Target`: met, not met (with what limits it), or not measured."""
    lines = ["### Targets from the other issues", ""]
    if profile != "full":
        lines += [
            f"Profile `{profile}`: tiny data slices and 1-2 rounds, a smoke test of the machinery. These checks are "
            "not the project's figures; those come from `--profile full`.",
            "",
        ]
    lines += [
        "| figure | target | source | measured | met? | what limits it |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    targets = [t for r in results.values() for t in r.targets]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[t.met]
        lines.append(f"| {_md_cell(t.name)} | {_md_cell(t.goal)} | {_md_cell(t.source)} | {_md_cell(t.measured)} | "
                     f"{met} | {_md_cell(t.limits) or '-'} |")
    if not targets:
        lines.append("| n/a: no section with a target ran | | | | | |")
    return "\n".join(lines) + "\n"


_REGION = re.compile(r"<!-- bench:(?P<name>[a-z0-9-]+) -->\n?(?P<body>.*?)<!-- /bench -->", re.DOTALL)


def write_regions(path: Path, regions: dict[str, str]) -> None:
    """Put each ``regions[name]`` between ``<!-- bench:name -->`` and ``<!-- /bench -->`` in ``path``.

    Text outside the markers is kept byte for byte; regions the file lacks are appended at its
    end, in the order given; regions of the file not in ``regions`` are left as they are.
    """
    text = path.read_text() if path.exists() else ""
    seen: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in regions:
            return match.group(0)
        seen.add(name)
        return f"<!-- bench:{name} -->\n{regions[name].rstrip()}\n<!-- /bench -->"

    text = _REGION.sub(replace, text)
    missing = [name for name in regions if name not in seen]
    if missing:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "")
        text += "\n\n".join(f"<!-- bench:{n} -->\n{regions[n].rstrip()}\n<!-- /bench -->" for n in missing)
        text += "\n"
    write_atomically(path, lambda fh: fh.write(text.encode()), mode=0o644)  # a crash keeps the old notes


# --------------------------------------------------------------------------- running
def run_bench(
    *,
    profile: Profile,
    out: Path,
    plots_dir: Path,
    data_dir: Path,
    sections: Sequence[str] | None = None,
    workdir: Path | None = None,
    command: str = "",
) -> dict[str, SectionResult]:
    """Run ``sections`` (default: all of :data:`SECTIONS`) and write them into ``out``.

    Parameters
    ----------
    profile
        Sizes (see :data:`PROFILES`).
    out
        The Markdown file to update (created when missing); see :func:`write_regions`.
    plots_dir
        Folder for the PNG plots.
    data_dir
        The MedMNIST folder.
    sections
        Names of :data:`SECTIONS` to run, in this order.
    workdir
        Scratch folder (default: a temporary folder, removed afterwards).
    command
        The command line quoted under "conditions".

    Returns
    -------
    dict
        Section name -> :class:`SectionResult`.

    Raises
    ------
    ValueError
        If a section name is unknown.
    """
    names = list(sections) if sections else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}. Valid sections: {', '.join(SECTIONS)}.")
    started, load_start, t0 = datetime.now(UTC), _load(), time.perf_counter()
    owned = workdir is None
    scratch = Path(tempfile.mkdtemp(prefix="medfed-bench-")) if owned else Path(workdir)  # type: ignore[arg-type]
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(
        profile=profile,
        workdir=scratch,
        plots_dir=plots_dir,
        data_dir=data_dir,
        command=command or f"medfed bench --profile {profile.name} --out {out} --plots {plots_dir}",
        out=out,
    )
    results: dict[str, SectionResult] = {}
    out_dir = out.resolve().parent
    # A run of some sections only must not replace the conditions and targets of a complete run.
    partial = set(names) != set(SECTIONS) and out.exists() and "<!-- bench:targets -->" in out.read_text()

    def write() -> None:
        """Write what has run so far (after every section: a long run that is cut short keeps
        the sections it finished)."""
        wall = time.perf_counter() - t0
        regions = {name: render_section(name, result, out_dir=out_dir) for name, result in results.items()}
        if partial:  # keep the last complete run's conditions and targets; say when this section ran
            stamp = started.strftime("%Y-%m-%d %H:%M")
            for name in results:
                regions[name] += (
                    f"\n_Re-run alone ({stamp} UTC, `--section {name}`, profile `{profile.name}`): the conditions "
                    "and targets tables above are from the last run of every section._\n"
                )
        else:
            regions["conditions"] = render_conditions(
                ctx, started=started, wall=wall, load_start=load_start, results=results
            )
            regions["targets"] = render_targets(results, profile=profile.name)
        gaps = incomplete_cells(results)
        if gaps and "conditions" in regions:
            regions["conditions"] += "\n**Incomplete cells** (no value, no reason): " + "; ".join(gaps) + "\n"
        write_regions(out, regions)
        for result in results.values():
            for key, rows in result.figures.items():
                write_results_section(plots_dir / "results.json", key, check_rows(key, rows))

    try:
        for name in names:
            results[name] = run_section(name, ctx)
            write()
    finally:
        if owned:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medfed.simulations.bench``; returns 1 when a table cell has neither value nor reason."""
    parser = argparse.ArgumentParser(prog="python -m medfed.simulations.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--plots", type=Path, default=Path("docs/bench"))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--section", action="append", choices=list(SECTIONS), help="run only these (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep run directories here")
    args = parser.parse_args(argv)
    return bench_command(
        profile=args.profile, out=args.out, plots=args.plots, data_dir=args.data_dir,
        sections=args.section, workdir=args.workdir, argv=["python", "-m", "medfed.simulations.bench", *(argv or sys.argv[1:])],
    )


def default_data_dir() -> Path:
    """``$MEDFED_DATA_DIR``, else ``../shared/data/medmnist`` (from the repository root)."""
    return Path(os.environ.get("MEDFED_DATA_DIR", str(Path("..") / "shared" / "data" / "medmnist")))


class _BelowWarning(logging.Filter):
    """Drops records below WARNING (Flower resets its handlers' levels inside ``run_simulation``;
    a filter on its logger survives that)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "`run_simulation` function is deprecated" not in record.getMessage()


def quiet_logs() -> None:
    """Keep the console to medfed's progress lines: Flower and Ray below WARNING are dropped."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("flwr", "ray", "nvflare"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _BelowWarning) for f in flwr_logger.filters):
        flwr_logger.addFilter(_BelowWarning())
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def bench_command(
    *, profile: str, out: Path, plots: Path, data_dir: Path, sections: Iterable[str] | None,
    workdir: Path | None, argv: Sequence[str],
) -> int:
    """Shared body of ``medfed bench`` and ``python -m medfed.simulations.bench``."""
    if profile not in PROFILES:
        raise ValueError(f"profile = {profile!r} is invalid. Valid profiles: {', '.join(PROFILES)}.")
    quiet_logs()
    results = run_bench(
        profile=PROFILES[profile], out=out, plots_dir=plots, data_dir=data_dir,
        sections=list(sections) if sections else None, workdir=workdir, command=shlex.join(argv),
    )
    gaps = incomplete_cells(results)
    for gap in gaps:
        logger.error("incomplete cell: %s", gap)
    logger.warning("wrote %s (%d sections, plots in %s)", out, len(results), plots)
    return 1 if gaps else 0

