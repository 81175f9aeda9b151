"""Messages between the coordinator and its forked site processes, the arrays through shared memory.

A simulated site's message carries the global model as Flower ``Array`` objects (one ``bytes`` per
tensor: 45 MB for ResNet-18), and its reply carries the update back. Pickled whole through the
pipe of a ``concurrent.futures.ProcessPoolExecutor`` that cost 0.25-0.35 s per training call and
0.12-0.27 s per evaluation call here (ResNet-18, 4 sites, 2 site processes; the call itself took
2.3 s and 0.1 s), on the critical path of every round (BENCHMARKS.md, "Tensors beside the pipe,
files written while sites train").

:func:`pack` pickles a message (any object) with pickle protocol 5 and takes the data of every
large ``Array`` out of band (:class:`_ArrayPickler`); the out-of-band buffers are written, one
after another, to one file in a directory on a memory file system (``/dev/shm`` on Linux: no disk),
and only the small pickle, the file's name and the buffers' lengths go through the pipe.
:func:`unpack` reads each buffer back as one ``bytes`` object (the one copy the receiver needs),
removes the file, and unpickles: the rebuilt ``Array`` holds that ``bytes`` object itself. Small
messages (less than :data:`FILE_MIN_BYTES` in arrays of :data:`OUT_OF_BAND_MIN_BYTES` or more) travel
whole through the pipe, their arrays' data beside the pickle (:attr:`Packed.inline`).

The directory is made by :func:`transfer_directory` for one simulation (mode 0700, owned by the
user running it) and removed with everything in it when the simulation ends, so a file that a
site process killed mid-call left behind goes with it; a directory whose coordinator was itself
killed (SIGKILL: nothing runs to remove it) is removed by the next simulation on the machine. What
the files hold is model weights and updates (what the sites would send to the server), never
images or records. Where a file cannot be written (a full ``/dev/shm``: Docker gives containers
64 MB), the message is pickled whole through the pipe, as before, with one warning.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common import Array

__all__ = [
    "FILE_MIN_BYTES", "OUT_OF_BAND_MIN_BYTES", "Packed", "pack", "unpack", "transfer_directory",
    "remove_stale_directories",
]

logger = logging.getLogger(__name__)

OUT_OF_BAND_MIN_BYTES = 64 * 1024
"""An ``Array`` whose data is at least this many bytes travels through the transfer file (smaller
ones, and everything else, inside the pickle: a file is not worth it for them)..."""

FILE_MIN_BYTES = 1024 * 1024
"""... when such arrays hold this many bytes in all; a message with less travels whole. A round trip
to a forked process, pipe against file (median of 9, 2026-12-07): 0.1 MB 0.8 / 1.1 ms, 0.25 MB 0.8
/ 0.9 ms, 1 MB 2.2 / 2.1 ms, 4 MB 8.5 / 7.4 ms, ResNet-18's 44.7 MB 236 / 104 ms
(``python -m medfed.simulations.bench.transfer --megabytes 0.25 1 4 --repeat 9``)."""


@dataclass(frozen=True)
class Packed:
    """A pickled object whose large array data waits in a file.

    Attributes
    ----------
    pickled
        The object pickled with protocol 5, its large ``Array`` data left out.
    path
        The file holding that data, one buffer after another (``None``: nothing was left out).
    lengths
        Each buffer's length in bytes, in the order the pickle asks for them.
    inline
        The left-out data itself, for a message too small for a file (it travels with the pickle).
    """

    pickled: bytes
    path: str | None
    lengths: tuple[int, ...]
    inline: tuple[bytes, ...] = ()


def _array_from_buffer(state: dict[str, Any], data: Any) -> Array:
    """An ``Array`` with ``state`` (its attributes but ``data``) and ``data`` (a buffer: on load, a
    read-only ``memoryview`` of the ``bytes`` object :func:`unpack` read, used without a copy)."""
    array = Array.__new__(Array)
    if isinstance(data, memoryview) and isinstance(data.obj, bytes) and data.nbytes == len(data.obj):
        data = data.obj
    elif not isinstance(data, bytes):
        data = bytes(data)
    array.__dict__.update(state)  # as pickle's default for a dataclass: the attributes, no __setattr__
    array.__dict__["data"] = data
    return array


class _ArrayPickler(pickle.Pickler):
    """Protocol-5 pickler that hands the data of every large ``Array`` to ``buffer_callback``."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is Array:
            data = obj.__dict__.get("data")
            if isinstance(data, bytes) and len(data) >= OUT_OF_BAND_MIN_BYTES:
                state = {key: value for key, value in obj.__dict__.items() if key != "data"}
                return _array_from_buffer, (state, pickle.PickleBuffer(data))
        return NotImplemented


