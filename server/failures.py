"""Runs that could not train: the one error that says why, instead of a summary of an untrained model.

Two cases end a run as failed (``summary.json`` ``"status": "failed"``, the run store's run
``failed``, a non-zero exit):

* **every site failed** in a round (an error reply or no answer within ``round-timeout`` from
  every selected site): nothing can be aggregated, and the next round would fail the same way
  (a missing module, unreadable data, a model the sites cannot build), so the run stops there;
* **no round completed**: the run reached its last round without aggregating one (too few
  answers for ``min-fit-clients`` in every round, or every update rejected).

The run directory stays resumable from the last completed round (``medfed simulate --resume``)
once the cause is fixed. Messages name error classes and the error categories of the sites' egress
guards (or Flower's error codes), never a site's exception text (which could name a file).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from medfed.server.rounds import TIMEOUT, SiteFailure
from medfed.server.run_dir import RoundRecord

__all__ = ["RunFailedError", "every_site_failed", "no_round_completed"]


class RunFailedError(RuntimeError):
    """A run that could not train; ``str()`` is the one message for the user.

    Parameters
    ----------
    reason
        Why (see :func:`every_site_failed`, :func:`no_round_completed`).
    run_dir
        The run directory (``None`` if unknown).
    last_round
        The last completed round (``0``: only the initial model).
    """

    def __init__(self, reason: str, *, run_dir: Path | None = None, last_round: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_dir = run_dir
        self.last_round = last_round


def _describe(failures: Iterable[SiteFailure]) -> str:
    """``"3 x ImportError (environment-error)"`` per distinct kind, commonest first."""
    kinds = Counter(
        "no answer within round-timeout" if f.code == TIMEOUT else f"{f.error or 'unknown'} ({f.code})"
        for f in failures
    )
    return ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common())


def every_site_failed(server_round: int, failures: Sequence[SiteFailure], *, selected: int) -> str:
    """The reason of a run stopped because all ``selected`` sites failed ``server_round``."""
    what = _describe(failures) if failures else f"{selected} error repl{'y' if selected == 1 else 'ies'}"
    return (
        f"round {server_round}: every site failed to train ({selected} of {selected}: {what}), so "
        "the run stopped: the next round would fail the same way"
    )


def no_round_completed(records: Sequence[RoundRecord], *, min_results: int) -> str:
    """The reason of a run that ran its rounds without aggregating any (``records``: those rounds)."""
    rounds = [r for r in records if r.round > 0]
    if not rounds:
        return "no round completed: no site was selected for training"
    span = f"round {rounds[0].round}" if len(rounds) == 1 else f"rounds {rounds[0].round}-{rounds[-1].round}"
    answered = ", ".join(str(r.num_fit_results) for r in rounds)
    why = [f"sites that trained per round: {answered} (min-fit-clients = {min_results})"]
    failed = sum(r.num_fit_failures for r in rounds)
    if failed:
        why.append(f"{failed} failed site replies")
    rejected = sum(len(r.rejected) for r in rounds)
    if rejected:
        why.append(f"{rejected} rejected updates")
    skipped = sorted({r.skipped for r in rounds if r.skipped})
    if skipped:
        why.append("not aggregated: " + "; ".join(skipped))
    return f"no round completed in {span}, so the model is untrained: " + "; ".join(why)
