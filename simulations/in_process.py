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
takes only its worker with it). Which backend a run uses is the run config's ``sim-backend``
(:data:`medfed.shared.config.SIM_BACKENDS`): ``in-process``, ``ray``, or ``auto``, which picks
in-process on a machine with at most :data:`AUTO_IN_PROCESS_MAX_CORES` cores (:func:`choose_backend`).

Flower's engine builds its backend in ``vce_api.start_vce`` with
``from .backend.raybackend import RayBackend``; no setting reaches it. :func:`in_process_sites`
sets that module attribute to :class:`InProcessBackend` while a simulation runs, and puts Flower's
back after, only when ``start_vce`` is the 1.42.0 code it was written for
(:data:`FLOWER_START_VCE_SHA256`; else it raises, naming the fix). The test
``tests/simulations/test_in_process.py`` fails when Flower's code changes.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig, raybackend

__all__ = [
    "AUTO_IN_PROCESS_MAX_CORES", "FLOWER_START_VCE_SHA256", "InProcessBackend", "choose_backend", "global_rng_kept",
    "in_process_sites", "start_vce_matches",
]

logger = logging.getLogger(__name__)

FLOWER_START_VCE_SHA256 = "2d5e267f893950a709c52adf9d6a90c81a7750d889b4eb99318dfffeea957f16"
"""SHA-256 of ``inspect.getsource(vce_api.start_vce)`` in flwr 1.42.0 (it builds the backend by
importing ``RayBackend`` from ``backend.raybackend`` when the simulation starts)."""

AUTO_IN_PROCESS_MAX_CORES = 2
"""``sim-backend = "auto"`` runs the sites in-process on a machine with at most this many cores."""

_lock = threading.RLock()


def start_vce_matches() -> bool:
    """Whether Flower's ``start_vce`` is the 1.42.0 code :func:`in_process_sites` was written for."""
    source = inspect.getsource(vce_api.start_vce)
    return hashlib.sha256(source.encode()).hexdigest() == FLOWER_START_VCE_SHA256


def choose_backend(sim_backend: str, *, cores: int | None = None) -> tuple[str, str]:
    """The backend a simulation runs its sites with, and why (``--dry-run`` prints the reason).

    Parameters
    ----------
    sim_backend
        The run config's ``sim-backend``: ``"in-process"``, ``"ray"`` or ``"auto"``.
    cores
        CPU cores this process may use (default: its affinity).

    Returns
    -------
    (str, str)
        ``"in-process"`` or ``"ray"``, and a sentence saying why.
    """
    if sim_backend in ("in-process", "ray"):
        return sim_backend, "set in the run config"
    if sim_backend != "auto":
        raise ValueError(f"sim-backend = {sim_backend!r} is invalid. Valid choices: auto, in-process, ray.")
    cores = cores if cores is not None else _cores()
    if cores <= AUTO_IN_PROCESS_MAX_CORES:
        return "in-process", f"auto: {cores} core(s), at most {AUTO_IN_PROCESS_MAX_CORES}: no Ray to start (seconds)"
    return "ray", f"auto: {cores} cores, more than {AUTO_IN_PROCESS_MAX_CORES}: sites train in parallel"


def _cores() -> int:
    """CPU cores this process may run on."""
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


class InProcessBackend(Backend):
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
        self.messages = 0

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Keep ``app_fn`` (Flower's engine has loaded the ClientApp once already)."""
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        """One: sites run one after another, each with every core."""
        return 1 if self.app_fn is not None else 0

    def is_worker_idle(self) -> bool:
        """Always: the engine's one worker thread calls :meth:`process_message` and waits for it."""
        return True

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

    def terminate(self) -> None:
        """Nothing to stop."""
        logger.debug("in-process backend: %d messages processed", self.messages)


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
            "code medfed's in-process backend was written for. Run with --sim-backend ray "
            "(or sim-backend = \"ray\" in [tool.flwr.app.config])."
        )
    with _lock:
        before = raybackend.RayBackend
        raybackend.RayBackend = InProcessBackend  # type: ignore[misc]
        try:
            yield
        finally:
            raybackend.RayBackend = before  # type: ignore[misc]
