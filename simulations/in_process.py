"""Simulated sites in the coordinator's own process: Flower's simulation engine without Ray.

Flower 1.42's simulation engine hands each message to a ``Backend``
(``flwr.server.superlink.fleet.vce.backend.Backend``: ``build``, ``num_workers``,
``process_message``, ``terminate``) and has one, ``RayBackend``, which runs every ClientApp call in
a pool of Ray worker processes. Starting Ray and importing medfed in its workers costs seconds
before the first round (5-7 s on this 2-core machine, 2026-12-07), and every message travels to a
worker and back through Ray's object store. For a small federation that fixed cost is most of the
run: a tiny model's 10 rounds took 14.4 s on Ray against 3.9 s for the same work in a plain loop
(BENCHMARKS.md, "Sites in the coordinator's process").

:class:`InProcessBackend` runs the ClientApp in the engine's own worker thread, one message at a
time, as NVIDIA FLARE's simulator runs its clients in threads: nothing starts, nothing is
pickled, every site's state (its data, model, ledger) stays cached in this process across
rounds, and torch uses every core for the one site that trains (the simulation's thread count:
:func:`medfed.simulations.engine_tuning.server_threads`). The
ClientApp, its mods (DP, SecAgg+), the messages and the contexts are the same objects Flower's Ray
actors receive; an exception in the ClientApp is wrapped as the Ray actor wraps it
(``ClientAppException``), so the engine replies with the same error message. A site seeds the
global random generators when it trains (Python's ``random``, NumPy's, torch's); in a Ray worker
that touches only the worker, here it would move the coordinator's streams (Flower samples the
sites of a round with ``random``), so :meth:`InProcessBackend.process_message` puts the
coordinator's generator states back after each site's call.

What Ray gives that this does not: sites training in parallel on several cores (one process per
core, each single-threaded), and isolation (a site that crashes the interpreter, or leaks memory,
takes only its worker with it). :class:`ForkedSitesBackend` gives both without Ray's start:
:func:`forked_sites` forks one single-threaded site process per core from the coordinator's main
thread before Flower starts any thread, with the ClientApp and every module already loaded, and
the backend hands each message to one of them (``concurrent.futures.ProcessPoolExecutor``: the
message and context are pickled through a pipe, the model's tensors through a file in memory
(:mod:`medfed.simulations.message_transfer`), as Ray uses its shared-memory object store; a
site process that dies fails the run's remaining site calls with a message saying so, rather than
leaving them waiting). Which backend a
run uses is the run config's ``sim-backend`` (:data:`medfed.shared.config.SIM_BACKENDS`):
``processes``, ``in-process``, ``ray``, or ``auto`` (:func:`choose_backend`): Ray when torch sees an
accelerator (its runtime does not survive a fork), in-process on one core, else processes where the
platform forks (Linux).

Flower's engine builds its backend in ``vce_api.start_vce`` with
``from .backend.raybackend import RayBackend``; no setting reaches it. :func:`in_process_sites`
(:func:`forked_sites`) sets that module attribute to :class:`InProcessBackend`
(:class:`ForkedSitesBackend`) while a simulation runs, and puts back what was there after, only when ``start_vce`` is the 1.42.0 code it was written for
(:data:`FLOWER_START_VCE_SHA256`; else it raises, naming the fix). The test
``tests/simulations/test_in_process.py`` fails when Flower's code changes.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig, raybackend

from medfed.simulations.message_transfer import Packed, pack, transfer_directory, unpack

__all__ = [
    "AUTO_IN_PROCESS_MAX_CORES", "FLOWER_START_VCE_SHA256", "ForkedSitesBackend", "InProcessBackend", "SITES_RUN",
    "choose_backend",
    "SiteProcessError", "forked_sites", "global_rng_kept", "in_process_sites", "start_vce_matches", "usable_cores",
]

logger = logging.getLogger(__name__)

FLOWER_START_VCE_SHA256 = "2d5e267f893950a709c52adf9d6a90c81a7750d889b4eb99318dfffeea957f16"
"""SHA-256 of ``inspect.getsource(vce_api.start_vce)`` in flwr 1.42.0 (it builds the backend by
importing ``RayBackend`` from ``backend.raybackend`` when the simulation starts)."""

AUTO_IN_PROCESS_MAX_CORES = 2
"""``sim-backend = "auto"`` on a platform that cannot fork runs the sites in-process on a machine
with at most this many cores (Ray above)."""

_lock = threading.RLock()


def start_vce_matches() -> bool:
    """Whether Flower's ``start_vce`` is the 1.42.0 code :func:`in_process_sites` was written for."""
    source = inspect.getsource(vce_api.start_vce)
    return hashlib.sha256(source.encode()).hexdigest() == FLOWER_START_VCE_SHA256


