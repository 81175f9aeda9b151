"""Simulation engine settings: the grid's poll, the one patch of Flower's engine, threads, OpenMP waits."""

from __future__ import annotations

import threading
import time
from queue import Empty, Queue

import numpy as np
import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid import InMemoryGrid

from medfed.simulations.engine_tuning import (
    SIM_POLL_INTERVAL,
    _add_messages_every,
    engine_polls,
    flower_source_matches,
    server_threads,
    tune_grid,
)


def test_flowers_engine_is_the_code_the_patch_replaces() -> None:
    """Fails when Flower's add_messages_to_queue changes: review the copy in engine_polls, then its hash."""
    assert flower_source_matches()


def test_the_patch_applies_only_inside_the_context_and_is_restored() -> None:
    flower, flower_queue = vce_api.add_messages_to_queue, vce_api.Queue
    with engine_polls(0.01) as active:
        assert active and vce_api.add_messages_to_queue is not flower and vce_api.Queue is not flower_queue
        with engine_polls(0.01):  # nesting keeps the outer patch and restores Flower's at the end
            pass
    assert vce_api.add_messages_to_queue is flower and vce_api.Queue is flower_queue


def test_the_engines_queues_wait_at_most_the_interval_so_the_run_ends_without_a_1_s_idle() -> None:
    # Flower's worker and reply threads block in get(timeout=1.0) and see the stop event only between gets.
    with engine_polls(0.01):
        queue = vce_api.Queue()
        start = time.perf_counter()
        with pytest.raises(Empty):
            queue.get(timeout=1.0)
        waited = time.perf_counter() - start
        queue.put("m")
        assert queue.get(timeout=1.0) == "m" and queue.empty()  # otherwise Flower's queue
    assert waited < 0.5  # the 0.01 s cap, with room for a loaded machine; Flower's own waits 1 s
    assert isinstance(queue, Queue)


class _State:
    """Flower's LinkState interface used by the engine: one undelivered message per node, once."""

    def __init__(self, pending: dict[int, list[str]]) -> None:
        self.pending = {node: list(msgs) for node, msgs in pending.items()}
        self.calls: list[tuple[int, int]] = []

    def get_message_ins(self, *, node_id: int, limit: int) -> list[str]:
        self.calls.append((node_id, limit))
        msgs = self.pending.get(node_id, [])
        out, self.pending[node_id] = msgs[:limit], msgs[limit:]
        return out


class _Stop(threading.Event):
    """Stops the loop after ``passes`` waits and records their timeouts."""

    def __init__(self, passes: int) -> None:
        super().__init__()
        self.passes, self.waits = passes, []

    def wait(self, timeout=None) -> bool:
        self.waits.append(timeout)
        if len(self.waits) >= self.passes:
            self.set()
        return self.is_set()


def test_the_patched_engine_hands_every_message_over_and_waits_the_shorter_interval() -> None:
    state = _State({1: ["a1", "a2"], 2: ["b1"], 3: []})
    queue: Queue = Queue()
    stop = _Stop(passes=3)
    _add_messages_every(0.005)(state, queue, {1: 0, 2: 1, 3: 2}, stop)  # the loop engine_polls installs
    assert stop.waits == [0.005] * 3
    assert [queue.get_nowait() for _ in range(queue.qsize())] == ["a1", "b1", "a2"]  # one per node per pass
    assert {limit for _, limit in state.calls} == {1}


def test_tune_grid_sets_the_simulation_grids_pull_interval_only() -> None:
    class _Factory:
        def state(self) -> object:
            return object()

    grid = InMemoryGrid(state_factory=_Factory())
    assert grid.pull_interval == 0.1  # Flower's default
    tune_grid(grid)
    assert grid.pull_interval == SIM_POLL_INTERVAL
    other = type("OtherGrid", (), {"pull_interval": 0.5})()
    tune_grid(other)
    assert other.pull_interval == 0.5


def test_server_threads_are_set_inside_and_restored(monkeypatch) -> None:
    import torch

    before = torch.get_num_threads()
    with server_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before


