"""Test-only sites and a recording server Grid for the SecAgg+ tests (importable by Ray workers)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import Client, ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import NDArrays, Scalar, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from medfed.client.client_app import privacy_mods
from medfed.client.egress import egress_guard
from medfed.shared.config import RunConfig
from medfed.simulations.bench.secagg import NoiseClient

__all__ = ["RecordingNoiseClient", "dying_mod", "secagg_test_app", "ServerRecorder", "read_true_updates"]


class RecordingNoiseClient(NoiseClient):
    """A :class:`NoiseClient` that writes the update it sends (``local - global``, float64) to a file."""

    def __init__(self, *, out_dir: str, node_id: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.node_id = node_id

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        local, n, metrics = super().fit(parameters, config)
        update = [np.asarray(x, np.float64) - np.asarray(p, np.float64) for x, p in zip(local, parameters, strict=True)]
        name = f"r{int(config['server-round'])}-p{self.site_index}.npz"
        np.savez(Path(self.out_dir) / name, *update, node_id=self.node_id, num_examples=n)
        return local, n, metrics


def read_true_updates(out_dir: Path, server_round: int) -> dict[int, tuple[int, int, NDArrays]]:
    """``partition -> (node_id, num_examples, update)`` written by the sites in ``server_round``."""
    found = {}
    for path in sorted(out_dir.glob(f"r{server_round}-p*.npz")):
        with np.load(path) as data:
            arrays = [data[f"arr_{i}"] for i in range(len(data.files) - 2)]
            partition = int(path.stem.split("-p")[1])
            found[partition] = (int(data["node_id"]), int(data["num_examples"]), arrays)
    return found


def dying_mod(plan: dict[int, tuple[str, set[int]]]) -> Mod:
    """A mod that makes sites die: ``plan[round] = (secagg stage, partition ids)`` raise there."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
            stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
            server_round = int(msg.metadata.group_id)
            when = plan.get(server_round)
            if when and stage == when[0] and int(context.node_config["partition-id"]) in when[1]:
                raise RuntimeError(f"test: site dies at the {stage} stage of round {server_round}")
        return call_next(msg, context)

    return mod


def secagg_test_app(
    cfg: RunConfig, *, num_examples: list[int], out_dir: str, plan: dict[int, tuple[str, set[int]]] | None = None
) -> ClientApp:
    """medfed's mods (egress guard, SecAgg+, update mod) over recording noise sites; ``plan`` kills sites."""
    sizes = list(num_examples)

    def client_fn(context: Context) -> Client:
        index = int(context.node_config["partition-id"])
        return RecordingNoiseClient(
            out_dir=out_dir, node_id=int(context.node_id), site_index=index, num_examples=sizes[index]
        ).to_client()

    mods: list[Mod] = ([dying_mod(plan)] if plan else []) + [egress_guard, *privacy_mods(cfg)]
    return ClientApp(client_fn=client_fn, mods=mods)


class ServerRecorder:
    """Wraps the server's Grid and keeps what the server sends and receives, per round.

    ``masked[round][node_id]``: the masked vector a site uploaded (without the weight factor);
    ``globals_[round]``: the global weights sent with the round's training instruction;
    ``train_reply_arrays``: number of array entries in any training reply (0 under SecAgg+).
    """

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.masked: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
        self.globals_: dict[int, NDArrays] = {}
        self.train_reply_arrays = 0
        self.train_replies = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "train" and "fitins.parameters" in msg.content.array_records:
                params = compat.arrayrecord_to_parameters(msg.content.array_records["fitins.parameters"], keep_input=True)
                self.globals_.setdefault(int(msg.metadata.group_id), parameters_to_ndarrays(params))
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.message_type != "train" or not reply.has_content():
                continue
            self.train_replies += 1
            self.train_reply_arrays += sum(len(rec) for rec in reply.content.array_records.values())
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and Key.MASKED_PARAMETERS in configs:
                arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
                flat = np.concatenate([a.ravel() for a in arrays[1:]])  # arrays[0] is the weight factor
                self.masked[int(reply.metadata.group_id)][int(reply.metadata.src_node_id)] = flat
        return replies


ServerMain = Callable[[Any, Context], None]
