"""Load benchmark: many simulated sites with a small model; peak memory and seconds per round.

Usage::

    python -m medfed.simulations.bench.scale --sites 4 16 64 --rounds 3

Each site count runs as its own ``medfed`` simulation (Flower's simulation engine on Ray, the
same path as ``medfed simulate``) in a fresh child process, so one size's memory never carries
into the next. While it runs, this process samples the child's whole process tree (the driver,
which also hosts the ServerApp, plus Ray's GCS, raylet, helpers and ClientApp workers) from
``/proc`` four times a second and keeps the peaks:

* ``peak_rss_mib``: the largest sum of resident set sizes over the tree. Pages shared between
  processes (Ray's object store in ``/dev/shm``, shared libraries) count once per process, so
  this is an upper bound;
* ``peak_pss_mib``: the largest sum of proportional set sizes (shared pages split between the
  processes sharing them): the memory the run really holds;
* ``peak_driver_rss_mib``: the driver process alone.

Seconds per round are the server's (``summary.json``: fit on every site, aggregation, the
server's evaluation on the test split and every site's validation); round 1 also starts the Ray
workers, so ``later_round_mean_s`` (rounds 2..R) is the steady state. ``startup_s`` is the wall
time not spent in rounds (interpreter and Ray start, shutdown).

The dataset is the synthetic demo (2D 32x32 blobs, labelled synthetic) with
``--samples-per-site`` samples per site in total (70/15/15 train/val/test), the model
``simplecnn``, one local epoch. Ray gets one CPU per site (as in ``medfed.simulations.simulate``), so
on a 2-core machine two sites train at a time whatever the site count.

Prints one JSON object per size as it finishes, then the table as JSON and as Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.shared.config import SIM_BACKENDS, sites_per_round

if TYPE_CHECKING:
    from medfed.shared.config import RunConfig
    from medfed.simulations.bench import BenchContext, SectionResult

__all__ = [
    "TreeMemory", "tree_memory", "ScaleResult", "scale_config", "measure_scale", "markdown_table", "figure_row",
    "bench_section", "main",
]

logger = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MIB = 1024 * 1024


@dataclass(frozen=True)
class TreeMemory:
    """Memory of one process and all its descendants at one instant (bytes)."""

    rss: int
    pss: int
    root_rss: int
    processes: int


def _children_map() -> dict[int, list[int]]:
    """``ppid -> [pid, ...]`` for every process visible in ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # exited meanwhile
            continue
        # Fields after the command name (which may hold spaces and parentheses): state ppid ...
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as fh:
        return int(fh.read().split()[1]) * _PAGE


def _pss(pid: int) -> int:
    """Proportional set size from ``smaps_rollup`` (0 where the kernel or permissions hide it)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> TreeMemory:
    """RSS and PSS summed over ``root`` and its descendants, read from ``/proc``.

    Parameters
    ----------
    root
        Process id at the top of the tree.

    Returns
    -------
    TreeMemory
        Zero everywhere once ``root`` has exited.
    """
    children = _children_map()
    pending, seen = [root], []
    while pending:
        pid = pending.pop()
        seen.append(pid)
        pending.extend(children.get(pid, []))
    rss = pss = root_rss = count = 0
    for pid in seen:
        try:
            value = _rss(pid)
        except OSError:
            continue
        rss += value
        pss += _pss(pid)
        count += 1
        if pid == root:
            root_rss = value
    return TreeMemory(rss=rss, pss=pss, root_rss=root_rss, processes=count)


class _PeakSampler(threading.Thread):
    """Samples :func:`tree_memory` of one process tree until stopped; keeps the maxima."""

    def __init__(self, root: int, *, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = self.peak_root = self.peak_processes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            mem = tree_memory(self.root)
            self.peak_rss = max(self.peak_rss, mem.rss)
            self.peak_pss = max(self.peak_pss, mem.pss)
            self.peak_root = max(self.peak_root, mem.root_rss)
            self.peak_processes = max(self.peak_processes, mem.processes)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass(frozen=True)
class ScaleResult:
    """One site count's figures (see the module docstring)."""

    sites: int
    rounds: int
    samples_per_site: int
    sites_per_round: int
    wall_s: float
    startup_s: float
    round_s: list[float]
    mean_round_s: float
    later_round_mean_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    peak_driver_rss_mib: float
    peak_processes: int
    fit_results_last_round: int
    final_accuracy: float | None
    backend: str = "ray"
    """Where the sites ran (``sim-backend`` as chosen: ``processes``, ``in-process`` or ``ray``)."""


