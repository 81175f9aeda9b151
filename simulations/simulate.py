"""Run a multi-site federation on Flower's simulation engine, in this process (the sites in forked site
processes, in-process or on Ray: ``sim-backend``, :mod:`medfed.simulations.in_process`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.client import ClientApp
from flwr.simulation import run_simulation

from medfed.client.client_app import make_client_app
from medfed.server.failures import RunFailedError
from medfed.server.resume import RESUME_FILE, read_resume_state, resume_point
from medfed.server.run_dir import RoundRecord, RunDirectory, new_run_path
from medfed.server.secure import secagg_settings
from medfed.server.server_app import ServerHooks, make_server_app
from medfed.shared.config import RunConfig
from medfed.shared.preflight import preflight
from medfed.shared.site_process import simulated_site_environment
from medfed.simulations.engine_tuning import engine_polls, server_threads, tune_grid
from medfed.simulations.in_process import SITES_RUN, choose_backend, forked_sites, in_process_sites, usable_cores
from medfed.simulations.interrupt import (
    Interrupt,
    RunInterrupted,
    children,
    command_line,
    descendants,
    end_processes,
    interruptible,
)
from medfed.simulations.site_errors import SiteErrorLog, site_error_log

__all__ = [
    "RAY_CONNECT_RETRY_ENV",
    "RAY_MONITOR_SCRIPT",
    "SimulationResult",
    "end_ray_monitor",
    "ray_environment",
    "ray_init_args",
    "run_federated",
    "start_ray",
    "stop_ray",
]

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
    tuned: bool = True,
) -> SimulationResult:
    """Simulate ``cfg.num_sites`` hospitals training ``cfg.model`` for ``cfg.num_server_rounds``.

    With ``cfg.resume`` the run continues in that run directory after its last completed round
    (see ``medfed.server.resume``); :attr:`SimulationResult.rounds` then holds the rounds run now.
    After the last round every site's global, personalized (``personalize``) and local-only
    (``local-only-baseline``) models are scored on its local test split; the summary's
    ``personalization`` holds the report (:mod:`medfed.simulations.personalization`).

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
        The sites' ClientApp (default: :func:`medfed.client.client_app.make_client_app` of ``cfg``);
        tests and benchmarks pass one with faulty sites (:mod:`medfed.simulations.faults`).
    tuned
        Run with :mod:`medfed.simulations.engine_tuning`'s settings (0.02 s polls, the server
        process's torch threads), the sites where ``cfg.sim_backend`` puts them
        (:func:`medfed.simulations.in_process.choose_backend`) and Ray, when used, started by
        :func:`start_ray`; ``False`` keeps Flower's defaults, its Ray backend included
        (benchmarks compare the two).

    Raises
    ------
    DataError
        The dataset cannot be read, or (``bad-data = "strict"``) a datalist has unusable
        entries: raised before Ray starts, listing them.
    shared.preflight.PreflightError
        The run cannot work (more sites than the data fills, ``dp = true`` with BatchNorm...):
        raised before Ray starts (:func:`medfed.shared.preflight.preflight`), naming the key and fix.
    server.failures.RunFailedError
        Every site failed a round, or no round completed; the message says why (with the
        sites' own error, whose traceback was logged once: :mod:`medfed.simulations.site_errors`).
    RunInterrupted
        SIGINT or SIGTERM stopped the run (:mod:`medfed.simulations.interrupt`): the processes it
        started are ended and the run directory is marked interrupted (resumable from its last
        completed round).
    RuntimeError
        If the simulation ended without finishing its rounds (the cause is logged by Flower).
    """
    if cfg.resume:
        if run_path and Path(run_path).resolve() != Path(cfg.resume).resolve():
            raise ValueError(f"resume = {cfg.resume!r} but run_path = {str(run_path)!r}: they must agree.")
        run_path = cfg.resume
    # Fail fast, before Ray starts: the server thread reads the same (cached) splits.
    splits = preflight(cfg).splits
    if cfg.secagg:
        secagg_settings(cfg, num_sites=cfg.num_sites)  # as the server will check them, but before Ray
    if cfg.resume:
        resume_point(cfg)  # a run that cannot be resumed is refused here, not in the server thread
    if splits is not None and splits.skipped_files:
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

    ray_started_here: list[bool] = []

    def on_finish(summary: dict[str, object]) -> None:
        result.summary = summary
        if ray_started_here:
            end_ray_monitor()  # the rounds are over: Flower's ray.shutdown() would wait 1 s for it
        if user_hooks.on_finish:
            user_hooks.on_finish(summary)

    started: list[RunDirectory] = []

    def on_start(run_dir: RunDirectory) -> None:
        started.append(run_dir)
        # ``interrupt`` is bound by the ``with`` below, before the server thread runs this
        if interrupt.signal_name is not None:  # the signal came while the server thread was creating it
            run_dir.stop_recording()
        if user_hooks.on_start:
            user_hooks.on_start(run_dir)

    def on_signal() -> None:
        """From the signal handler: the server thread records no further round (its sites may
        still answer while the main thread unwinds Flower's engine: rounds are fractions of a
        second with a tiny model)."""
        for run_dir in started:
            run_dir.stop_recording()

    def on_final_model(weights: list) -> dict[str, object]:
        from medfed.simulations.personalization import personalization_report

        return personalization_report(cfg, weights)

    report = not cfg.is_deployment and (cfg.personalize != "off" or cfg.local_only_baseline)
    server_hooks = ServerHooks(
        on_start=on_start, on_round=on_round, on_finish=on_finish, on_final_model=on_final_model if report else None
    )
    server_app = make_server_app(
        cfg, hooks=server_hooks, run_path=str(path), tune_grid=tune_grid if tuned else None
    )
    client_app = client_app or make_client_app(cfg)
    # One CPU per site: Ray runs as many sites at once as there are cores, each torch single-threaded.
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": _gpu_share()},
        "init_args": ray_init_args(verbose=verbose),
    }
    # Flower's defaults (``tuned=False``, for benchmarks) are its Ray backend.
    backend, why = choose_backend(cfg.sim_backend) if tuned else ("ray", "Flower's default engine settings")
    if backend == "ray":
        ray_environment()
    start = time.perf_counter()
    polls = engine_polls() if tuned else nullcontext()
    threads = server_threads() if tuned else nullcontext()
    logger.info("simulated sites run %s (%s)", SITES_RUN[backend], why)
    if backend == "in-process":
        sites = in_process_sites()
    elif backend == "processes":  # forked here, in the main thread, before Flower starts a thread
        sites = forked_sites(client_app, workers=min(cfg.num_sites, usable_cores()))
    else:
        sites = simulated_site_environment()
    with polls, threads, sites, interruptible(on_signal=on_signal) as interrupt, site_error_log() as site_errors:
        started_ray = False
        try:
            started_ray = start_ray(verbose=verbose) if tuned and backend == "ray" else False
            if started_ray:
                ray_started_here.append(True)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.num_sites,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        except KeyboardInterrupt:
            raise _interrupted(cfg, interrupt, started[0] if started else None, path) from None
        except RunFailedError as err:
            raise _with_site_error(err, site_errors) from None
        finally:
            if started_ray:
                stop_ray()  # Flower's backend shuts Ray down at its end; not when the run failed before it
    _report_repeats(site_errors)
    result.wall_seconds = time.perf_counter() - start
    if not result.summary:
        raise RuntimeError(
            "the simulation stopped before finishing its rounds; see the log above for the cause."
        )
    return result


def _interrupted(cfg: RunConfig, interrupt: Interrupt, run_dir: RunDirectory | None, path: Path) -> RunInterrupted:
    """End the processes the run started, mark its run directory interrupted; the error to raise."""
    if run_dir is not None:
        run_dir.stop_recording()  # the server thread may still close a round: its sites are gone
        run_dir.wait_for_writes(raise_errors=False)  # the resume state of the last closed round
    left = end_processes(interrupt.children | descendants())
    try:
        last_round: int | None = read_resume_state(path).round if (path / RESUME_FILE).exists() else None
    except Exception:  # noqa: BLE001 - an unreadable resume state: nothing to resume from
        last_round = None
    signal_name = interrupt.signal_name or "SIGINT"
    if run_dir is not None:
        when = f"after round {last_round}" if last_round is not None else "before the first round"
        run_dir.mark_interrupted(
            last_round=last_round,
            planned_rounds=cfg.num_server_rounds,
            reason=f"interrupted ({signal_name}) {when} of {cfg.num_server_rounds}",
        )
    return RunInterrupted(
        signal_name=signal_name,
        run_dir=path if run_dir is not None else None,
        last_round=last_round,
        planned_rounds=cfg.num_server_rounds,
        resumable=last_round is not None,
        left=left,
    )


def _with_site_error(err: RunFailedError, site_errors: SiteErrorLog) -> RunFailedError:
    """``err`` with the sites' own error (seen in Flower's log) and where to resume."""
    reason = err.reason
    if site_errors.first is not None:
        count = site_errors.total()
        reason += f". The sites raised {site_errors.first} ({count} time{'s' if count != 1 else ''}; traceback above)"
    if err.run_dir is not None and (err.run_dir / RESUME_FILE).exists():
        reason += (
            f". Fix the cause, then continue after round {err.last_round} with: "
            f"medfed simulate --resume {err.run_dir}"
        )
    return RunFailedError(reason, run_dir=err.run_dir, last_round=err.last_round)


def _report_repeats(site_errors: SiteErrorLog) -> None:
    """One line per site failure that happened more than once (its traceback was logged once)."""
    for error, count in site_errors.repeats():
        logger.warning("site failure %s happened %d times in all (traceback logged once, above)", error, count)


def ray_environment() -> None:
    """Environment for Flower's Ray backend, set before it starts (a value already set wins).

    * ``RAY_worker_niceness = 0``: Ray starts its workers at nice 15 by default, as if they were
      background work; here they are the simulated sites, the run's main work, so they run at the
      priority of the process that started them (else any other job on the machine starves the
      simulation, and its timings say more about that job than about the federation).
    * ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO = 0``: a site given no GPU keeps the process's
      ``CUDA_VISIBLE_DEVICES`` rather than Ray blanking it (Ray's future default).

    (``OMP_WAIT_POLICY = PASSIVE``, which the workers inherit, is set when ``medfed`` is imported.)
    """
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def ray_init_args(*, verbose: bool) -> dict[str, Any]:
    """``ray.init`` arguments of a simulation (Flower's ``backend_config["init_args"]``).

    Ray's own logs only at ERROR, and the workers' output on the driver only when ``verbose``.
    (Flower passes its own ``runtime_env``, so environment variables for the workers are set in
    this process while Ray starts: :func:`medfed.shared.site_process.simulated_site_environment`.)
    """
    return {"logging_level": "ERROR", "log_to_driver": verbose}


RAY_CONNECT_RETRY_ENV: dict[str, str] = {
    "RAY_raylet_client_connect_timeout_milliseconds": "50",
    "RAY_raylet_client_num_connect_attempts": "200",
}
"""Ray settings (``RAY_<name>`` environment variables, read by Ray's processes at start) for the
retries of its local socket connections: the raylet connects to its own object store with them, and
when the store's socket is not there at the first try (most starts here) it waited the default
1000 ms before the next: ``ray.init`` took 3.2-3.4 s in 6 of 12 idle starts with the default (else
2.2-2.4 s) and 2.20-2.41 s in 14 of 14 with a 50 ms interval (Ray 2.55; the 1.001 s gap is in ``raylet.out`` between "Plasma store
debug dump" and "ObjectManager server started"). The interval is a sleep between attempts, not a
deadline on each: 200 attempts x 50 ms keeps the default's patience (10 x 1000 ms) where Ray uses the
attempt count (a worker connecting to its raylet, asking it for the system config); the raylet's
object-store connection passes its own 300 attempts, 15 s at 50 ms (the store is a thread of the
raylet itself). A value already in the environment wins."""


def start_ray(*, verbose: bool) -> bool:
    """Start Ray for a simulation as Flower's backend would, without a job ``runtime_env``.

    Flower's ``RayBackend.init_ray`` starts Ray only when it is not running, with
    ``runtime_env={"env_vars": {"PYTHONPATH": ...}}``: the driver's ``sys.path`` for the workers.
    A job with a ``runtime_env`` cannot use the worker processes Ray starts ahead of time, so each
    site's actor waited for a new worker (0.65-0.72 s against 0.07 s, two actors, idle:
    ``ray.init`` with and without that ``runtime_env``). On one machine the workers inherit the
    environment of the process that starts Ray, so the same ``PYTHONPATH`` set here while Ray
    starts reaches them without it. Same arguments otherwise (:func:`ray_init_args`, no dashboard),
    and :data:`RAY_CONNECT_RETRY_ENV` set while Ray starts (its processes keep it; this process's
    environment is restored).

    Returns
    -------
    bool
        Whether this call started Ray (``False``: it was already running and is left as it is).
    """
    import ray

    if ray.is_initialized():
        return False
    paths = [*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    during = {"PYTHONPATH": os.pathsep.join(paths),
              **{k: os.environ.get(k, v) for k, v in RAY_CONNECT_RETRY_ENV.items()}}
    before = {k: os.environ.get(k) for k in during}
    os.environ.update(during)
    try:
        ray.init(include_dashboard=False, **ray_init_args(verbose=verbose))
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


RAY_MONITOR_SCRIPT = os.path.join("ray", "autoscaler", "_private", "monitor.py")
"""The script of Ray's autoscaler monitor, a child process of the driver that started Ray."""


def end_ray_monitor() -> list[int]:
    """End Ray's autoscaler monitor at once (SIGKILL) if this process started it; the pids ended.

    ``ray.shutdown()`` stops the processes ``ray.init`` started one at a time, the GCS before the
    monitor, and gives each 1 s to exit after SIGTERM. The monitor's SIGTERM handler tries to
    report its end through the GCS that is already gone, so Ray waits the whole second and then
    kills it (per process, idle, Ray 2.55: raylet 0.03 s, GCS 0.02 s, monitor 1.00 s, dashboard
    0.02 s, log monitor 0.01 s). A simulation's one-node cluster never autoscales, so once its
    rounds are over medfed ends the monitor itself: SIGKILL runs no handler and reports nothing,
    and ``ray.shutdown()`` then finds it gone. Only direct children of this process whose command
    line runs :data:`RAY_MONITOR_SCRIPT` are touched.
    """
    ended = []
    for pid in children():
        if RAY_MONITOR_SCRIPT in command_line(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            ended.append(pid)
    return ended


def stop_ray() -> None:
    """Shut Ray down if it is still running (idempotent)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _gpu_share() -> float:
    """Fraction of a GPU per site when CUDA is present (four sites share one), else 0."""
    import torch

    if torch.cuda.is_available() and os.environ.get("MEDFED_FORCE_CPU") != "1":
        return 0.25
    return 0.0