SITES_RUN: dict[str, str] = {
    "in-process": "in this process, one site at a time with every core",
    "processes": "in single-threaded site processes forked at the start, one per core",
    "ray": "on Ray, one single-threaded worker process per core",
}
"""Where each backend :func:`choose_backend` picks runs the sites (the run's log line and ``--dry-run``'s)."""


def choose_backend(sim_backend: str, *, cores: int | None = None, accelerator: bool | None = None,
                   can_fork: bool | None = None) -> tuple[str, str]:
    """The backend a simulation runs its sites with, and why (``--dry-run`` prints the reason).

    Parameters
    ----------
    sim_backend
        The run config's ``sim-backend``: ``"in-process"``, ``"processes"``, ``"ray"`` or ``"auto"``.
    cores
        CPU cores this process may use (default: its affinity).
    accelerator
        Whether torch sees an accelerator (default: ``torch.accelerator.is_available()``).
    can_fork
        Whether this platform forks processes safely (default: Linux).

    Returns
    -------
    (str, str)
        ``"in-process"``, ``"processes"`` or ``"ray"``, and a sentence saying why.
    """
    if sim_backend in ("in-process", "processes", "ray"):
        return sim_backend, "set in the run config"
    if sim_backend != "auto":
        raise ValueError(f"sim-backend = {sim_backend!r} is invalid. Valid choices: auto, in-process, processes, ray.")
    cores = cores if cores is not None else usable_cores()
    accelerator = accelerator if accelerator is not None else torch.accelerator.is_available()
    can_fork = can_fork if can_fork is not None else sys.platform.startswith("linux")
    if accelerator:
        return "ray", "auto: torch sees an accelerator: Ray shares it between the sites (no fork after it starts)"
    if cores <= 1:
        return "in-process", "auto: 1 core: one site at a time, nothing to start"
    if can_fork:
        return "processes", f"auto: {cores} cores, no accelerator, the platform forks"
    if cores <= AUTO_IN_PROCESS_MAX_CORES:
        return "in-process", f"auto: {cores} cores, at most {AUTO_IN_PROCESS_MAX_CORES}, no fork: no Ray to start"
    return "ray", f"auto: {cores} cores, more than {AUTO_IN_PROCESS_MAX_CORES}, no fork: sites train in parallel"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity): one site process each with ``processes``."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def global_rng_kept() -> Iterator[None]:
    """Restore the global random generators (Python, NumPy, torch CPU and, once initialised,
    CUDA) to their states at entry when the block ends."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _SiteBackend(Backend):
    """What medfed's two backends share: every engine worker thread waits for its own message's
    reply (so a worker is always idle when asked), and a count of the messages processed."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.messages = 0

    def is_worker_idle(self) -> bool:
        """Always: each of the engine's worker threads calls :meth:`process_message` and waits for it."""
        return True

    def terminate(self) -> None:
        """Nothing to stop here (:func:`forked_sites` ends its site processes itself)."""
        logger.debug("%s: %d messages processed", type(self).__name__, self.messages)


