"""Run a multi-site federation on Flower's simulation engine (Ray), in this process."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.client import ClientApp
from flwr.simulation import run_simulation

from medfed.client.client_app import make_client_app
from medfed.server.run_dir import RoundRecord, RunDirectory, new_run_path
from medfed.server.server_app import ServerHooks, make_server_app
from medfed.shared.config import RunConfig
from medfed.shared.data.loading import load_dataset

__all__ = ["SimulationResult", "run_federated", "ray_environment"]

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What a finished simulation produced."""

    run_dir: Path
    rounds: list[RoundRecord] = field(default_factory=list)
    summary: dict[str, object] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def final_metrics(self) -> dict[str, float]:
        """Global (server-side) metrics after the last round."""
        return dict(self.summary.get("final_metrics", {}))  # type: ignore[arg-type]


def run_federated(
    cfg: RunConfig,
    *,
    hooks: ServerHooks | None = None,
    run_path: str | Path | None = None,
    verbose: bool = False,
    client_app: ClientApp | None = None,
) -> SimulationResult:
    """Simulate ``cfg.num_sites`` hospitals training ``cfg.model`` for ``cfg.num_server_rounds``.

    With ``cfg.resume`` the run continues in that run directory after its last completed round
    (see ``server.resume``); :attr:`SimulationResult.rounds` then holds the rounds run now.

    Parameters
    ----------
    cfg
        The run configuration; every site and the server share it.
    hooks
        Observers (progress view); their callbacks run on the server thread.
    run_path
        The run directory (default: a fresh folder under ``cfg.run_dir``; ``cfg.resume`` when
        resuming, and then ``run_path`` must be that folder if given).
    verbose
        Flower's DEBUG logging.
    client_app
        The sites' ClientApp (default: :func:`client.client_app.make_client_app` of ``cfg``);
        tests and benchmarks pass one with faulty sites (:mod:`simulations.faults`).

    Raises
    ------
    DataError
        The dataset cannot be read, or (``bad-data = "strict"``) a datalist has unusable
        entries: raised before Ray starts, listing them.
    RuntimeError
        If the simulation ended without finishing its rounds (the cause is logged by Flower).
    """
    if cfg.resume:
        if run_path and Path(run_path).resolve() != Path(cfg.resume).resolve():
            raise ValueError(f"resume = {cfg.resume!r} but run_path = {str(run_path)!r}: they must agree.")
        run_path = cfg.resume
    if not cfg.is_deployment:
        # Fail fast, before Ray starts: the server thread reads the same (cached) splits.
        splits = load_dataset(cfg)
        if splits.skipped_files:
            logger.warning(
                "bad-data = skip: %d unusable datalist entries left out; every simulated site "
                "reports skipped-files = %d.",
                splits.skipped_files,
                splits.skipped_files,
            )
    path = Path(run_path) if run_path else new_run_path(cfg.run_dir, name=f"{cfg.strategy}-s{cfg.seed}")
    result = SimulationResult(run_dir=path)
    user_hooks = hooks or ServerHooks()

    def on_round(record: RoundRecord) -> None:
        result.rounds.append(record)
        if user_hooks.on_round:
            user_hooks.on_round(record)

    def on_finish(summary: dict[str, object]) -> None:
        result.summary = summary
        if user_hooks.on_finish:
            user_hooks.on_finish(summary)

    def on_start(run_dir: RunDirectory) -> None:
        if user_hooks.on_start:
            user_hooks.on_start(run_dir)

    server_app = make_server_app(
        cfg, hooks=ServerHooks(on_start=on_start, on_round=on_round, on_finish=on_finish), run_path=str(path)
    )
    client_app = client_app or make_client_app(cfg)
    # One CPU per site: Ray runs as many sites at once as there are cores, each torch single-threaded.
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": _gpu_share()},
        "init_args": {"logging_level": "ERROR", "log_to_driver": verbose},
    }
    ray_environment()
    start = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.num_sites,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    result.wall_seconds = time.perf_counter() - start
    if not result.summary:
        raise RuntimeError(
            "the simulation stopped before finishing its rounds; see the log above for the cause."
        )
    return result


def ray_environment() -> None:
    """Environment for Flower's Ray backend, set before it starts (a value already set wins).

    * ``RAY_worker_niceness = 0``: Ray starts its workers at nice 15 by default, as if they were
      background work; here they are the simulated sites, the run's main work, so they run at the
      priority of the process that started them (else any other job on the machine starves the
      simulation, and its timings say more about that job than about the federation).
    * ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO = 0``: a site given no GPU keeps the process's
      ``CUDA_VISIBLE_DEVICES`` rather than Ray blanking it (Ray's future default).
    """
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _gpu_share() -> float:
    """Fraction of a GPU per site when CUDA is present (four sites share one), else 0."""
    import torch

    if torch.cuda.is_available() and os.environ.get("MEDFED_FORCE_CPU") != "1":
        return 0.25
    return 0.0
