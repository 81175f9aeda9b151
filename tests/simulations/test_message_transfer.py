"""Messages to and from forked site processes: large arrays through a transfer file, the rest pickled."""

from __future__ import annotations

import os
import pickle
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp.client_app import ClientApp
from flwr.common import Array, ArrayRecord, ConfigRecord, MetricRecord

from medfed.simulations.in_process import ForkedSitesBackend, forked_sites
from medfed.simulations.message_transfer import (
    FILE_MIN_BYTES,
    OUT_OF_BAND_MIN_BYTES,
    pack,
    transfer_directory,
    unpack,
)


def _model_message(seed: int = 0) -> Message:
    """A training message as the server sends it: a model (two large tensors, a small one) and a config."""
    rng = np.random.default_rng(seed)
    arrays = ArrayRecord({
        "conv.weight": Array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32)),  # 147,456 bytes + .npy header
        "fc.weight": Array(rng.standard_normal((512, 512)).astype(np.float32)),  # 1,048,576 bytes + header
        "fc.bias": Array(rng.standard_normal(2).astype(np.float32)),  # 8 bytes + header: stays in the pickle
    })
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 3, "lr": 0.01}),
                          "metrics": MetricRecord({"auc": 0.91})})
    return Message(content=content, metadata=meta)


def _same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a:
        assert (b[key].dtype, b[key].shape, b[key].stype) == (a[key].dtype, a[key].shape, a[key].stype)
        assert type(b[key].data) is bytes and b[key].data == a[key].data
        assert b[key].object_id == a[key].object_id  # Flower's content hash of the whole Array
        np.testing.assert_array_equal(b[key].numpy(), a[key].numpy())


def test_a_message_comes_back_whole_with_its_large_arrays_through_the_file(tmp_path: Path) -> None:
    message = _model_message()
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={"x": 1})
    packed = pack((message, context), tmp_path)
    large = sum(len(a.data) for a in message.content["arrays"].values() if len(a.data) >= OUT_OF_BAND_MIN_BYTES)
    assert packed.path is not None and Path(packed.path).parent == tmp_path
    arrays = message.content["arrays"]
    assert packed.lengths == (len(arrays["conv.weight"].data), len(arrays["fc.weight"].data))  # the two large ones
    assert Path(packed.path).stat().st_size == large
    assert len(packed.pickled) < 0.05 * large  # the tensors did not travel in the pickle
    # The same message pickled whole carries every byte; the packed pickle does not.
    assert len(pickle.dumps((message, context), protocol=5)) > large

    got, got_context = unpack(packed)
    assert not Path(packed.path).exists()  # the receiver removed the file
    _same_arrays(message.content["arrays"], got.content["arrays"])
    assert dict(got.content["config"]) == {"server-round": 3, "lr": 0.01}
    assert dict(got.content["metrics"]) == {"auc": 0.91}
    assert got.metadata.message_type == "train" and got.metadata.dst_node_id == 7
    assert got_context.node_config == {"partition-id": 0} and got_context.run_config == {"x": 1}


