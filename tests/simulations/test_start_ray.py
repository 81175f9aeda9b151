"""medfed starts Ray for a simulation without a job runtime_env; its workers still get the driver's sys.path."""

from __future__ import annotations

import os
import sys
import time

import ray

from medfed.simulations.interrupt import command_line, descendants, is_alive
from medfed.simulations.simulate import RAY_CONNECT_RETRY_ENV, RAY_MONITOR_SCRIPT, end_ray_monitor, start_ray, stop_ray


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


def test_the_autoscaler_monitor_is_ended_alone_and_ray_still_shuts_down_cleanly() -> None:
    # Fails when Ray stops starting its autoscaler monitor as a child of the driver (or renames the script):
    # then end_ray_monitor finds nothing and the 1 s it saved at shutdown needs another look.
    assert end_ray_monitor() == []  # no Ray: nothing to end
    assert not ray.is_initialized()
    try:
        start_ray(verbose=False)
        before = {pid: command_line(pid) for pid in descendants()}
        monitors = [pid for pid, line in before.items() if RAY_MONITOR_SCRIPT in line]
        assert len(monitors) == 1, before
        assert end_ray_monitor() == monitors
        deadline = time.monotonic() + 10
        while is_alive(monitors[0]) and time.monotonic() < deadline:  # SIGKILL lands at once; ray.shutdown reaps it
            time.sleep(0.01)
        assert not is_alive(monitors[0])
        others = [pid for pid in before if pid not in monitors]
        assert others and all(is_alive(pid) for pid in others)  # GCS, raylet, workers, ... untouched
        assert ray.get(_worker_facts.remote(), timeout=120)[1]  # Ray still runs work
    finally:
        stop_ray()
    assert not ray.is_initialized()
    assert not [pid for pid in descendants() if is_alive(pid) and "ray" in command_line(pid)]


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def test_rays_processes_get_the_short_connect_retry_and_a_users_value_wins(monkeypatch) -> None:
    monkeypatch.delenv("RAY_raylet_client_connect_timeout_milliseconds", raising=False)
    monkeypatch.setenv("RAY_raylet_client_num_connect_attempts", "321")  # the user's own value
    assert not ray.is_initialized()
    try:
        start_ray(verbose=False)
        raylets = [pid for pid in descendants() if "raylet/raylet" in command_line(pid)]
        assert len(raylets) == 1
        env = _environ(raylets[0])
        assert env["RAY_raylet_client_connect_timeout_milliseconds"] == RAY_CONNECT_RETRY_ENV[
            "RAY_raylet_client_connect_timeout_milliseconds"]
        assert env["RAY_raylet_client_num_connect_attempts"] == "321"
        # this process's environment is as it was
        assert "RAY_raylet_client_connect_timeout_milliseconds" not in os.environ
        assert os.environ["RAY_raylet_client_num_connect_attempts"] == "321"
        assert ray.get(_worker_facts.remote(), timeout=120)[1]
    finally:
        stop_ray()
