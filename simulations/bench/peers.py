"""Benchmark section ``peers``: medfed beside a minimal Flower app and NVIDIA FLARE, same task, one run.

The common task (:func:`peer_config`): BreastMNIST (a slice of it in the quick profile), medfed's
``simplecnn`` (BatchNorm), IID sites, the profile's rounds and local epochs, SGD 0.05 with
momentum, batch 32, no augmentation. Three implementations train it, one after the other in
this process's run:

* medfed: :func:`medfed.simulations.simulate.run_federated` (Flower's simulation engine, medfed's
  ServerApp and ClientApp: run directory, egress guard, BatchNorm re-estimation, cosine schedule);
* a minimal Flower app written as Flower's quickstart does it
  (:mod:`medfed.simulations.peers.flower_quickstart`: NumPyClient + FedAvg on ``run_simulation``);
* NVIDIA FLARE's simulator (:mod:`medfed.simulations.peers.nvflare_job`, FLARE's PyTorch
  ``FedAvgRecipe`` in ``SimEnv``) in a virtual environment this module creates with
  ``pip install nvflare==NVFLARE_VERSION``; when that cannot be installed or run, the table
  records why.

Reported: wall time, mean seconds per round over rounds 2..R, final test AUC and accuracy, and
each peer's time over medfed's.
"""

from __future__ import annotations

import json
import logging
import os
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.shared.config import RunConfig
from medfed.simulations.bench.support import fmt, line_plot, medmnist_file, ratio
from medfed.simulations.simulate import SimulationResult, run_federated

if TYPE_CHECKING:
    from medfed.simulations.bench import BenchContext, SectionResult

__all__ = [
    "NVFLARE_VERSION",
    "peer_config",
    "medfed_peer_run",
    "nvflare_python",
    "run_nvflare_peer",
    "peers_section",
]

logger = logging.getLogger(__name__)

NVFLARE_VERSION = "2.9.0"
"""The NVIDIA FLARE release the benchmark installs (into its own virtual environment)."""
NVFLARE_PSUTIL = "7.2.2"
"""psutil for that environment: FLARE's simulator imports it, but nvflare 2.9.0 does not declare it
(without it the job exits with ``ModuleNotFoundError: No module named 'psutil'``)."""

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "MEDFED-PEER-RESULT "
"""The NVFlare job prints its figures on one line starting with this."""


def peer_config(ctx: BenchContext) -> RunConfig:
    """The common task of the ``overhead`` and ``peers`` sections as medfed's run config.

    Training and evaluation only, as the peers run it: no personalized models, no cross-site
    evaluation (:data:`medfed.simulations.bench.overhead.LOOP_WORK`).

    Raises
    ------
    FileNotFoundError
        If ``breastmnist.npz`` is not in the data folder.
    """
    p = ctx.profile
    path = medmnist_file(ctx.data_dir, "breastmnist.npz", workdir=ctx.workdir, train=p.slice_train,
                         val=p.slice_val, test=p.slice_test)
    return RunConfig(
        dataset=str(path), model="simplecnn", num_sites=p.peer_sites, partition="iid",
        num_server_rounds=p.peer_rounds, local_epochs=p.peer_local_epochs, batch_size=32, learning_rate=0.05,
        augment=False, seed=p.seeds[0], store="off", run_dir=str(ctx.workdir / "runs" / "peers"),
        personalize="off", cross_site=False,
    )


def medfed_peer_run(ctx: BenchContext) -> SimulationResult:
    """medfed's simulation of the common task, run once per benchmark run (shared by sections)."""
    return ctx.memo("medfed-peer-run", lambda: run_federated(peer_config(ctx)))


def _later_rounds(seconds: list[float]) -> float:
    later = [s for s in seconds[1:] if s is not None] or [s for s in seconds if s is not None]
    return sum(later) / len(later) if later else float("nan")


