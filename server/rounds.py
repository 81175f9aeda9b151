"""Round control around Flower's legacy ``DefaultWorkflow``: true round numbers after a resume,
a round timeout, and which site failed.

Flower 1.42's ``DefaultWorkflow`` runs rounds ``1..num_rounds`` and, in its per-round steps
(``default_fit_workflow``, ``default_evaluate_workflow``), waits for every site without a time
limit (``ServerConfig.round_timeout`` is only read by the older ``start_server`` loop) and keeps
a failed reply only as ``Exception(error)``, without the node it came from. medfed keeps
Flower's workflow and wraps its steps with :class:`RoundStep`:

* **Round offset** (resume): at the start of each round ``DefaultWorkflow`` writes the round
  number into its config record and calls the fit step first; the fit step of a resumed run adds
  the number of rounds already completed, so the strategy, the sites (``server-round`` in the fit
  config, which sets their seed and learning rate), SecAgg+ and every record see the true round.
* **Timeout**: each step passes ``round-timeout`` to ``Grid.send_and_receive`` (Flower's own
  timeout); a site that has not answered by then is recorded as failed for that round.
* **Failures**: the step's grid notes every error reply (node, Flower's error code, the
  exception class Flower reports; never the message text, which could name a file) and every
  site that did not answer, and hands them to the recording strategy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.compat.server.typing import Workflow
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from medfed.shared.error_codes import CATEGORY_OF_CODE

__all__ = [
    "SiteFailure",
    "FailureCallback",
    "RoundStep",
    "ObservedGrid",
    "apply_round_offset",
    "error_class",
    "TIMEOUT",
]

logger = logging.getLogger(__name__)

TIMEOUT = "TIMEOUT"
"""The :attr:`SiteFailure.code` of a site that did not answer within ``round-timeout``."""

_CODE_NAMES = {
    **{value: name for name, value in vars(ErrorCode).items() if name.isupper()},
    **CATEGORY_OF_CODE,  # a site's egress guard: "data-error", "internal-error", ...
}
_FLOWER_CLASS = re.compile(r"<class '([A-Za-z_][\w.]*)(?:\(([A-Za-z_][\w.]*)\))?'>")
_LEADING_NAME = re.compile(r"([A-Za-z_]\w*)(?::|$)")


@dataclass(frozen=True)
class SiteFailure:
    """One site that failed one step of one round.

    Parameters
    ----------
    node_id
        Flower's node id of the site (the recording strategy maps it to ``site-<k>``).
    code
        The category a site's egress guard sent (``"data-error"``, ``"internal-error"``, ...;
        :mod:`medfed.shared.error_codes`), Flower's ``ErrorCode`` name for an error no guard
        saw (e.g. ``"LOAD_CLIENT_APP_EXCEPTION"``), or :data:`TIMEOUT` when the site did not
        answer in time.
    error
        The exception class Flower reports (``""`` for a timeout). Never the message.
    """

    node_id: int
    code: str
    error: str

    def to_json(self, *, site: str | None) -> dict[str, Any]:
        """``{"site", "node", "code", "error"}`` (``site`` is ``None`` when not yet known)."""
        return {"site": site, "node": int(self.node_id), "code": self.code, "error": self.error}


FailureCallback = Callable[[int, str, list[SiteFailure]], None]
"""``(server_round, step, failures)`` with ``step`` ``"fit"`` or ``"evaluate"``."""


def error_class(reason: str) -> str:
    """The exception class named in a Flower error reason, without the message.

    Flower writes ``"<class 'pkg.ClassName'>:<'message'>"`` (a SuperNode: the site's own
    exception class; the simulation engine: Ray's ``RayTaskError(ClientAppException)``, of which
    the wrapped class is kept); a site's egress guard and other runtimes write
    ``"ClassName: ..."``. Returns
    ``"unknown"`` when neither form matches.
    """
    match = _FLOWER_CLASS.search(reason)
    if match:
        return (match.group(2) or match.group(1)).rsplit(".", 1)[-1]
    match = _LEADING_NAME.match(reason.strip())
    return match.group(1) if match else "unknown"


class ObservedGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that applies a timeout and reports failed sites.

    Every call is delegated to ``grid``; :meth:`send_and_receive` passes ``timeout`` when the
    caller gave none and reports, after the replies are in, the error replies and the sites
    that did not answer.

    Parameters
    ----------
    grid
        The ServerApp's grid.
    timeout
        Seconds to wait for replies (``None``: no limit, Flower's default).
    on_failures
        Called with the failures of each ``send_and_receive`` (not called when there are none).
    """

    def __init__(
        self, grid: Grid, *, timeout: float | None, on_failures: Callable[[list[SiteFailure]], None] | None
    ) -> None:
        self.grid = grid
        self.timeout = timeout
        self.on_failures = on_failures

    @property
    def run(self) -> Run:
        """The delegate's run."""
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        """Delegate."""
        self.grid.set_run(run_id)

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Delegate."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate."""
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Delegate with ``timeout`` (or this grid's), then report error replies and missing sites."""
        messages = list(messages)
        sent = [int(m.metadata.dst_node_id) for m in messages]
        replies = list(self.grid.send_and_receive(messages, timeout=timeout if timeout is not None else self.timeout))
        answered = {int(r.metadata.src_node_id) for r in replies}
        failures = [
            SiteFailure(
                node_id=int(r.metadata.src_node_id),
                code=_CODE_NAMES.get(r.error.code, f"code-{r.error.code}"),
                error=error_class(r.error.reason or ""),
            )
            for r in replies
            if r.has_error()
        ]
        failures += [SiteFailure(node_id=node, code=TIMEOUT, error="") for node in sent if node not in answered]
        if failures and self.on_failures is not None:
            self.on_failures(failures)
        return replies


def apply_round_offset(context: LegacyContext, offset: int) -> int:
    """Add ``offset`` to the round number ``DefaultWorkflow`` wrote for this round; return the result.

    Called by the fit step only: ``DefaultWorkflow`` (flwr 1.42, ``default_workflows.py``)
    writes ``current_round`` into ``context.state.config_records[MAIN_CONFIGS_RECORD]`` at the
    start of every round and calls the fit step first; the centralised evaluation and the
    evaluate step of the round then read the true round from there.
    """
    config = context.state.config_records[MAIN_CONFIGS_RECORD]
    if offset:
        config[WorkflowKey.CURRENT_ROUND] = int(config[WorkflowKey.CURRENT_ROUND]) + offset  # type: ignore[arg-type]
    return int(config[WorkflowKey.CURRENT_ROUND])  # type: ignore[arg-type]


class RoundStep:
    """One per-round step of ``DefaultWorkflow`` (fit or evaluate) with medfed's round control.

    Parameters
    ----------
    inner
        Flower's step: ``default_fit_workflow``, ``default_evaluate_workflow`` or a SecAgg+
        fit workflow.
    step
        ``"fit"`` or ``"evaluate"`` (passed to ``on_failures``).
    round_offset
        Rounds already completed before this process started (resume). Only the fit step, which
        ``DefaultWorkflow`` calls first in every round, applies it: it rewrites the round number
        in the workflow's config record, which the centralised evaluation and the evaluate step
        of the same round then read.
    timeout
        ``round-timeout`` in seconds (``None``: no limit).
    observe
        Wrap the grid to apply ``timeout`` and report failures (off for SecAgg+, whose workflow
        has its own per-stage timeout and records its own dropouts).
    on_failures
        Receives ``(server_round, step, failures)``.
    """

    def __init__(
        self,
        inner: Workflow,
        *,
        step: str,
        round_offset: int = 0,
        timeout: float | None = None,
        observe: bool = True,
        on_failures: FailureCallback | None = None,
    ) -> None:
        if step not in ("fit", "evaluate"):
            raise ValueError(f"step = {step!r} is invalid. Valid choices: 'fit', 'evaluate'.")
        if round_offset and step != "fit":
            raise ValueError("only the fit step applies the round offset (it runs first in every round).")
        self.inner = inner
        self.step = step
        self.round_offset = round_offset
        self.timeout = timeout
        self.observe = observe
        self.on_failures = on_failures

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        """Run the inner step at the true round number, on an observed grid."""
        server_round = apply_round_offset(context, self.round_offset)
        if not self.observe:
            self.inner(grid, context)
            return

        def report(failures: list[SiteFailure]) -> None:
            if self.on_failures is not None:
                self.on_failures(server_round, self.step, failures)

        self.inner(ObservedGrid(grid, timeout=self.timeout, on_failures=report), context)
