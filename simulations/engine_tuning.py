"""Simulation engine settings: shorter polls, array decoding, server threads (with
:mod:`medfed.simulations.in_process`, the only places medfed patches Flower).

Polls
-----

A simulated round waits on two fixed polls of 0.1 s per message exchange, whatever the work:

* the ServerApp's ``InMemoryGrid`` sleeps ``pull_interval`` (0.1 s, a public attribute) between
  pulls for replies;
* the simulation engine's thread that hands messages to the sites
  (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) waits a hard-coded 0.1 s
  between passes over the nodes. No setting reaches it, so :func:`engine_polls` swaps in a copy
  of that function while a simulation runs, and puts Flower's back after.
  The copy also asks the link state only about nodes with an undelivered message (Flower asks
  every node every pass, and each question scans every stored message: O(nodes x messages)
  a pass, which dominates a simulation of 1,000 sites).

Neither needs to wait at all: both wait for something the same process does (the grid stores
messages for the sites; the engine stores their replies). Inside :func:`engine_polls`,
:func:`tune_grid` makes the simulation's link state set an event when it stores either
(``store_message_ins`` / ``store_message_res``, wrapped on that one state object), the engine's
loop waits on the first and the grid's ``send_and_receive`` (a copy of Flower's loop, on that one
grid object) on the second, so each side wakes when there is something to do; the poll
interval (:data:`SIM_POLL_INTERVAL`) remains only as the longest wait. SecAgg+ exchanges messages
four times a round where a plain round exchanges once, so it paid these waits four times:
about 0.8 s a round with Flower's 0.1 s polls, about 0.16 s with 0.02 s polls (half an interval
on average on each side of each exchange).

The end of a run waits on a third: the engine's worker threads and the thread that stores
replies block on ``Queue.get(timeout=1.0)`` and look at the stop event only between gets, so a
finished simulation idled up to 1 s before Ray was shut down (measured: 0.98 s between the
ServerApp's last round and the backend's ``terminate``). Inside :func:`engine_polls` the queues
that ``run_api`` creates (``vce_api.Queue``) cap a blocking get's timeout at the poll interval;
the loops are otherwise Flower's.

Array decoding
--------------
Flower's legacy messages carry each array as ``.npy`` bytes, and ``bytes_to_ndarray``
(``flwr.compat.common.parameter``; ``parameters_to_ndarrays`` calls it per array) reads them with
``np.load``, which parses every header with ``ast.literal_eval``. A site decodes the global model
from every message it gets and the server decodes every site's reply (the validation of updates,
FedAvg, the run's records): with the tiny benchmark model (20 arrays) 1.1 ms a model (a one-off
timing, 2026-12-07), about 20 models a round. Inside :func:`engine_polls` that function is :func:`npy_array`: the same arrays
(a writable copy, as ``np.load`` returns; object arrays refused as ``allow_pickle=False`` refuses
them) from :func:`medfed.shared.weights.npy_view`, which parses each distinct header once
(0.2 ms a model).

The copies and the queue are only used when Flower's functions are the ones they were written for
(flwr 1.42.0: the SHA-256 of their sources are :data:`FLOWER_SOURCE_SHA256`,
:data:`FLOWER_QUEUE_USERS_SHA256`, :data:`FLOWER_GRID_SHA256` and :data:`FLOWER_BYTES_TO_NDARRAY_SHA256`);
otherwise :func:`engine_polls` logs a warning and leaves Flower alone (the test ``tests/simulations/test_engine_tuning.py`` fails then,
so the copy is reviewed). Deployment is untouched: the patch only applies inside
:func:`engine_polls` and the grid setting only to the in-memory grid of a simulation.

Threads
-------
In a simulation the server process shares the machine with one Ray worker per CPU, each a
single-threaded site (Ray sets ``OMP_NUM_THREADS=1`` in its workers). The server's torch work
(the test-set evaluation and its BatchNorm pass, between training and the sites' evaluation)
runs while the sites wait, so :data:`SERVER_THREADS` is one thread per core (ResNet-18 rounds
were shorter with two threads than with one on the idle 2-core machine: BENCHMARKS.md, issue 19). An earlier measurement had found two threads far slower
than one because idle OpenMP threads spun while the sites trained; ``OMP_WAIT_POLICY=PASSIVE``
(set when ``medfed`` is imported, so in the Ray workers too) makes them sleep instead, so a
busy machine does not lose cores to waiting threads. :func:`server_threads` sets the count for
the simulation and restores it after.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

import numpy as np
from flwr.compat.common import parameter as flower_parameter
from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid import InMemoryGrid

from medfed.shared.weights import npy_view

__all__ = [
    "SIM_POLL_INTERVAL", "SERVER_THREADS", "FLOWER_SOURCE_SHA256", "FLOWER_QUEUE_USERS_SHA256", "FLOWER_GRID_SHA256",
    "FLOWER_BYTES_TO_NDARRAY_SHA256", "engine_polls", "npy_array",
    "tune_grid", "flower_source_matches", "server_threads",
]

logger = logging.getLogger(__name__)

SIM_POLL_INTERVAL = 0.02
"""Seconds between polls of the grid and of the engine in a simulation (Flower: 0.1)."""

SERVER_THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
"""torch threads in the server process of a simulation: one per core (its work runs while the sites wait)."""

FLOWER_SOURCE_SHA256 = "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a"
"""SHA-256 of ``inspect.getsource(vce_api.add_messages_to_queue)`` in flwr 1.42.0."""

FLOWER_QUEUE_USERS_SHA256 = "60a2e5da2056b7b65c900811f4e332eb56ace27064ce33f1f778b07a547f7d73"
"""SHA-256 of the sources of ``vce_api.run_api``, ``worker`` and ``put_message_into_state`` in
flwr 1.42.0 (the queues' creator and the two loops whose gets :func:`_stop_aware_queue` shortens)."""

FLOWER_GRID_SHA256 = "0229edfa5741b92857a8f53744a145900bd8726e339627d46c69418d45429a0a"
"""SHA-256 of ``inspect.getsource(InMemoryGrid.send_and_receive)`` in flwr 1.42.0 (copied by
:func:`_event_send_and_receive`)."""

FLOWER_BYTES_TO_NDARRAY_SHA256 = "6038dd1205aa7c37e6fe60d3701321204d91610fe0b015e4dd395a61e7ed7458"
"""SHA-256 of ``inspect.getsource(flwr.compat.common.parameter.bytes_to_ndarray)`` in flwr 1.42.0
(replaced by :func:`npy_array` inside :func:`engine_polls`)."""

_FLOWER_BYTES_TO_NDARRAY = flower_parameter.bytes_to_ndarray
_FLOWER_ADD_MESSAGES = vce_api.add_messages_to_queue
_lock = threading.RLock()


def _queue_users_source() -> str:
    """The sources :data:`FLOWER_QUEUE_USERS_SHA256` hashes, concatenated."""
    return "".join(inspect.getsource(f) for f in (vce_api.run_api, vce_api.worker, vce_api.put_message_into_state))


def flower_source_matches() -> bool:
    """Whether Flower's engine and in-memory grid are the 1.42.0 code the copies were written for."""
    ok = hashlib.sha256(inspect.getsource(_FLOWER_ADD_MESSAGES).encode()).hexdigest() == FLOWER_SOURCE_SHA256
    ok = ok and hashlib.sha256(_queue_users_source().encode()).hexdigest() == FLOWER_QUEUE_USERS_SHA256
    grid_source = inspect.getsource(InMemoryGrid.send_and_receive)
    ok = ok and hashlib.sha256(grid_source.encode()).hexdigest() == FLOWER_GRID_SHA256
    decode_source = inspect.getsource(_FLOWER_BYTES_TO_NDARRAY)
    return ok and hashlib.sha256(decode_source.encode()).hexdigest() == FLOWER_BYTES_TO_NDARRAY_SHA256


def npy_array(tensor: bytes) -> np.ndarray:
    """What Flower's ``bytes_to_ndarray`` returns for ``tensor`` (``np.load(..., allow_pickle=False)``):
    a writable array of the payload's dtype, shape and order, each distinct header parsed once.

    Raises
    ------
    ValueError
        The payload is not an ``.npy`` array, holds objects (a pickle), or is shorter than its header says.
    """
    return np.array(npy_view(tensor))


class _Wakeups:
    """What the simulation's link state signals: messages stored for the sites, replies stored."""

    def __init__(self) -> None:
        self.mail = threading.Event()
        self.replies = threading.Event()


_wakeups: _Wakeups | None = None
"""The running simulation's events (set inside :func:`engine_polls`, read by :func:`tune_grid`)."""


def tune_grid(grid: Any, *, interval: float = SIM_POLL_INTERVAL) -> None:
    """Shorten a simulation grid's waits for replies; other grids are left alone.

    Sets the in-memory grid's ``pull_interval`` (seconds between pulls for replies). Inside
    :func:`engine_polls` it also wires the grid's link state to the engine: the state signals
    what it stores (:func:`_signal_link_state`) and the grid waits for replies on that signal
    (:func:`_event_send_and_receive`) instead of sleeping out the interval.
    """
    if not isinstance(grid, InMemoryGrid):
        return
    grid.pull_interval = interval
    wakeups = _wakeups
    if wakeups is not None:
        _signal_link_state(grid.state, wakeups)
        grid.send_and_receive = _event_send_and_receive(grid, wakeups)  # type: ignore[method-assign]


def _signal_link_state(state: Any, wakeups: _Wakeups) -> None:
    """Make ``state`` set ``wakeups.mail`` after storing a message for a site and ``wakeups.replies``
    after storing a reply (this state object only; the methods are Flower's, called first)."""
    store_ins, store_res = state.store_message_ins, state.store_message_res

    def store_message_ins(message: Any) -> Any:
        try:
            return store_ins(message)
        finally:
            wakeups.mail.set()

    def store_message_res(message: Any) -> Any:
        try:
            return store_res(message)
        finally:
            wakeups.replies.set()

    state.store_message_ins = store_message_ins
    state.store_message_res = store_message_res


def _event_send_and_receive(grid: InMemoryGrid, wakeups: _Wakeups) -> Any:
    """Flower 1.42's ``InMemoryGrid.send_and_receive`` for ``grid``, waiting for ``wakeups.replies``
    (at most ``grid.pull_interval``) where Flower sleeps ``pull_interval``.

    The event is cleared before each pull, so a reply stored after a pull ends the next wait.
    """

    def send_and_receive(messages: Any, *, timeout: float | None = None) -> Any:
        msg_ids = set(grid.push_messages(messages))
        del messages
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        ret: list[Any] = []
        while timeout is None or time.time() < end_time:
            wakeups.replies.clear()
            res_msgs = grid.pull_messages(msg_ids)
            ret.extend(res_msgs)
            msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
            if len(msg_ids) == 0:
                break
            wait = grid.pull_interval if timeout is None else min(grid.pull_interval, max(end_time - time.time(), 0.0))
            wakeups.replies.wait(wait)
        return ret

    return send_and_receive


def _nodes_with_mail(state: Any, nodes_mapping: Any) -> Any:
    """The nodes that have an undelivered message, in ``nodes_mapping``'s order (all when unknown).

    Flower's loop asks the link state for every node each pass, and the in-memory state scans
    every stored message per question: with 1,000 nodes and 100 messages in flight that is
    100,000 checks a pass. One scan of the store under its lock finds the few nodes to ask.
    """
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return nodes_mapping.keys()
    with lock:
        pending = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return [node_id for node_id in nodes_mapping.keys() if node_id in pending]


def _add_messages_every(interval: float, mail: threading.Event | None = None) -> Any:
    """Flower 1.42's ``add_messages_to_queue`` with ``interval`` instead of its fixed 0.1 s wait,
    asking only the nodes that have mail (:func:`_nodes_with_mail`); with ``mail`` (set when a
    message is stored for a site) a wait ends as soon as there is a new message."""

    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
        while not f_stop.is_set():
            if mail is not None:
                mail.clear()  # before the pass: a message stored during it ends the next wait
            for node_id in _nodes_with_mail(state, nodes_mapping):
                message_ins_list = state.get_message_ins(node_id=node_id, limit=1)
                for msg in message_ins_list:
                    queue.put(msg)
            (mail if mail is not None else f_stop).wait(interval)

    return add_messages_to_queue


def _stop_aware_queue(interval: float) -> type[Queue]:
    """A ``queue.Queue`` whose blocking ``get`` waits at most ``interval`` seconds at a time."""

    class _StopAwareQueue(Queue):
        def get(self, block: bool = True, timeout: float | None = None) -> Any:
            if block and timeout is not None:
                timeout = min(timeout, interval)
            return super().get(block, timeout)

    return _StopAwareQueue


@contextmanager
def engine_polls(interval: float = SIM_POLL_INTERVAL) -> Iterator[bool]:
    """While inside, Flower's simulation engine polls for new messages every ``interval`` seconds at
    most, and wakes when the grid stores one (when :func:`tune_grid` wired the grid's state).

    Yields
    ------
    bool
        Whether the shorter wait is in effect (``False``: Flower's code changed, see the module
        docstring; the simulation then runs with Flower's own 0.1 s).
    """
    if not flower_source_matches():
        logger.warning(
            "Flower's simulation engine (vce_api: add_messages_to_queue, run_api, worker, put_message_into_state), "
            "InMemoryGrid.send_and_receive or bytes_to_ndarray is not the 1.42.0 code medfed's shorter polls were written for: "
            "running with Flower's own 0.1 s and 1 s polls."
        )
        yield False
        return
    global _wakeups
    with _lock:
        outer = _wakeups
        before = vce_api.add_messages_to_queue, vce_api.Queue, flower_parameter.bytes_to_ndarray
        _wakeups = _Wakeups()
        vce_api.add_messages_to_queue = _add_messages_every(interval, _wakeups.mail)
        vce_api.Queue = _stop_aware_queue(interval)
        flower_parameter.bytes_to_ndarray = npy_array
        try:
            yield True
        finally:  # what was there before: Flower's, or an enclosing engine_polls' own
            vce_api.add_messages_to_queue, vce_api.Queue, flower_parameter.bytes_to_ndarray = before
            _wakeups = outer


@contextmanager
def server_threads(threads: int = SERVER_THREADS) -> Iterator[None]:
    """While inside, this process runs torch with ``threads`` threads (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
