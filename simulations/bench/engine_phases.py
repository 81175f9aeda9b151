"""Where one small simulation's wall time goes: Ray's start, the first reply, the rounds, the end.

Usage::

    python -m medfed.simulations.bench.engine_phases --sites 2 --rounds 3 --samples 120 --image-size 16
    python -m medfed.simulations.bench.engine_phases --bare-ray      # two actors, with / without runtime_env

The first form runs ``run_federated`` (simplecnn, synthetic data, no personalization or cross-site
evaluation) with timestamps taken around Flower's ``RayBackend`` methods and medfed's server hooks,
and prints them as seconds from the call, with the phases derived by :func:`phases`. It uses only
APIs older checkouts have too, so the file can be run against another tree for a before/after
comparison (``PYTHONPATH=<tree> python simulations/bench/engine_phases.py``). ``--bare-ray`` times
``ray.init``, two actors' first reply and ``ray.shutdown`` on Ray alone, once with the job
``runtime_env`` Flower passes and once without (:func:`medfed.simulations.simulate.start_ray`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["phases", "timed_simulation", "bare_ray"]


def phases(marks: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Phase durations (seconds) from ``marks``: ``(name, seconds since the call)`` in time order.

    Names: ``R<k>`` after round ``k`` (``R0``: the initial evaluation), ``finish`` when the
    ServerApp ended, ``terminate>`` / ``terminate<`` around the backend's shutdown, ``end`` when
    the call returned. Returns ``first_round_s`` (call -> ``R1``: Ray's start, the sites' imports
    and round 1), ``later_round_mean_s`` (mean of rounds 2..R), ``finish_to_terminate_s`` (idle
    before the shutdown starts), ``terminate_s`` and ``wall_s``.
    """
    at: dict[str, float] = {}
    for name, t in marks:
        at.setdefault(name, t)  # the first occurrence
    if "R1" not in at or "end" not in at:
        raise ValueError("the timeline has no round 1 or no end: the simulation did not finish a round.")
    rounds = sorted(int(n[1:]) for n in at if n[:1] == "R" and n[1:].isdigit())
    later = [at[f"R{k}"] - at[f"R{k - 1}"] for k in rounds if k >= 2 and f"R{k - 1}" in at]
    out = {"first_round_s": at["R1"], "wall_s": at["end"]}
    if later:
        out["later_round_mean_s"] = sum(later) / len(later)
    if "finish" in at and "terminate>" in at:
        out["finish_to_terminate_s"] = at["terminate>"] - at["finish"]
    if "terminate>" in at and "terminate<" in at:
        out["terminate_s"] = at["terminate<"] - at["terminate>"]
    return {k: round(v, 3) for k, v in out.items()}


def timed_simulation(*, sites: int, rounds: int, samples: int, image_size: int) -> dict[str, Any]:
    """Run one small simulation with timestamps; ``{"marks": {...}, "phases": {...}}``."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from medfed.server.server_app import ServerHooks
    from medfed.shared.config import RunConfig
    from medfed.simulations.simulate import run_federated

    marks: list[tuple[str, float]] = []
    start = [0.0]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter() - start[0]))

    def wrapped(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            mark(f"{name}>")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(f"{name}<")

        return call

    originals = {n: getattr(raybackend.RayBackend, n) for n in ("init_ray", "build", "terminate")}
    hooks = ServerHooks(on_round=lambda r: mark(f"R{r.round}"), on_finish=lambda s: mark("finish"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(dataset="synthetic", synthetic_samples=samples, image_size=image_size, model="simplecnn",
                        num_sites=sites, num_server_rounds=rounds, local_epochs=1, run_dir=str(Path(tmp)),
                        store="off", cross_site=False, personalize="off")
        try:
            for name, fn in originals.items():
                setattr(raybackend.RayBackend, name, wrapped(name, fn))
            start[0] = time.perf_counter()
            run_federated(cfg, hooks=hooks)
            mark("end")
        finally:
            for name, fn in originals.items():
                setattr(raybackend.RayBackend, name, fn)
    return {"marks": dict((n, round(t, 3)) for n, t in marks), "phases": phases(marks)}


def bare_ray(*, runtime_env: bool) -> dict[str, float]:
    """``ray.init``, two one-CPU actors' first reply and ``ray.shutdown`` on Ray alone (seconds)."""
    import ray

    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}
    if runtime_env:
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}

    @ray.remote(num_cpus=1)
    class _Actor:
        def ping(self) -> int:
            return os.getpid()

    t0 = time.perf_counter()
    ray.init(**kwargs)
    t1 = time.perf_counter()
    actors = [_Actor.remote() for _ in range(2)]  # type: ignore[attr-defined]
    ray.get([a.ping.remote() for a in actors])
    t2 = time.perf_counter()
    ray.shutdown()
    t3 = time.perf_counter()
    return {"init_s": round(t1 - t0, 3), "actors_s": round(t2 - t1, 3), "shutdown_s": round(t3 - t2, 3)}


def main(argv: Sequence[str] | None = None) -> None:
    """Print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--bare-ray", action="store_true", help="time Ray alone, with and without a runtime_env")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_worker_niceness", "0")
    if args.bare_ray:
        out: dict[str, Any] = {"with_runtime_env": bare_ray(runtime_env=True),
                               "without_runtime_env": bare_ray(runtime_env=False)}
    else:
        out = timed_simulation(sites=args.sites, rounds=args.rounds, samples=args.samples, image_size=args.image_size)
    out["load"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
