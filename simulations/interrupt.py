"""Ctrl-C (or ``kill``) of a simulation: stop within seconds, end every process it started, say so once.

Flower's simulation engine runs the ServerApp in a thread and the sites in Ray actor processes;
a terminal's Ctrl-C reaches all of them at once. Left alone, every actor prints its
``KeyboardInterrupt``, Flower logs each dead actor as a failed site, and the main process waits
for threads that wait for replies that never come. :func:`interruptible` instead:

1. on the first SIGINT (or SIGTERM) notes the signal and the processes this one started (Ray's
   head processes and its workers), silences logging (the dying actors' errors are noise now),
   calls the caller's ``on_signal`` (a simulation stops recording rounds there: its server
   thread must not close another round while the main thread unwinds), and raises
   :class:`KeyboardInterrupt` in the main thread, which unwinds Flower's simulation
   engine (it terminates the actors and shuts Ray down);
2. on a second signal during that, ends the processes and exits at once (status 130);
3. afterwards :func:`end_processes` ends whatever of them is still alive (SIGTERM, then
   SIGKILL after a grace period).

The caller then records the run as interrupted (``RunDirectory.mark_interrupted``) and raises
:class:`RunInterrupted`, whose text is the one line a user sees.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

__all__ = [
    "RunInterrupted", "Interrupt", "interruptible", "children", "descendants", "command_line", "is_alive",
    "end_processes", "EXIT_CODES",
]

logger = logging.getLogger(__name__)

EXIT_CODES: dict[str, int] = {"SIGINT": 130, "SIGTERM": 143}
"""The exit status of a run stopped by each signal (128 + the signal's number, as shells report)."""


class RunInterrupted(Exception):
    """A run stopped by a signal; ``str()`` is the one line for the user.

    Parameters
    ----------
    signal_name
        ``"SIGINT"`` or ``"SIGTERM"``.
    run_dir
        The run directory (``None`` if the run had not created it yet).
    last_round
        The last completed round (``None``: none, not even the initial evaluation).
    planned_rounds
        ``num-server-rounds``.
    resumable
        Whether ``medfed simulate --resume run_dir`` can continue it.
    left
        Processes of the run that did not end (their ids; normally none).
    """

    def __init__(
        self,
        *,
        signal_name: str,
        run_dir: Path | None,
        last_round: int | None,
        planned_rounds: int,
        resumable: bool,
        left: Iterable[int] = (),
    ) -> None:
        self.signal_name = signal_name
        self.left = sorted(left)
        self.run_dir = run_dir
        self.last_round = last_round
        self.planned_rounds = planned_rounds
        self.resumable = resumable
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return EXIT_CODES.get(self.signal_name, 130)

    def describe(self) -> str:
        """``interrupted after round 2 of 5: run directory D is resumable with medfed simulate --resume D``."""
        when = (
            "before the first round" if not self.last_round else f"after round {self.last_round} of {self.planned_rounds}"
        )
        head = f"interrupted ({self.signal_name}) {when}"
        if self.left:
            head += f" (processes {', '.join(map(str, self.left))} did not end: kill them)"
        if self.run_dir is None:
            return f"{head}: no run directory was written"
        if self.resumable:
            return f"{head}: run directory {self.run_dir} is resumable with medfed simulate --resume {self.run_dir}"
        return f"{head}: run directory {self.run_dir} is marked interrupted (it cannot be resumed: start the run again)"


@dataclass
class Interrupt:
    """What :func:`interruptible` saw: the signal (``None``: none) and the processes to end."""

    signal_name: str | None = None
    children: set[int] = field(default_factory=set)


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's direct children, by parent pid, from Linux's ``/proc``."""
    by_parent: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        by_parent.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return by_parent


def children(pid: int | None = None) -> list[int]:
    """The direct children of ``pid`` (default: this process), from Linux's ``/proc``."""
    return _children_by_parent().get(os.getpid() if pid is None else pid, [])


def descendants(pid: int | None = None) -> set[int]:
    """Every live process below ``pid`` (default: this process), from Linux's ``/proc``."""
    by_parent = _children_by_parent()
    found: set[int] = set()
    todo = [os.getpid() if pid is None else pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def command_line(pid: int) -> str:
    """``pid``'s command line, arguments joined by spaces (``""`` when it is gone; Linux ``/proc``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process (Linux ``/proc``)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def end_processes(pids: Iterable[int], *, grace_s: float = 3.0) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those alive after ``grace_s``; return those that survived both."""
    pids = [p for p in set(pids) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < deadline and any(is_alive(p) for p in pids):
            _reap()
            time.sleep(0.05)
        pids = [p for p in pids if is_alive(p)]
        if not pids:
            break
    return pids


def _reap() -> None:
    """Collect exited children of this process (so they do not linger as zombies)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


@contextmanager
def interruptible(*, on_signal: Callable[[], None] | None = None) -> Iterator[Interrupt]:
    """Handle SIGINT and SIGTERM in the block as described in the module docstring.

    ``on_signal`` is called once, in the main thread, on the first signal and before the
    :class:`KeyboardInterrupt` is raised; it must be quick and must not raise.

    Only in the main thread (elsewhere signals cannot be handled and the block runs as it is).
    The previous signal handlers are restored when the block ends. After a signal, logging
    stays disabled (``logging.disable``): the simulation's leftover threads would go on
    reporting its dead sites. A caller that carries on re-enables it with
    ``logging.disable(logging.NOTSET)``.
    """
    state = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if state.signal_name is not None:  # a second signal: stop now
            end_processes(state.children | descendants(), grace_s=0.5)
            os._exit(EXIT_CODES.get(name, 130))
        state.signal_name = name
        state.children = descendants()
        logging.disable(logging.CRITICAL)  # the dying actors' errors say nothing new
        if on_signal is not None:
            on_signal()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