def scale_config(
    *, sites: int, rounds: int, samples_per_site: int, run_dir: str, fraction: float = 1.0, sim_backend: str = "auto"
) -> RunConfig:
    """The run of one size: simplecnn on the synthetic set, ``fraction`` of the sites sampled per round.

    With ``fraction < 1`` the same fraction of sites validates each round (as a real federation
    samples, e.g. 10 %), and at least 2 sites train.
    """
    from medfed.shared.config import RunConfig

    return RunConfig(
        dataset="synthetic",
        synthetic_samples=sites * samples_per_site,
        model="simplecnn",
        num_sites=sites,
        num_server_rounds=rounds,
        local_epochs=1,
        batch_size=16,
        run_dir=run_dir,
        store="off",
        fraction_fit=fraction,
        fraction_evaluate=fraction,
        min_fit_clients=min(sites, 2) if fraction < 1 else sites,
        sim_backend=sim_backend,
    )


def _one_run(
    *, sites: int, rounds: int, samples_per_site: int, run_dir: str, fraction: float = 1.0, sim_backend: str = "auto"
) -> dict[str, object]:
    """Run one simulation in this process; return its raw figures (child-process side)."""
    from medfed.simulations.in_process import choose_backend
    from medfed.simulations.simulate import run_federated

    cfg = scale_config(
        sites=sites, rounds=rounds, samples_per_site=samples_per_site, run_dir=run_dir, fraction=fraction,
        sim_backend=sim_backend,
    )
    result = run_federated(cfg)
    last = result.rounds[-1] if result.rounds else None
    return {
        "wall_s": result.wall_seconds,
        "round_s": [float(s) for s in result.summary.get("round_seconds", []) if s is not None],  # type: ignore[union-attr]
        "fit_results_last_round": int(last.num_fit_results if last else 0),
        "final_accuracy": result.final_metrics.get("accuracy"),
        "backend": choose_backend(cfg.sim_backend)[0],
    }