class InProcessBackend(_SiteBackend):
    """A Flower simulation backend that runs the ClientApp in the calling thread, one message at a time.

    Parameters
    ----------
    backend_config
        Flower's backend configuration (``client_resources``, ``init_args``): read by Ray only,
        accepted and ignored here.
    """

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Keep ``app_fn`` (Flower's engine has loaded the ClientApp once already)."""
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        """One: sites run one after another, each with every core."""
        return 1 if self.app_fn is not None else 0

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        """Run the ClientApp on ``message`` with ``context``; the reply and the updated context.

        Raises
        ------
        ClientAppException
            The ClientApp raised (its exception is the cause), as Flower's Ray actor raises it.
        LoadClientAppError
            The ClientApp could not be loaded.
        """
        if self.app_fn is None:
            raise ValueError("InProcessBackend: call build() before processing messages.")
        try:
            with global_rng_kept():
                app = self.app_fn()
                reply = app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        self.messages += 1
        return reply, context


@contextmanager
def in_process_sites() -> Iterator[None]:
    """While inside, Flower's simulation engine runs the sites with :class:`InProcessBackend`.

    Raises
    ------
    RuntimeError
        Flower's ``start_vce`` is not the 1.42.0 code this was written for (the backend it builds
        might not be the one swapped): run with ``sim-backend = "ray"``.
    """
    if not start_vce_matches():
        raise RuntimeError(
            "sim-backend = \"in-process\": Flower's simulation engine (vce_api.start_vce) is not the flwr 1.42.0 "
            "code medfed's in-process backend was written for. Run with --set sim-backend=ray "
            "(or sim-backend = \"ray\" in your config file)."
        )
    with _lock:
        before = raybackend.RayBackend
        raybackend.RayBackend = InProcessBackend  # type: ignore[misc]
        try:
            yield
        finally:
            raybackend.RayBackend = before  # type: ignore[misc]


# --------------------------------------------------------------------------- forked site processes
_FORKED_APP: ClientApp | None = None
"""The ClientApp a forked site process runs (set in the coordinator before it forks them)."""
_TRANSFER_DIR: str | None = None
"""The running simulation's directory for the messages' array data (set before the fork)."""


def _forked_site_start() -> None:
    """In each forked site process: one torch thread (as in a Ray worker), Ctrl-C left to the coordinator.

    One thread is also the only safe count here: GNU OpenMP's thread pool does not survive a fork
    once the coordinator has used it, and a forked site process set to 2 threads hung in its first
    parallel kernel (a ResNet-18 site building its model, 2026-12-07, one-off trial).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles it and ends this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked_sites() ends its processes with SIGTERM
    torch.set_num_threads(1)


def _forked_site_call(packed: Packed) -> Packed:
    """In a forked site process: the ClientApp on the packed message and context; the reply and the
    updated context, packed (:mod:`medfed.simulations.message_transfer`: arrays through a file in
    the run's transfer directory, the rest through the pipe)."""
    if _FORKED_APP is None or _TRANSFER_DIR is None:  # pragma: no cover - set before the fork
        raise RuntimeError("no ClientApp in this site process")
    message, context = unpack(packed)
    try:
        reply = _FORKED_APP(message=message, context=context)
    except Exception as ex:
        raise ClientAppException(f"{type(ex).__name__}: {ex}") from None
    return pack((reply, context), _TRANSFER_DIR)


class SiteProcessError(RuntimeError):
    """A forked site process ended without replying (``sim-backend = "processes"``)."""


class ForkedSitesBackend(_SiteBackend):
    """A Flower simulation backend that runs the ClientApp in site processes forked from the
    coordinator before the simulation starts (:func:`forked_sites`): one single-threaded process
    per core, as Ray's workers, without starting Ray or importing anything again.

    Parameters
    ----------
    backend_config
        Flower's backend configuration: read by Ray only, accepted and ignored here.
    """

    pool: Any = None
    """The running simulation's ``ProcessPoolExecutor`` (set by :func:`forked_sites`)."""
    workers: int = 0
    transfer_dir: str = ""
    """The running simulation's directory for the messages' array data (:func:`transfer_directory`)."""

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Nothing to build: the site processes were forked with the ClientApp already loaded."""
        if self.pool is None:
            raise RuntimeError("ForkedSitesBackend: the site processes were not started (use forked_sites()).")

    @property
    def num_workers(self) -> int:
        """One engine thread per site process."""
        return self.workers

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        """Run the ClientApp on ``message`` in a site process; the reply and the updated context.

        Raises
        ------
        ClientAppException
            The ClientApp raised (its class and message are in this one's message).
        SiteProcessError
            A site process died; the others were ended with it, so every later call raises too.
        """
        from concurrent.futures.process import BrokenProcessPool

        try:
            packed = self.pool.submit(_forked_site_call, pack((message, context), self.transfer_dir)).result()
        except BrokenProcessPool as err:
            raise SiteProcessError(
                "a site process ended abruptly (killed, out of memory, or a crash in native code), and with it the "
                "run's site processes; rerun with --set sim-backend=in-process to see the site's own error"
            ) from err
        reply, context = unpack(packed)
        self.messages += 1
        return reply, context


@contextmanager
def forked_sites(client_app: ClientApp, *, workers: int) -> Iterator[None]:
    """While inside, Flower's simulation engine runs the sites in ``workers`` site processes forked
    from this one now, each with ``client_app`` loaded and one torch thread.

    Call it from the main thread before Flower's simulation starts any thread: a process forked
    while another thread holds a lock (logging's, the import system's, torch's) inherits the lock
    held forever. The processes are ended when the block ends (also after an error or Ctrl-C).

    Raises
    ------
    RuntimeError
        Flower's ``start_vce`` is not the 1.42.0 code this was written for, or this platform
        cannot fork.
    """
    import multiprocessing

    global _FORKED_APP, _TRANSFER_DIR
    if not start_vce_matches():
        raise RuntimeError(
            "sim-backend = \"processes\": Flower's simulation engine (vce_api.start_vce) is not the flwr 1.42.0 "
            "code medfed's site processes were written for. Run with --set sim-backend=ray."
        )
    if "fork" not in multiprocessing.get_all_start_methods():
        raise RuntimeError("sim-backend = \"processes\" needs fork (Linux). Run with --set sim-backend=in-process.")
    if torch.accelerator.is_available() and os.environ.get("MEDFED_FORCE_CPU") != "1":
        raise RuntimeError(
            "sim-backend = \"processes\" forks the site processes, and a GPU's runtime does not survive a fork: "
            "run with --set sim-backend=ray (or MEDFED_FORCE_CPU=1 to train on the CPU)."
        )
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, workers)
    with _lock, transfer_directory() as transfer_dir:
        before_app, before_dir, before_backend = _FORKED_APP, _TRANSFER_DIR, raybackend.RayBackend
        _FORKED_APP, _TRANSFER_DIR = client_app, transfer_dir
        existing = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_forked_site_start)
        # With fork the executor starts every process at its first task: give it one now, from this
        # thread, before any of Flower's threads exist.
        pool.submit(int).result()
        site_processes = [p for p in multiprocessing.active_children() if p not in existing]
        ForkedSitesBackend.pool, ForkedSitesBackend.workers = pool, workers
        ForkedSitesBackend.transfer_dir = transfer_dir
        raybackend.RayBackend = ForkedSitesBackend  # type: ignore[misc]
        try:
            yield
        finally:
            raybackend.RayBackend = before_backend  # type: ignore[misc]
            ForkedSitesBackend.pool, ForkedSitesBackend.workers, ForkedSitesBackend.transfer_dir = None, 0, ""
            _FORKED_APP, _TRANSFER_DIR = before_app, before_dir
            pool.shutdown(wait=False, cancel_futures=True)
            for process in site_processes:  # a site still training (an interrupted or failed run) ends now
                process.terminate()
            for process in site_processes:
                process.join(timeout=10)