def pack(obj: Any, directory: str | os.PathLike[str], *, file_min_bytes: int = FILE_MIN_BYTES) -> Packed:
    """``obj`` pickled, the data of its large ``Array`` objects written to a new file in ``directory``.

    Parameters
    ----------
    obj
        Anything picklable (here: a Flower ``Message`` and ``Context``, or a reply and context).
    directory
        Where the file goes (:func:`transfer_directory`); the receiver's :func:`unpack` removes it.
    file_min_bytes
        Below this many bytes in large arrays the message travels whole (:data:`FILE_MIN_BYTES`;
        the transfer benchmark passes 0 to time the file for any model).
    """
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if isinstance(raw.obj, bytes):  # an Array's data (_ArrayPickler): out of band
            buffers.append(buffer)
            return False
        return True  # any other buffer (a NumPy array in a metric) stays in the pickle

    _ArrayPickler(stream, protocol=5, buffer_callback=out_of_band).dump(obj)
    if sum(buffer.raw().nbytes for buffer in buffers) < file_min_bytes:  # the Arrays' own bytes, not copied
        return Packed(stream.getvalue(), None, (), tuple(buffer.raw().obj for buffer in buffers))
    path = os.path.join(directory, f"{uuid.uuid4().hex}.arrays")
    lengths = []
    try:
        with open(path, "wb", buffering=0) as file:
            for buffer in buffers:
                raw = buffer.raw()
                written = 0
                while written < raw.nbytes:  # an unbuffered write may write less than asked
                    written += file.write(raw[written:])
                lengths.append(raw.nbytes)
    except OSError as err:  # a full memory file system (Docker gives /dev/shm 64 MB): the pipe instead
        Path(path).unlink(missing_ok=True)
        _warn_full(directory, err)
        return Packed(stream.getvalue(), None, (), tuple(buffer.raw().obj for buffer in buffers))
    return Packed(stream.getvalue(), path, tuple(lengths))


_warned_full: set[str] = set()


def _warn_full(directory: str | os.PathLike[str], err: OSError) -> None:
    """Say once per directory that its file system refused a transfer file (the message goes
    through the pipe: slower, not wrong)."""
    key = str(directory)
    if key in _warned_full:
        return
    _warned_full.add(key)
    logger.warning(
        "could not write a simulated site's model to %s (%s): messages go through the pipe instead, which is "
        "slower for large models. In a container, give it more shared memory (docker run --shm-size=1g).",
        Path(key).parent, err.strerror or err,
    )


def unpack(packed: Packed) -> Any:
    """The object :func:`pack` packed; its transfer file is read and removed.

    Raises
    ------
    OSError
        The transfer file is missing or shorter than the buffers it should hold.
    """
    if packed.path is None:
        return pickle.loads(packed.pickled, buffers=packed.inline)
    try:
        with open(packed.path, "rb", buffering=0) as file:
            buffers = []
            for length in packed.lengths:
                data = file.read(length) if length else b""
                while len(data) < length:  # a raw read may return less than asked
                    more = file.read(length - len(data))
                    if not more:
                        raise OSError(f"transfer file {packed.path} ended after {len(data)} of {length} bytes")
                    data += more
                buffers.append(data)
    finally:
        Path(packed.path).unlink(missing_ok=True)
    return pickle.loads(packed.pickled, buffers=buffers)


def _memory_directory() -> str | None:
    """``/dev/shm`` where it is a writable directory (a memory file system on Linux), else ``None``
    (the system's temporary directory)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


_PREFIX = "medfed-sites-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_directories(parent: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the transfer directories in ``parent`` (default: where :func:`transfer_directory`
    makes them) that belong to this user and to a coordinator process that no longer runs (one
    killed with SIGKILL cannot remove its own); return their names.

    A directory is named ``medfed-sites-<pid>-<random>``; one whose process id is alive (or
    reused by another process) is kept.
    """
    parent = Path(parent if parent is not None else (_memory_directory() or tempfile.gettempdir()))
    removed = []
    for entry in parent.glob(f"{_PREFIX}*-*"):
        pid_text = entry.name[len(_PREFIX):].split("-", 1)[0]
        try:
            if not pid_text.isdigit() or entry.stat().st_uid != os.getuid() or _pid_alive(int(pid_text)):
                continue
        except OSError:  # gone meanwhile
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


@contextmanager
def transfer_directory() -> Iterator[str]:
    """A new private directory for one simulation's transfer files, removed (with any file left
    in it) when the block ends; directories left by coordinators that were killed are removed
    first (:func:`remove_stale_directories`)."""
    parent = _memory_directory()
    stale = remove_stale_directories(parent)
    if stale:
        logger.info("removed %d transfer director%s left by a killed run", len(stale), "y" if len(stale) == 1 else "ies")
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
