"""medfed starts Ray for a simulation without a job runtime_env; its workers still get the driver's sys.path."""

from __future__ import annotations

import os
import sys

import ray

from medfed.simulations.simulate import start_ray, stop_ray


@ray.remote(num_cpus=1)
def _worker_facts() -> tuple[str, bool]:
    import importlib.util

    return os.environ.get("PYTHONPATH", ""), importlib.util.find_spec("tests.support.probe_sites") is not None


def test_ray_starts_without_runtime_env_and_workers_import_from_the_drivers_path(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/opt/site-extra")
    assert not ray.is_initialized()
    try:
        assert start_ray(verbose=False) is True
        assert start_ray(verbose=False) is False  # already running: left as it is
        assert os.environ["PYTHONPATH"] == "/opt/site-extra"  # this process's variable is restored
        # Flower would pass runtime_env={"env_vars": {"PYTHONPATH": ...}}: prestarted workers could not serve it.
        assert not ray.get_runtime_context().runtime_env
        pythonpath, importable = ray.get(_worker_facts.remote(), timeout=120)
        entries = pythonpath.split(os.pathsep)
        assert [p for p in sys.path if p] == [p for p in entries[:-1] if p] and entries[-1] == "/opt/site-extra"
        assert importable  # the repository's test helpers, as the simulations' probe sites import them
    finally:
        stop_ray()
    assert not ray.is_initialized()
    stop_ray()  # idempotent