@pytest.mark.parametrize("floats", [4, OUT_OF_BAND_MIN_BYTES // 4, (FILE_MIN_BYTES - 4096) // 8])
def test_a_message_without_a_megabyte_of_large_arrays_travels_whole_without_a_file(tmp_path: Path, floats: int) -> None:
    """A tiny model, or one whose large tensors add up to less than FILE_MIN_BYTES: the pipe is cheaper."""
    small = ArrayRecord({"a": Array(np.arange(floats, dtype=np.float32)), "b": Array(np.ones(floats, np.float32))})
    packed = pack({"record": small, "n": np.arange(3)}, tmp_path)
    assert packed.path is None and packed.lengths == () and not list(tmp_path.iterdir())
    got = unpack(packed)
    _same_arrays(small, got["record"])
    assert all(type(got["record"][key].data) is bytes for key in small)  # as Flower's Array holds it
    assert got["n"].flags.writeable  # a NumPy array stays in the pickle: writable as before


def test_a_large_numpy_array_stays_in_the_pickle_and_writable(tmp_path: Path) -> None:
    """Only Flower ``Array`` data goes out of band: a NumPy array rebuilt from a read-only buffer would
    be read-only, and code that writes to a metric array would fail."""
    values = np.ones(OUT_OF_BAND_MIN_BYTES, dtype=np.float32)
    packed = pack(values, tmp_path)
    assert packed.path is None
    got = unpack(packed)
    got[0] = 5.0
    assert got.sum() == values.sum() + 4.0


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_short_transfer_file_is_an_error_naming_it(tmp_path: Path, damage: str) -> None:
    packed = pack(_model_message(), tmp_path)
    assert packed.path is not None
    if damage == "missing":
        os.unlink(packed.path)
        with pytest.raises(OSError):
            unpack(packed)
    else:
        os.truncate(packed.path, 1000)
        first = packed.lengths[0]
        with pytest.raises(OSError, match=rf"transfer file .*\.arrays ended after 1000 of {first} bytes"):
            unpack(packed)
    assert not Path(packed.path).exists()


def test_the_transfer_directory_is_private_and_removed_with_what_was_left_in_it() -> None:
    with transfer_directory() as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            assert Path(path).parent == Path("/dev/shm")  # memory, not disk
        left = pack(_model_message(), path)  # never unpacked: a site process killed mid-call
        assert left.path is not None and Path(left.path).exists()
    assert not Path(path).exists()


def test_forked_site_processes_receive_and_return_large_arrays_through_the_directory() -> None:
    """A ClientApp in a forked site process gets the model's tensors intact and its reply's come back."""
    app = ClientApp()

    @app.train()
    def double(message: Message, context: Context) -> Message:
        arrays = message.content["arrays"]
        doubled = ArrayRecord({key: Array(arrays[key].numpy() * 2) for key in arrays})
        context.state["seen"] = ConfigRecord({"pid": os.getpid()})
        return Message(RecordDict({"arrays": doubled}), reply_to=message)

    message = _model_message(seed=3)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with forked_sites(app, workers=1):
        backend = ForkedSitesBackend({})
        backend.build(lambda: app)
        directory = Path(backend.transfer_dir)
        assert directory.is_dir()
        reply, out_context = backend.process_message(message, context)
        assert not list(directory.iterdir())  # both files read and removed
    assert not directory.exists()
    assert out_context.state["seen"]["pid"] != os.getpid()  # it ran in the site process
    for key, array in message.content["arrays"].items():
        np.testing.assert_array_equal(reply.content["arrays"][key].numpy(), array.numpy() * 2)


def test_the_transfer_benchmark_times_a_round_trip_each_way_and_checks_what_came_back() -> None:
    from medfed.simulations.bench.transfer import model_record, round_trips, synthetic_record

    record = model_record("simplecnn")
    assert len(record) > 1 and all(len(a.data) > 0 for a in record.values())
    big = synthetic_record(1.5)
    assert len(big) == 4 and abs(sum(a.numpy().nbytes for a in big.values()) - 1.5e6) < 16
    for rec in (record, big):  # each timed both ways, whatever its size
        figures = round_trips(rec, repeat=2)
        assert set(figures) == {"pipe_s", "file_s"} and all(0 < v < 30 for v in figures.values())


def test_directories_left_by_a_killed_coordinator_are_removed_by_the_next_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    from medfed.simulations.message_transfer import remove_stale_directories

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    left = tmp_path / f"medfed-sites-{dead_pid}-abc123"
    left.mkdir()
    (left / "x.arrays").write_bytes(b"\0" * 1024)
    alive = tmp_path / f"medfed-sites-{os.getpid()}-def456"  # this process: still running
    alive.mkdir()
    other = tmp_path / "medfed-sites-notapid-x"
    other.mkdir()
    assert remove_stale_directories(tmp_path) == [left.name]
    assert not left.exists() and alive.exists() and other.exists()
    with transfer_directory() as path:
        assert Path(path).name.startswith(f"medfed-sites-{os.getpid()}-")


def test_a_full_memory_file_system_sends_the_message_through_the_pipe_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Docker gives /dev/shm 64 MB: a ResNet-18 message and its reply may not fit. Slower, not wrong."""
    import builtins
    import errno

    import medfed.simulations.message_transfer as transfer

    real_open = builtins.open

    class FullFile:
        def __init__(self, path: str) -> None:
            self.file = real_open(path, "wb", buffering=0)

        def __enter__(self) -> FullFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, data: memoryview) -> int:
            self.file.write(data[:100])  # part of it fits, then the file system is full
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if str(path).endswith(".arrays") and "w" in mode:
            return FullFile(str(path))
        return real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(transfer, "_warned_full", set())
    monkeypatch.setattr(builtins, "open", full_open)
    message = _model_message()
    with caplog.at_level("WARNING", logger="medfed.simulations.message_transfer"):
        first, second = pack(message, tmp_path), pack(message, tmp_path)
    assert first.path is None and second.path is None and not list(tmp_path.iterdir())  # partial file removed
    assert len(caplog.records) == 1 and "No space left on device" in caplog.text and "--shm-size" in caplog.text
    _same_arrays(message.content["arrays"], unpack(first).content["arrays"])
