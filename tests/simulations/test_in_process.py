"""Where simulated sites run (``sim-backend``): in the coordinator's process or in site processes
forked from it; the one swap of Flower's engine, the choice of backend, simulations that give what
Ray gives, and a site process that dies."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp.client_app import ClientApp, ClientAppException
from flwr.common import ConfigRecord
from flwr.server.superlink.fleet.vce.backend import raybackend

import medfed.simulations.in_process as in_process
from medfed.server.run_dir import read_metrics
from medfed.shared.config import ConfigError, RunConfig
from medfed.simulations.in_process import (
    AUTO_IN_PROCESS_MAX_CORES,
    InProcessBackend,
    choose_backend,
    forked_sites,
    global_rng_kept,
    in_process_sites,
    start_vce_matches,
)
from medfed.simulations.simulate import run_federated


def test_flowers_start_vce_is_the_code_the_swap_expects() -> None:
    """Fails when Flower's start_vce changes: check it still builds ``raybackend.RayBackend`` when
    the simulation starts, then update FLOWER_START_VCE_SHA256."""
    assert start_vce_matches()


def test_the_backend_is_swapped_only_inside_and_restored() -> None:
    flower = raybackend.RayBackend
    with in_process_sites():
        assert raybackend.RayBackend is InProcessBackend
        with in_process_sites():  # nested (a run inside a run): the outer one keeps its backend
            pass
        assert raybackend.RayBackend is InProcessBackend
    assert raybackend.RayBackend is flower


def test_a_changed_flower_engine_is_refused_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(in_process, "FLOWER_START_VCE_SHA256", "0" * 64)
    flower = raybackend.RayBackend
    with pytest.raises(RuntimeError, match=r"--set sim-backend=ray"), in_process_sites():
        pass
    with pytest.raises(RuntimeError, match=r"--set sim-backend=ray"), forked_sites(ClientApp(), workers=1):
        pass
    assert raybackend.RayBackend is flower


@pytest.mark.parametrize(
    ("setting", "cores", "accelerator", "can_fork", "expected"),
    [
        ("in-process", 64, False, True, "in-process"),
        ("processes", 1, False, True, "processes"),
        ("ray", 1, False, True, "ray"),
        ("auto", 1, False, True, "in-process"),
        ("auto", 2, False, True, "processes"),
        ("auto", 16, False, True, "processes"),
        ("auto", 16, True, True, "ray"),  # a GPU does not survive a fork; Ray shares it
        ("auto", 1, True, True, "ray"),
        ("auto", AUTO_IN_PROCESS_MAX_CORES, False, False, "in-process"),
        ("auto", AUTO_IN_PROCESS_MAX_CORES + 1, False, False, "ray"),
    ],
)
def test_choose_backend(setting: str, cores: int, accelerator: bool, can_fork: bool, expected: str) -> None:
    backend, why = choose_backend(setting, cores=cores, accelerator=accelerator, can_fork=can_fork)
    assert backend == expected
    assert ("auto" in why) == (setting == "auto")


def test_an_unknown_backend_is_refused_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"sim-backend = 'threads' is invalid\. Valid choices: auto, in-process, processes, ray"):
        choose_backend("threads")
    with pytest.raises(ConfigError, match=r"sim-backend"):
        RunConfig(sim_backend="threads")


def _message() -> Message:
    """A query as the engine hands it to a site."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="query")
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), metadata=meta)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_the_backend_runs_the_clientapp_on_the_message_and_keeps_its_context() -> None:
    app = ClientApp()

    @app.query()
    def answer(message: Message, context: Context) -> Message:
        context.state["calls"] = ConfigRecord({"n": int(context.state.get("calls", ConfigRecord({"n": 0}))["n"]) + 1})
        return Message(RecordDict({"answer": ConfigRecord({"x": message.content["config"]["x"] + 1})}), reply_to=message)

    backend = InProcessBackend({})
    assert backend.num_workers == 0  # not built: the engine would start no worker
    backend.build(lambda: app)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    context = _context()
    for expected_calls in (1, 2):
        reply, out_context = backend.process_message(_message(), context)
        assert reply.content["answer"]["x"] == 2
        assert out_context is context and context.state["calls"]["n"] == expected_calls


def test_an_exception_in_the_clientapp_is_raised_as_flowers_ray_actor_raises_it() -> None:
    app = ClientApp()

    @app.query()
    def fail(message: Message, context: Context) -> Message:
        raise KeyError("no such site file")

    backend = InProcessBackend({})
    backend.build(lambda: app)
    with pytest.raises(ClientAppException, match="no such site file") as info:
        backend.process_message(_message(), _context())
    assert isinstance(info.value.__cause__, KeyError)


def test_a_site_that_reseeds_the_global_generators_leaves_the_coordinators_streams_alone() -> None:
    app = ClientApp()

    @app.query()
    def reseed(message: Message, context: Context) -> Message:
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)
        random.random(), np.random.rand(), torch.rand(1)
        return Message(RecordDict(), reply_to=message)

    backend = InProcessBackend({})
    backend.build(lambda: app)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    backend.process_message(_message(), _context())
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    before = random.getstate()
    with pytest.raises(KeyError), global_rng_kept():  # also when the block raises
        random.seed(9)
        raise KeyError("a site failed")
    assert random.getstate() == before