def test_the_patched_engine_asks_only_nodes_with_undelivered_mail() -> None:
    """One scan of the store finds the nodes to ask; a state without a store gets Flower's every-node loop."""
    from types import SimpleNamespace

    from medfed.simulations.engine_tuning import _nodes_with_mail

    def msg(dst: int, delivered: str = "") -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, delivered_at=delivered))

    state = SimpleNamespace(lock=threading.RLock(),
                            message_ins_store={"a": msg(7), "b": msg(3, "2026-01-01"), "c": msg(9), "d": msg(7)})
    assert list(_nodes_with_mail(state, {n: 0 for n in range(1000)})) == [7, 9]
    bare = _State({1: ["x"]})  # a state without a store: every node is asked, as in Flower
    assert list(_nodes_with_mail(bare, {1: 0, 2: 0})) == [1, 2]


def test_flowers_in_memory_link_state_keeps_the_store_and_lock_the_patch_reads() -> None:
    """Fails when Flower renames them (the patch would then silently fall back to asking every node)."""
    import inspect

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    source = inspect.getsource(InMemoryLinkState.__init__)
    assert "self.message_ins_store: dict[str, Message] = {}" in source
    assert "self.lock = threading.RLock()" in source


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_medfed_makes_idle_openmp_threads_sleep_unless_set(preset, expected) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, medfed; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


class _LinkState:
    """The two storing methods of Flower's link state, recording what they store."""

    def __init__(self) -> None:
        self.ins: list[str] = []
        self.res: list[str] = []

    def store_message_ins(self, message: str) -> str:
        self.ins.append(message)
        return f"id-{message}"

    def store_message_res(self, message: str) -> str:
        self.res.append(message)
        return f"id-{message}"


def _grid_with(state: object) -> InMemoryGrid:
    class _Factory:
        def state(self) -> object:
            return state

    return InMemoryGrid(state_factory=_Factory())


def test_outside_engine_polls_tune_grid_changes_only_the_interval() -> None:
    state = _LinkState()
    grid = _grid_with(state)
    tune_grid(grid)
    assert "send_and_receive" not in vars(grid) and "store_message_ins" not in vars(state)
    assert state.store_message_ins("m") == "id-m"


def test_inside_engine_polls_the_state_signals_what_it_stores_and_the_engine_wakes_at_once() -> None:
    """A message stored for a site ends the engine's wait: it is handed over without waiting the interval."""
    state = _LinkState()
    with engine_polls(30.0):  # a wait the test would notice
        grid = _grid_with(state)
        tune_grid(grid, interval=30.0)
        pending: dict[int, list[str]] = {1: []}

        class _EngineState:
            def get_message_ins(self, *, node_id: int, limit: int) -> list[str]:
                out, pending[node_id] = pending[node_id][:limit], pending[node_id][limit:]
                return out

        queue: Queue = Queue()
        stop = threading.Event()
        loop = threading.Thread(
            target=vce_api.add_messages_to_queue, args=(_EngineState(), queue, {1: 0}, stop), daemon=True
        )
        loop.start()
        time.sleep(0.2)  # the loop has made its first pass and waits (up to 30 s)
        start = time.perf_counter()
        pending[1].append("m1")
        assert grid.state.store_message_ins("m1") == "id-m1"  # Flower's method ran, then the signal
        assert queue.get(timeout=5.0) == "m1"
        handed_over = time.perf_counter() - start
        assert state.ins == ["m1"]
        stop.set()
        grid.state.store_message_ins("wake")  # end the last wait
        loop.join(timeout=5.0)
    assert handed_over < 2.0  # 30 s without the signal
    assert not loop.is_alive()