# --------------------------------------------------------------------------- NVIDIA FLARE
def nvflare_python(cache: Path, *, timeout: float = 1200.0) -> tuple[Path | None, str]:
    """A Python with ``nvflare==NVFLARE_VERSION`` in its own virtual environment at ``cache``.

    Creates the environment (``python -m venv``, ``pip install``) unless it already imports
    nvflare, and adds a ``.pth`` file that appends this repository and this interpreter's
    site-packages (torch, MONAI) after nvflare's own packages, so the job trains medfed's model.

    Returns
    -------
    tuple
        The interpreter, or ``None`` and the reason it could not be made (pip's last line).
    """
    python = cache / "bin" / "python"
    check = [str(python), "-c", "import nvflare, psutil, sys; sys.exit(nvflare.__version__ != %r)" % NVFLARE_VERSION]
    if not (python.exists() and subprocess.run(check, capture_output=True).returncode == 0):
        logger.warning("peers: installing nvflare==%s into %s (a few minutes) ...", NVFLARE_VERSION, cache)
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(cache)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"nvflare=={NVFLARE_VERSION}",
             f"psutil=={NVFLARE_PSUTIL}"],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return None, f"{' '.join(step[-3:])} did not finish within {timeout:.0f} s"
            if done.returncode != 0:
                last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][-1:]
                return None, f"`{' '.join(step[2:5])}` failed: {last[0] if last else f'exit code {done.returncode}'}"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    paths = [str(REPO_ROOT), *site.getsitepackages()]
    (Path(purelib) / "medfed-bench.pth").write_text("\n".join(paths) + "\n")
    return python, ""