def test_a_simulation_in_process_gives_what_ray_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same federation on both backends: same rounds, same global and site metrics (sums of the
    sites' updates may be taken in another order on Ray, hence the tolerance); no Ray in-process.

    torch runs one thread here, as each Ray worker does: with more threads an in-process site's
    kernels sum in another order (the default demo's round-1 training loss: 0.9316 against 0.9336),
    which training then carries on."""
    from functools import partial

    import ray

    from medfed.simulations import engine_tuning, simulate

    monkeypatch.setattr(simulate, "server_threads", partial(engine_tuning.server_threads, 1))

    cfg = RunConfig(
        run_dir=str(tmp_path), model="simplecnn", num_sites=2, num_server_rounds=2, synthetic_samples=48,
        image_size=16, store="off", cross_site=False, personalize="off",
    )
    saw_ray: list[bool] = []
    from medfed.server.server_app import ServerHooks

    hooks = ServerHooks(on_round=lambda record: saw_ray.append(ray.is_initialized()))
    here = run_federated(cfg.replace(sim_backend="in-process"), run_path=tmp_path / "here", hooks=hooks)
    assert len(saw_ray) >= cfg.num_server_rounds and not any(saw_ray)
    on_ray = run_federated(cfg.replace(sim_backend="ray"), run_path=tmp_path / "ray")
    _assert_same_run(here, on_ray)
    assert read_metrics(here.run_dir)[-1]["global"]["loss"] != read_metrics(here.run_dir)[-2]["global"]["loss"]


def test_forked_site_processes_give_what_ray_gives_and_end_with_the_run(tmp_path: Path) -> None:
    """sim-backend = "processes": single-threaded site processes forked at the start, as Ray's
    workers are single-threaded: the same figures as on Ray; no Ray; no process left after."""
    import ray

    from medfed.simulations.interrupt import descendants

    cfg = RunConfig(
        run_dir=str(tmp_path), model="simplecnn", num_sites=2, num_server_rounds=2, synthetic_samples=48,
        image_size=16, store="off", cross_site=False, personalize="off",
    )
    seen: list[tuple[bool, int]] = []
    from medfed.server.server_app import ServerHooks

    before = descendants()
    hooks = ServerHooks(on_round=lambda record: seen.append((ray.is_initialized(), len(descendants() - before))))
    forked = run_federated(cfg.replace(sim_backend="processes"), run_path=tmp_path / "forked", hooks=hooks)
    assert seen and not any(on_ray for on_ray, _ in seen)
    assert all(children >= cfg.num_sites for _, children in seen)  # the site processes, while it ran
    assert _left_after(before) == {}  # ended with the run
    on_ray = run_federated(cfg.replace(sim_backend="ray"), run_path=tmp_path / "ray")
    _assert_same_run(forked, on_ray)


def _assert_same_run(here, on_ray) -> None:
    assert here.final_metrics == pytest.approx(on_ray.final_metrics, rel=1e-5, abs=1e-6)
    rounds_here, rounds_ray = read_metrics(here.run_dir), read_metrics(on_ray.run_dir)
    assert [r["round"] for r in rounds_here] == [r["round"] for r in rounds_ray]
    for a, b in zip(rounds_here, rounds_ray, strict=True):
        assert a["global"] == pytest.approx(b["global"], rel=1e-5, abs=1e-6)
        assert sorted(a["sites"]) == sorted(b["sites"])
        for site in a["sites"]:
            for kind in a["sites"][site]:
                ma = {m: v for m, v in a["sites"][site][kind].items() if "seconds" not in m}
                mb = {m: v for m, v in b["sites"][site][kind].items() if "seconds" not in m}
                assert ma == pytest.approx(mb, rel=1e-5, abs=1e-6), (a["round"], site, kind)


@pytest.mark.parametrize(("setting", "shown"), [("ray", "sites run on Ray"), ("in-process", "sites run in this process"),
                                               ("processes", "sites run in single-threaded site processes")])
def test_simulate_dry_run_states_where_the_sites_run(tmp_path: Path, setting: str, shown: str) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    result = CliRunner().invoke(app, ["simulate", "--dry-run", "--run-dir", str(tmp_path / "runs"),
                                      "--set", f"sim-backend={setting}"])
    assert result.exit_code == 0, result.output
    assert f"# sim-backend: {setting} -> {shown}" in result.output


def _die(message, context, call_next):  # a site process that ends abruptly (as when killed)
    os._exit(3)


def test_a_site_process_that_dies_fails_the_run_with_a_message_instead_of_hanging(tmp_path: Path) -> None:
    from flwr.clientapp import ClientApp as FlowerClientApp

    from medfed.server.failures import RunFailedError
    from medfed.simulations.interrupt import descendants

    cfg = RunConfig(run_dir=str(tmp_path), model="simplecnn", num_sites=2, num_server_rounds=2, synthetic_samples=48,
                    image_size=16, store="off", cross_site=False, personalize="off", sim_backend="processes")
    dying = FlowerClientApp(client_fn=lambda context: None, mods=[_die])
    before = descendants()
    with pytest.raises(RunFailedError) as info:
        run_federated(cfg, run_path=tmp_path / "run", client_app=dying)
    assert "SiteProcessError" in str(info.value), str(info.value)  # its text: in the log, once
    assert _left_after(before) == {}


def _left_after(before: set[int], *, wait: float = 5.0) -> dict[int, str]:
    """Processes below this one that were not there ``before`` (pid -> command line), after giving
    exiting ones ``wait`` seconds; multiprocessing's resource tracker (one per process, started on
    first use, kept for the process's life) is not the run's."""
    from medfed.simulations.interrupt import descendants

    deadline = time.monotonic() + wait
    while True:
        left = {}
        for pid in descendants() - before:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "resource_tracker" not in cmdline:
                left[pid] = cmdline
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