def test_inside_engine_polls_the_grid_returns_when_the_last_reply_is_stored() -> None:
    """``send_and_receive`` keeps Flower's contract (push, pull until every reply is in) and wakes on
    each stored reply instead of sleeping ``pull_interval``."""

    class _Meta:
        def __init__(self, reply_to: str) -> None:
            self.reply_to_message_id = reply_to

    class _Reply:
        def __init__(self, reply_to: str) -> None:
            self.metadata = _Meta(reply_to)

    state = _LinkState()
    with engine_polls(30.0):
        grid = _grid_with(state)
        tune_grid(grid, interval=30.0)
        stored: list[_Reply] = []
        grid.push_messages = lambda messages: [f"id-{m}" for m in messages]  # type: ignore[method-assign]

        def pull_messages(ids):
            out = [r for r in stored if r.metadata.reply_to_message_id in ids]
            for r in out:
                stored.remove(r)
            return out

        grid.pull_messages = pull_messages  # type: ignore[method-assign]

        def sites() -> None:
            for name in ("a", "b"):
                time.sleep(0.1)
                stored.append(_Reply(f"id-{name}"))
                grid.state.store_message_res(name)

        threading.Thread(target=sites, daemon=True).start()
        start = time.perf_counter()
        replies = list(grid.send_and_receive(["a", "b"]))
        took = time.perf_counter() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-a", "id-b"]
    assert state.res == ["a", "b"]
    assert took < 5.0  # two 30 s sleeps without the signal


def test_the_grids_timeout_still_bounds_the_wait() -> None:
    state = _LinkState()
    with engine_polls(30.0):
        grid = _grid_with(state)
        tune_grid(grid, interval=30.0)
        grid.push_messages = lambda messages: ["id-x"]  # type: ignore[method-assign]
        grid.pull_messages = lambda ids: []  # type: ignore[method-assign]
        start = time.perf_counter()
        assert list(grid.send_and_receive(["x"], timeout=0.3)) == []
    assert 0.25 < time.perf_counter() - start < 5.0


@pytest.mark.parametrize(("preset", "expected"), [(None, "0"), ("1", "1")])
def test_importing_medfed_turns_flowers_telemetry_off_unless_set(preset, expected) -> None:
    """No network at run time: Flower would post an event to telemetry.flower.ai at each simulation start."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    if preset:
        env["FLWR_TELEMETRY_ENABLED"] = preset
    code = "import medfed, flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


_NPY_CASES = {
    "float32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "float64": np.linspace(-1, 1, 5),
    "int64": np.array([-(2**40), 0, 3], dtype=np.int64),
    "uint8": np.arange(256, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "scalar": np.array(2.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    "big-endian": np.arange(4, dtype=">f4"),
}


@pytest.mark.parametrize("name", sorted(_NPY_CASES))
def test_npy_array_returns_what_flowers_bytes_to_ndarray_returns(name: str) -> None:
    from flwr.common import ndarray_to_bytes

    from medfed.simulations.engine_tuning import _FLOWER_BYTES_TO_NDARRAY, npy_array

    payload = ndarray_to_bytes(_NPY_CASES[name])
    ours, flowers = npy_array(payload), _FLOWER_BYTES_TO_NDARRAY(payload)
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
    assert ours.flags.writeable and ours.flags.f_contiguous == flowers.flags.f_contiguous
    np.testing.assert_array_equal(ours, flowers)
    ours[...] = 0  # a copy: the message's bytes are untouched
    np.testing.assert_array_equal(npy_array(payload), flowers)


def test_npy_array_refuses_pickles_and_truncated_payloads_as_flower_does() -> None:
    import io

    from flwr.common import ndarray_to_bytes

    from medfed.simulations.engine_tuning import _FLOWER_BYTES_TO_NDARRAY, npy_array

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in (buffer.getvalue(), ndarray_to_bytes(np.arange(10.0))[:-8], b"not npy"):
        with pytest.raises(ValueError):
            _FLOWER_BYTES_TO_NDARRAY(bad)
        with pytest.raises(ValueError):
            npy_array(bad)


def test_inside_engine_polls_flowers_array_decoding_is_npy_array() -> None:
    from flwr.common import ndarray_to_bytes, parameters_to_ndarrays
    from flwr.common.typing import Parameters
    from flwr.compat.common import parameter

    from medfed.simulations.engine_tuning import npy_array

    flower = parameter.bytes_to_ndarray
    params = Parameters(tensors=[ndarray_to_bytes(a) for a in _NPY_CASES.values()], tensor_type="numpy.ndarray")
    with engine_polls(0.01):
        assert parameter.bytes_to_ndarray is npy_array
        decoded = parameters_to_ndarrays(params)
    assert parameter.bytes_to_ndarray is flower
    for ours, expected in zip(decoded, _NPY_CASES.values(), strict=True):
        np.testing.assert_array_equal(ours, expected)
