"""An in-process Flower Grid for fast protocol tests (no Ray): every message is serialised.

Each node has its own :class:`~flwr.app.Context` (SecAgg+ keeps its state there, as on a real
SuperNode) and every message and reply goes through Flower's protobuf serialisation, so
nothing is shared between the server and the sites. A site that raises returns an error
reply, as Flower's runtime does; a site for which ``silent(message, partition_id)`` is true
never replies, and ``send_and_receive`` then waits out its ``timeout``.

The Ray-based tests (``run_simulation``) remain the end-to-end check; this harness lets the
failure paths (timeouts, stop-on-failure, DP with SecAgg+) run in well under a second.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.client import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid", "server_identity"]

Silent = Callable[[Message, int], bool]


def _copy(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


@contextmanager
def server_identity(run_id: int = 1) -> Iterator[None]:
    """Set Flower's process-wide task identity as a ServerApp's runtime does (restored after)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


class LocalGrid(Grid):
    """Deliver the server's messages to ``app`` at ``num_nodes`` in-process sites.

    Parameters
    ----------
    app
        The sites' ClientApp.
    num_nodes
        Sites ``partition-id`` 0..num_nodes-1 (node ids 101, 102, ...).
    run_config
        Every site's ``context.run_config``.
    silent
        ``silent(message, partition_id)``: the site does not answer this message.
    """

    def __init__(
        self, app: ClientApp, *, num_nodes: int, run_config: dict[str, Any] | None = None, silent: Silent | None = None
    ) -> None:
        self.app = app
        self.silent = silent
        self._run = Run.create_empty(run_id=1)
        self.contexts = {
            101 + i: Context(
                run_id=1,
                node_id=101 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []
        self.received: list[Message] = []

    @property
    def run(self) -> Run:
        return self._run

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used by the workflows
        self._run = Run.create_empty(run_id=run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:  # pragma: no cover
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("LocalGrid only implements send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("LocalGrid only implements send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies: list[Message] = []
        missing = False
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            message.metadata.__dict__["_run_id"] = self._run.run_id
            message.metadata.__dict__["_created_at"] = time.time()
            self.sent.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            partition = int(context.node_config["partition-id"])
            delivered = _copy(message)
            if self.silent is not None and self.silent(delivered, partition):
                missing = True
                continue
            try:
                reply = self.app(delivered, context)
            except Exception as err:  # noqa: BLE001 - Flower's runtime turns any exception into an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=delivered)
            reply = _copy(reply)
            self.received.append(reply)
            replies.append(reply)
        if missing:
            if timeout is None:
                raise RuntimeError("a silent site and no timeout: Flower's workflow would wait forever")
            time.sleep(timeout)
        return replies