def run_nvflare_peer(cfg: RunConfig, *, python: Path, workspace: Path, timeout: float = 1800.0) -> dict[str, Any]:
    """Run :mod:`medfed.simulations.peers.nvflare_job.job` for ``cfg``'s task; return its figures.

    Raises
    ------
    RuntimeError
        If the job fails or prints no result line; the message holds its last output line.
    """
    command = [
        # absolute: FLARE runs each client in its own workspace folder
        str(python), "-m", "medfed.simulations.peers.nvflare_job.job", "--data", str(Path(cfg.dataset).resolve()),
        "--sites", str(cfg.num_sites),
        "--rounds", str(cfg.num_server_rounds), "--local-epochs", str(cfg.local_epochs), "--seed", str(cfg.seed),
        "--workspace", str(workspace),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the NVFlare simulator did not finish within {timeout:.0f} s") from None
    wall = time.perf_counter() - start
    (workspace / "job-output.log").parent.mkdir(parents=True, exist_ok=True)
    (workspace / "job-output.log").write_text(done.stdout + "\n" + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            figures = json.loads(line[len(RESULT_PREFIX):])
            figures["process_wall_seconds"] = wall
            return figures
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    raise RuntimeError(
        f"the NVFlare job exited with code {done.returncode} without a result: {lines[-1][:200] if lines else 'no output'}"
    )


# --------------------------------------------------------------------------- section
def peers_section(ctx: BenchContext) -> SectionResult:
    """Section ``peers`` of ``medfed bench`` (see the module docstring); plot: medfed's rounds."""
    from medfed.simulations.bench import SectionResult, Table
    from medfed.simulations.peers.flower_quickstart.run import run as run_quickstart
    from medfed.simulations.peers.flower_quickstart.task import Settings

    p = ctx.profile
    table = Table(
        title="Same task, same data, same model, same rounds",
        columns=["implementation", "wall s", "s per round (rounds 2..R)", "round time / medfed's", "final test AUC",
                 "final test accuracy"],
    )
    result = SectionResult(tables=[table])
    try:
        cfg = peer_config(ctx)
    except FileNotFoundError as err:
        table.add_unavailable(f"not available: {err}", "all")
        return result
    medfed = medfed_peer_run(ctx)
    medfed_round = _later_rounds(list(medfed.summary.get("round_seconds", [])))  # type: ignore[arg-type]
    table.add("medfed (run_federated)", fmt(medfed.wall_seconds, 1), fmt(medfed_round, 2), "1.00",
              fmt(medfed.final_metrics.get("auc")), fmt(medfed.final_metrics.get("accuracy")))

    settings = Settings(data=cfg.dataset, num_sites=cfg.num_sites, rounds=cfg.num_server_rounds,
                        local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                        model=cfg.model, seed=cfg.seed)
    flower = run_quickstart(settings)
    flower_round = _later_rounds(flower.round_seconds)
    table.add("minimal Flower app (quickstart style)", fmt(flower.wall_seconds, 1), fmt(flower_round, 2),
              ratio(flower_round, medfed_round), fmt(flower.final_metrics.get("auc")),
              fmt(flower.final_metrics.get("accuracy")))

    if not p.nvflare:
        reason = "not run: the quick profile skips NVIDIA FLARE (its install takes minutes); the full profile runs it"
        table.add_unavailable(reason, f"NVIDIA FLARE {NVFLARE_VERSION} simulator")
    else:
        cache = Path(os.environ.get("MEDFED_BENCH_CACHE", REPO_ROOT / "runs" / "bench-cache")) / f"nvflare-{NVFLARE_VERSION}"
        python, why = nvflare_python(cache)
        figures: dict[str, Any] | None = None
        if python is not None:
            try:
                figures = run_nvflare_peer(cfg, python=python, workspace=ctx.workdir / "nvflare")
            except RuntimeError as err:
                why = f"failed: {err}"
        else:
            why = f"not available: {why}"
        if figures is None:
            table.add_unavailable(why, f"NVIDIA FLARE {NVFLARE_VERSION} simulator")
        else:
            nv_round = _later_rounds(figures.get("round_seconds", []))
            table.add(f"NVIDIA FLARE {NVFLARE_VERSION} simulator (FedAvgRecipe, SimEnv)",
                      fmt(figures.get("wall_seconds"), 1), fmt(nv_round, 2), ratio(nv_round, medfed_round),
                      fmt(figures.get("auc")), fmt(figures.get("accuracy")))
    table.notes.append(
        f"Task: BreastMNIST ({Path(cfg.dataset).name}), simplecnn with BatchNorm, {cfg.num_sites} IID sites, "
        f"{cfg.num_server_rounds} rounds x {cfg.local_epochs} local epoch(s), SGD 0.05 momentum 0.9, batch 32, "
        f"no augmentation, seed {cfg.seed}; test AUC of the final global model. Differences that stay: medfed "
        "decays the learning rate (cosine), re-estimates BatchNorm statistics after local training, checks every "
        "reply (egress guard) and writes a run directory; the peers train at a constant rate. Each site gets one "
        "CPU in both Flower runs; FLARE runs its clients as threads/processes of its simulator. Wall time includes "
        "each engine's start-up; the round time is the mean of rounds 2..R."
    )
    rounds = [r.round for r in medfed.rounds]
    series = {"global (test split)": (rounds, [r.global_metrics.get("auc", float("nan")) for r in medfed.rounds])}
    site_names = sorted({name for r in medfed.rounds for name in r.sites})
    for name in site_names:
        series[f"{name} (its validation split)"] = (
            rounds, [r.sites.get(name, {}).get("eval", {}).get("auc", float("nan")) for r in medfed.rounds]
        )
    result.plots.append(
        line_plot(ctx.plot_path("medfed-rounds.png"), series=series,
                  title=f"medfed, common task: AUC per round, global and per site ({cfg.num_sites} sites)",
                  xlabel="round", ylabel="AUC")
    )
    result.commands.append(ctx.reproduce("peers"))
    result.commands.append(
        "python -m medfed.simulations.peers.flower_quickstart.run --data ../shared/data/medmnist/breastmnist.npz "
        f"--sites {cfg.num_sites} "
        f"--rounds {cfg.num_server_rounds} --local-epochs {cfg.local_epochs}"
    )
    return result