def measure_scale(
    *, sites: int, rounds: int, samples_per_site: int, run_dir: str, fraction: float = 1.0, sim_backend: str = "auto"
) -> ScaleResult:
    """Run one site count in a child process and sample its process tree's memory.

    Raises
    ------
    RuntimeError
        The child failed (its stderr tail is in the message).
    """
    command = [
        sys.executable, "-m", "medfed.simulations.bench.scale", "--child",
        "--sites", str(sites), "--rounds", str(rounds),
        "--samples-per-site", str(samples_per_site), "--run-dir", run_dir, "--fraction", str(fraction),
        "--sim-backend", sim_backend,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _PeakSampler(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate()
    finally:
        sampler.stop()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{sites} sites: the simulation failed (exit {proc.returncode}):\n{err[-3000:]}")
    raw = json.loads(out.strip().splitlines()[-1])
    round_s = list(raw["round_s"])
    return ScaleResult(
        sites=sites,
        rounds=rounds,
        samples_per_site=samples_per_site,
        sites_per_round=sites_per_round(
            scale_config(sites=sites, rounds=rounds, samples_per_site=samples_per_site, run_dir=run_dir,
                         fraction=fraction)
        ),
        wall_s=round(wall, 1),
        startup_s=round(wall - sum(round_s), 1),
        round_s=[round(s, 2) for s in round_s],
        mean_round_s=round(statistics.fmean(round_s), 2) if round_s else float("nan"),
        later_round_mean_s=round(statistics.fmean(round_s[1:]), 2) if len(round_s) > 1 else float("nan"),
        peak_rss_mib=round(sampler.peak_rss / _MIB, 1),
        peak_pss_mib=round(sampler.peak_pss / _MIB, 1),
        peak_driver_rss_mib=round(sampler.peak_root / _MIB, 1),
        peak_processes=sampler.peak_processes,
        fit_results_last_round=int(raw["fit_results_last_round"]),
        final_accuracy=raw["final_accuracy"],
        backend=str(raw["backend"]),
    )


def markdown_table(results: Sequence[ScaleResult]) -> str:
    """The figures as a Markdown table for BENCHMARKS.md."""
    lines = [
        "| sites | sites per round | rounds | wall s | start-up s | s / round (mean) | s / round (rounds 2..R) "
        "| rounds s "
        "| peak RSS sum MiB | peak PSS sum MiB | peak driver RSS MiB | processes | sites answering (last round) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.sites} | {r.sites_per_round} | {r.rounds} | {r.wall_s:.1f} | {r.startup_s:.1f} | "
            f"{r.mean_round_s:.2f} | "
            f"{r.later_round_mean_s:.2f} | {', '.join(f'{s:.1f}' for s in r.round_s)} | {r.peak_rss_mib:.0f} | {r.peak_pss_mib:.0f} | "
            f"{r.peak_driver_rss_mib:.0f} | {r.peak_processes} | {r.fit_results_last_round} |"
        )
    return "\n".join(lines)


def figure_row(r: ScaleResult) -> dict[str, object]:
    """One ``results.json`` row (section ``scale``); ``seconds_per_round`` is the rounds-2..R mean."""
    later = r.later_round_mean_s if r.later_round_mean_s == r.later_round_mean_s else r.mean_round_s
    return {
        "sites": r.sites, "sites_per_round": r.sites_per_round, "seconds_per_round": later,
        "peak_mib": r.peak_pss_mib, "peak_rss_mib": r.peak_rss_mib, "peak_driver_rss_mib": r.peak_driver_rss_mib,
        "rounds": r.rounds, "round_s": r.round_s, "startup_s": r.startup_s, "load": os.getloadavg()[0],
        "backend": r.backend,
    }


def bench_section(ctx: BenchContext) -> SectionResult:
    """Section ``scale`` of ``medfed bench``: :func:`measure_scale` for each of ``ctx.profile.scale_sites``.

    Three rounds each (two in the quick profile), 10 synthetic samples per site, every site
    sampled; then ``scale_large_sites`` (full profile: 1,000) with ``scale_fraction`` (10 %) of
    the sites sampled per round, three rounds. Plot: seconds per round (rounds 2..R) against
    the number of sites (every site sampled).
    """
    from medfed.simulations.bench import SectionResult, Table
    from medfed.simulations.bench.support import fmt, line_plot

    p = ctx.profile
    rounds = 2 if p.name == "quick" else 3
    table = Table(
        title="Seconds per round and peak memory vs simulated sites (simplecnn, synthetic 32x32, 10 samples per site)",
        columns=["sites", "sites per round", "rounds", "s per round (mean)", "s per round (rounds 2..R)", "start-up s",
                 "peak PSS sum MiB", "peak RSS sum MiB", "sites answering (last round)"],
    )
    result = SectionResult(tables=[table])
    measured: list[ScaleResult] = []
    runs = [(sites, 1.0) for sites in p.scale_sites]
    if p.scale_large_sites:
        runs.append((p.scale_large_sites, p.scale_fraction))
    for sites, fraction in runs:
        r = measure_scale(sites=sites, rounds=rounds if fraction == 1.0 else 3, samples_per_site=10,
                          run_dir=str(ctx.workdir / "runs" / "scale"), fraction=fraction)
        table.add(r.sites, r.sites_per_round, r.rounds, fmt(r.mean_round_s, 2), fmt(r.later_round_mean_s, 2),
                  fmt(r.startup_s, 1), fmt(r.peak_pss_mib, 0), fmt(r.peak_rss_mib, 0), r.fit_results_last_round)
        result.figures.setdefault("scale", []).append(figure_row(r))
        if fraction == 1.0:
            measured.append(r)
    table.notes.append(
        "Each size runs as its own simulation in a child process whose whole process tree (driver and, on Ray, "
        "Ray's GCS, raylet, workers) is sampled from /proc four times a second; PSS splits shared pages, RSS counts "
        "them once per process (an upper bound). The sites run where sim-backend = auto puts them on this machine "
        f"({', '.join(sorted({r.backend for r in measured} or {'n/a'}))}): with forked site processes or on Ray each "
        "site process gets one CPU, so on 2 cores two sites train at a time; in-process one site trains at a time with "
        "every core."
    )
    xs = [r.sites for r in measured]
    result.plots.append(line_plot(
        ctx.plot_path("scale-sites.png"),
        series={"s per round (rounds 2..R)": (xs, [r.later_round_mean_s for r in measured]),
                "s per round (mean, round 1 starts workers)": (xs, [r.mean_round_s for r in measured])},
        title="Round time vs number of simulated sites (simplecnn, synthetic)", xlabel="sites",
        ylabel="seconds per round", logx=True,
    ))
    result.commands.append(ctx.reproduce("scale"))
    result.commands.append(
        f"python -m medfed.simulations.bench.scale --sites {' '.join(str(s) for s in p.scale_sites)} --rounds {rounds}"
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 16, 64], help="site counts to run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples-per-site", type=int, default=10, help="synthetic samples per site (all splits)")
    parser.add_argument("--run-dir", default="runs/bench-scale")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="fraction of the sites sampled to train (and to validate) each round, e.g. 0.1")
    parser.add_argument("--sim-backend", default="auto", choices=SIM_BACKENDS,
                        help="where the simulated sites run (the run config's sim-backend; default: auto)")
    parser.add_argument("--record", type=Path, default=None, metavar="RESULTS_JSON",
                        help="append the rows to section 'scale' of this file (e.g. docs/bench/results.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value, low in (("--rounds", args.rounds, 1), ("--samples-per-site", args.samples_per_site, 8)):
        if value < low:
            parser.error(f"{flag} = {value} is invalid: it must be >= {low}.")
    if not 0.0 < args.fraction <= 1.0:
        parser.error(f"--fraction = {args.fraction} is invalid: it must lie in (0, 1].")
    if any(s < 1 for s in args.sites):
        parser.error(f"--sites {args.sites} is invalid: every site count must be >= 1.")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.child:
        if len(args.sites) != 1:
            parser.error("--child runs exactly one site count.")
        print(json.dumps(_one_run(
            sites=args.sites[0], rounds=args.rounds, samples_per_site=args.samples_per_site, run_dir=args.run_dir,
            fraction=args.fraction, sim_backend=args.sim_backend,
        )), flush=True)  # fmt: skip
        return
    results = []
    for sites in args.sites:
        result = measure_scale(
            sites=sites, rounds=args.rounds, samples_per_site=args.samples_per_site, run_dir=args.run_dir,
            fraction=args.fraction, sim_backend=args.sim_backend,
        )
        results.append(result)
        print(json.dumps(asdict(result)), flush=True)
    print()
    print(json.dumps([asdict(r) for r in results], indent=2))
    print()
    print(
        f"Scale benchmark: simplecnn, synthetic 2D 32x32, {args.samples_per_site} samples per site, "
        f"1 local epoch, {args.rounds} rounds, {os.cpu_count()} CPUs, sites: {', '.join(sorted({r.backend for r in results}))}"
    )
    print(markdown_table(results))
    if args.record is not None:
        from medfed.simulations.bench.figures import check_rows
        from medfed.simulations.bench.support import append_results_rows, bench_command

        command = bench_command("medfed.simulations.bench.scale", sys.argv[1:] if argv is None else argv)
        stamp = time.strftime("%Y-%m-%d", time.gmtime())
        rows = [{**figure_row(r), "command": command, "measured_at": stamp} for r in results]
        append_results_rows(args.record, "scale", check_rows("scale", rows))


if __name__ == "__main__":
    main()
