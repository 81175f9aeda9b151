"""Benchmark: a model's round trip to a forked site process, pickled through the pipe or through
the transfer file (:mod:`medfed.simulations.message_transfer`).

A model's weights as Flower sends them (an ``ArrayRecord``: one ``Array`` per tensor) go to one of
two forked processes of a ``ProcessPoolExecutor`` and come back unchanged, as a site's message and
reply do; each way is timed ``--repeat`` times, interleaved, and the medians are printed.

Usage::

    python -m medfed.simulations.bench.transfer --model resnet18 simplecnn --megabytes 0.25 1 4 --repeat 9
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from flwr.common import Array, ArrayRecord

from medfed.shared.config import RunConfig
from medfed.shared.data.loading import load_dataset
from medfed.shared.task import model_for
from medfed.simulations.message_transfer import Packed, pack, transfer_directory, unpack

__all__ = ["model_record", "round_trips", "synthetic_record"]

_DIRECTORY: str | None = None  # the transfer directory, set before the fork


def _echo(obj: Any) -> Any:
    return obj


def _echo_packed(packed: Packed) -> Packed:
    assert _DIRECTORY is not None
    return pack(unpack(packed), _DIRECTORY, file_min_bytes=0)


def model_record(model: str) -> ArrayRecord:
    """``model``'s initial weights (the synthetic task's shapes) as Flower's ``ArrayRecord``."""
    cfg = RunConfig(dataset="synthetic", model=model, synthetic_samples=64)
    net = model_for(cfg, load_dataset(cfg).train)
    return ArrayRecord({key: Array(value.detach().cpu().numpy()) for key, value in net.state_dict().items()})


def synthetic_record(megabytes: float, *, tensors: int = 4) -> ArrayRecord:
    """``tensors`` float32 tensors of ``megabytes`` MB in all (10^6 bytes), as Flower's ``ArrayRecord``."""
    size = max(1, int(megabytes * 1e6 / 4 / tensors))
    return ArrayRecord({f"w{i}": Array(np.full(size, i, np.float32)) for i in range(tensors)})


def round_trips(record: ArrayRecord, *, repeat: int) -> dict[str, float]:
    """Median seconds of a round trip of ``record`` to a forked process: pickled through the pipe,
    and packed with every tensor of 64 KiB or more through the transfer file, whatever the model's
    size (``file_min_bytes=0``: what :data:`FILE_MIN_BYTES` is chosen from); each checked to come
    back equal."""
    global _DIRECTORY
    pipe: list[float] = []
    packed: list[float] = []
    with transfer_directory() as directory:
        _DIRECTORY = directory
        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
        try:
            pool.submit(int).result()
            for _ in range(repeat):
                start = time.perf_counter()
                back = pool.submit(_echo, record).result()
                pipe.append(time.perf_counter() - start)
                start = time.perf_counter()
                back_packed = unpack(pool.submit(_echo_packed, pack(record, directory, file_min_bytes=0)).result())
                packed.append(time.perf_counter() - start)
                for got in (back, back_packed):
                    if any(got[key].data != record[key].data for key in record):
                        raise AssertionError("a tensor came back changed")
        finally:
            pool.shutdown()
            _DIRECTORY = None
    return {"pipe_s": statistics.median(pipe), "file_s": statistics.median(packed)}


def main() -> None:
    """Command-line entry point (prints one JSON object)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["resnet18", "simplecnn"])
    parser.add_argument("--megabytes", type=float, nargs="*", default=[], metavar="MB",
                        help="also records of 4 float32 tensors of these sizes (where the file starts to pay)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    out = []
    records = [(model, model_record(model)) for model in args.model]
    records += [(f"{mb:g} MB, 4 tensors", synthetic_record(mb)) for mb in args.megabytes]
    for name, record in records:
        megabytes = sum(len(array.data) for array in record.values()) / 1e6
        figures = round_trips(record, repeat=args.repeat)
        out.append({"model": name, "megabytes": round(megabytes, 2), "repeat": args.repeat,
                    **{k: round(v, 4) for k, v in figures.items()}})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
