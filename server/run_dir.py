"""A run directory: config, per-round metrics (JSONL), best and final checkpoints.

Layout (other tools read it)::

    <run_dir>/config.json          run config + versions + mode
    <run_dir>/metrics.jsonl        one JSON object per round (round 0 = initial model)
    <run_dir>/summary.json         status (finished | failed | interrupted), final and best rounds, wall time
    <run_dir>/cross_site.json      the sites' evaluation of the final model on their local test splits
                                   (server.cross_site; cross_site_<checkpoint>.json for another checkpoint)
    <run_dir>/checkpoints/best.pt  {"state_dict", "config", "round", "metrics", "model_shape"}
    <run_dir>/checkpoints/final.pt same keys
    <run_dir>/checkpoints/resume.pt the server's state after the last completed round (server.resume)
    <run_dir>/app_bundle.json      a deployment's app bundle: {"fab_sha256", "signed"}

``"model_shape"`` (:meth:`medfed.shared.inference.ModelShape.to_json`: task, dims, channels, classes,
training image shape) is there when the run set :attr:`RunDirectory.model_shape`; ``medfed predict``
and ``medfed export`` read it (``medfed.shared.inference.load_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medfed.shared.files import write_atomically

if TYPE_CHECKING:
    from medfed.server.store import RunSink

__all__ = ["CROSS_SITE_FILE", "RunDirectory", "RoundRecord", "cross_site_path", "new_run_path", "read_metrics", "write_cross_site_file"]

logger = logging.getLogger(__name__)

_FILE_MODE = 0o644
"""Run-directory files are readable by other users (as ``open`` makes them under the usual umask)."""


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` in UTF-8 through :func:`medfed.shared.files.write_atomically` (a crash keeps the old file)."""
    write_atomically(path, lambda fh: fh.write(text.encode("utf-8")), mode=_FILE_MODE)


@dataclass
class RoundRecord:
    """Everything recorded about one round; written as one JSON line."""

    round: int
    started: float = field(default_factory=time.time)
    seconds: float | None = None
    global_metrics: dict[str, float] = field(default_factory=dict)
    fit_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    sites: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    num_fit_results: int = 0
    num_fit_failures: int = 0
    failed_sites: list[dict[str, Any]] = field(default_factory=list)
    """Each site that failed to train this round: ``{"site", "node", "code", "error"}`` (see
    :class:`medfed.server.rounds.SiteFailure`; ``site`` is ``None`` if the site never answered in this
    process, ``code`` is ``"TIMEOUT"`` for no answer within ``round-timeout``)."""
    num_eval_failures: int = 0
    secagg: dict[str, Any] | None = None
    """SecAgg+ rounds: sampled, survivors, dropped, completed, failed_stage (``None`` when off).

    Under SecAgg+ the server never sees a site's update: ``sites`` then holds only what each
    site reports in the clear (example count and scalar metrics)."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """Updates the server rejected this round (``medfed.server.validation``): ``{"site", "node",
    "reason", "detail"}`` each; under SecAgg+ ``site`` is ``"aggregate"``."""
    skipped: str | None = None
    """Why nothing was aggregated this round (the global model is unchanged); ``None`` otherwise."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``metrics.jsonl``."""
        return {
            "round": self.round,
            "seconds": self.seconds,
            "global": self.global_metrics,
            "fit": self.fit_metrics,
            "eval": self.eval_metrics,
            "sites": self.sites,
            "fit_results": self.num_fit_results,
            "fit_failures": self.num_fit_failures,
            "failed_sites": self.failed_sites,
            "eval_failures": self.num_eval_failures,
            "secagg": self.secagg,
            "rejected": self.rejected,
            "skipped": self.skipped,
        }


def new_run_path(base: str | Path, *, name: str) -> Path:
    """A fresh, empty ``<base>/<UTC time>-<name>`` folder, created here.

    Creating it (rather than only testing that the name is free) claims it: two runs started in
    the same second, e.g. two benchmarks side by side, get ``...-<name>`` and ``...-<name>-2``
    instead of writing into one folder.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    Path(base).mkdir(parents=True, exist_ok=True)
    path = Path(base) / f"{stamp}-{name}"
    suffix = 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1
            path = Path(base) / f"{stamp}-{name}-{suffix}"


CROSS_SITE_FILE = "cross_site.json"
"""The cross-site report of the final model (:mod:`medfed.server.cross_site`)."""


def cross_site_path(run_path: str | Path, checkpoint: str) -> Path:
    """Where the cross-site report of ``checkpoint`` goes: ``cross_site.json`` for ``"final"``,
    else ``cross_site_<checkpoint>.json``."""
    name = CROSS_SITE_FILE if checkpoint == "final" else f"cross_site_{checkpoint}.json"
    return Path(run_path) / name


def write_cross_site_file(run_path: str | Path, report: Mapping[str, Any]) -> Path:
    """Write a cross-site report (its ``"checkpoint"`` names the file: :func:`cross_site_path`)."""
    target = cross_site_path(run_path, str(report["checkpoint"]))
    _write_text(target, json.dumps(report, indent=2, sort_keys=False) + "\n")
    return target


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The round records of a run directory (or of a ``metrics.jsonl`` file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


class RunDirectory:
    """Writes one run's directory.

    Parameters
    ----------
    path
        The folder; created with its parents.
    config
        The kebab-case run config to store in ``config.json``.
    mode
        ``"federated"`` or ``"pooled"``.
    sink
        Also records the run there (the run store, :class:`medfed.server.store.StoreSink`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        config: Mapping[str, Any],
        mode: str,
        sink: RunSink | None = None,
        resume_after: int | None = None,
        run_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.sink = sink
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future[object]] = []
        self._writer_lock = threading.Lock()
        self.model_shape: dict[str, Any] | None = None
        """Stored in every checkpoint as ``"model_shape"`` when set (``ModelShape.to_json()``)."""
        if resume_after is not None:
            self._reopen(resume_after, run_id=run_id)
            return
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.started = time.time()
        versions = {}
        for dist in ("medfed", "flwr", "torch", "monai", "opacus"):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[dist] = "not installed"
        meta = {"mode": mode, "config": self.config, "versions": versions, "started": self.started}
        _write_text(self.path / "config.json", json.dumps(meta, indent=2, sort_keys=True))
        self._metrics = (self.path / "metrics.jsonl").open("a", encoding="utf-8")
        if sink is not None:
            sink.run_started(run_dir=self.path, mode=mode, config=self.config, versions=versions)

    def _reopen(self, after_round: int, *, run_id: str | None) -> None:
        """Continue an existing run directory after round ``after_round`` (see ``medfed.server.resume``).

        ``config.json`` and the start time stay as they were; ``metrics.jsonl`` keeps rounds
        ``0..after_round`` (a round recorded after the saved state, or a line cut short by the
        crash, is dropped: the resumed run records that round again); the sink continues the
        run-store run ``run_id``.

        Raises
        ------
        ValueError
            If ``metrics.jsonl`` lacks one of the rounds ``0..after_round`` (naming the file).
        """
        meta = json.loads((self.path / "config.json").read_text())
        self.config = dict(meta["config"])
        self.started = float(meta["started"])
        metrics = self.path / "metrics.jsonl"
        kept: list[str] = []
        dropped = 0
        for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []:
            try:
                round_number = int(json.loads(line)["round"])
            except (ValueError, KeyError, TypeError):
                dropped += 1  # the line the crash cut short
                continue
            if round_number <= after_round:
                kept.append(line)
            else:
                dropped += 1
        rounds = [int(json.loads(line)["round"]) for line in kept]
        if rounds != list(range(after_round + 1)):
            raise ValueError(
                f"{metrics} holds rounds {rounds} but the resume state is at round {after_round}: "
                "the run directory is inconsistent and cannot be resumed; start a new run."
            )
        _write_text(metrics, "".join(line + "\n" for line in kept))
        if dropped:
            logger.warning(
                "resume: %d line(s) of metrics.jsonl after round %d were dropped; those rounds run again.",
                dropped,
                after_round,
            )
        self._metrics = metrics.open("a", encoding="utf-8")
        if self.sink is not None:
            self.sink.run_resumed(run_id=run_id or self.path.name, run_dir=self.path, config=self.config, after_round=after_round)

    @property
    def run_id(self) -> str | None:
        """The run-store run id (``None`` without a store)."""
        return getattr(self.sink, "run_id", None) if self.sink is not None else None

    def round_started(self, server_round: int, *, selected: int) -> None:
        """A round began with ``selected`` sites (only the sink records it)."""
        if self.sink is not None:
            self.sink.round_started(server_round, selected=selected)

    def fail(self, error: BaseException) -> None:
        """The run failed (only the sink records it; the files keep what was written)."""
        self.wait_for_writes(raise_errors=False)
        if self.sink is not None:
            self.sink.run_failed(error)

    def write_round(self, record: RoundRecord) -> None:
        """Append one round's record (flushed at once so readers see it)."""
        if self.stopped:
            return
        self._metrics.write(json.dumps(record.to_json(), sort_keys=True) + "\n")
        self._metrics.flush()
        if self.sink is not None:
            self.sink.round_finished(record.to_json())

    def save_checkpoint(
        self,
        kind: str,
        model: nn.Module,
        *,
        server_round: int,
        metrics: Mapping[str, float],
        later: bool = False,
    ) -> Path:
        """Write ``checkpoints/<kind>.pt`` with the state dict and the run config (nothing once
        :meth:`stop_recording` was called).

        ``later``: take a copy of the model's state now and write it in the run's writer thread
        (:meth:`write_later`); the sink hears of the checkpoint once it is on disk.
        """
        target = self.path / "checkpoints" / f"{kind}.pt"
        if self.stopped:
            return target
        state = model.state_dict()
        payload = {
            "state_dict": {k: v.detach().clone() for k, v in state.items()} if later else state,
            "config": self.config,
            "round": server_round,
            "metrics": dict(metrics),
        }
        if self.model_shape is not None:
            payload["model_shape"] = dict(self.model_shape)

        def write() -> None:
            write_atomically(target, lambda fh: torch.save(payload, fh), mode=_FILE_MODE)
            if self.sink is not None:
                self.sink.checkpoint(kind, server_round=server_round, metrics=metrics)

        if later:
            self.write_later(write)
        else:
            write()
        return target

    def write_later(self, write: Callable[[], object]) -> None:
        """Run ``write`` (it writes this run's files: the resume state, a checkpoint) in the run's
        writer thread, after every write asked for before it, while the calling thread goes on.

        A federated round ends with its resume state and, when the global model improved, the
        best checkpoint (ResNet-18: 0.15 s of file writing a round in a one-off timing, 2026-12-07); the next
        round's sites train meanwhile. :meth:`wait_for_writes` waits for them; the summary of a
        finished, failed or interrupted run is written after them.

        Raises
        ------
        OSError
            An earlier write failed (disk full, permissions): its error, raised here in the
            calling thread (also by :meth:`wait_for_writes`).
        """
        self._raise_failed_write()
        with self._writer_lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfed-run-writer")
            self._writes.append(self._writer.submit(write))

    def wait_for_writes(self, *, raise_errors: bool = True) -> None:
        """Return once every :meth:`write_later` write has finished, and end the writer thread
        (from any thread but the writer's).

        ``raise_errors``: raise the first failed write's error (else log it: a run already
        failing or interrupted keeps its own error).
        """
        with self._writer_lock:
            writes, self._writes = self._writes, []
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)  # its thread ends (a later write_later starts another)
        errors = [err for err in (future.exception() for future in writes) if err is not None]
        if errors and raise_errors:
            raise errors[0]
        for err in errors:
            logger.error("run %s: writing a checkpoint or the resume state failed: %s", self.path.name, err)

    def _raise_failed_write(self) -> None:
        with self._writer_lock:
            done = [future for future in self._writes if future.done()]
            self._writes = [future for future in self._writes if not future.done()]
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]

    def write_app_bundle(self, fab_sha256: str, *, signed: bool) -> None:
        """Record the app bundle (FAB) a deployed run runs: its SHA-256 and whether it was signed
        (``app_bundle.json``; ``medfed report`` shows it)."""
        data = {"fab_sha256": fab_sha256, "signed": signed}
        _write_text(self.path / "app_bundle.json", json.dumps(data, indent=2, sort_keys=True))

    def write_init_weights(self, report: Mapping[str, Any]) -> None:
        """Record what ``init-weights`` loaded into the initial model (``init_weights.json``: the
        file's path, kind and SHA-256, and the loaded, skipped, new and unused entries)."""
        _write_text(self.path / "init_weights.json", json.dumps(dict(report), indent=2, sort_keys=True))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` and close the metrics file.

        A summary with ``"status": "failed"`` records the run as failed in the sink, with its
        ``"failure"``; any other as finished.
        """
        if self.stopped:
            return
        self.wait_for_writes(raise_errors=summary.get("status") != "failed")
        data = {"seconds": time.time() - self.started, **summary}
        _write_text(self.path / "summary.json", json.dumps(data, indent=2, sort_keys=True))
        self._metrics.close()
        if self.sink is not None:
            if data.get("status") == "failed":
                self.sink.run_failed(RuntimeError(str(data.get("failure", "the run failed"))))
            else:
                self.sink.run_finished(data)

    def write_cross_site(self, report: Mapping[str, Any]) -> Path:
        """Write the cross-site report (:func:`write_cross_site_file`) and record it in the sink."""
        target = cross_site_path(self.path, str(report["checkpoint"]))
        if self.stopped:
            return target
        write_cross_site_file(self.path, report)
        if self.sink is not None:
            self.sink.cross_site(report)
        return target

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop_recording` was called: rounds, checkpoints and the summary are no
        longer written (a run being interrupted)."""
        return getattr(self, "_stopped", False)

    def stop_recording(self) -> None:
        """Write nothing more for this run (rounds, checkpoints, summary, resume state), from any thread.

        Called first when a run is interrupted: the threads of a simulation whose sites were
        just ended may still close a round as "every site failed"; that is not what happened.
        """
        self._stopped = True

    def mark_interrupted(
        self, *, last_round: int | None, planned_rounds: int, reason: str, resumable: bool = True
    ) -> None:
        """The run was stopped (Ctrl-C): ``summary.json`` says so, the sink records it as failed.

        Unlike a finished run's, this summary does not end the run: ``medfed simulate --resume``
        continues it after ``last_round`` (its ``checkpoints/resume.pt``). Safe to call from
        another thread than the one recording rounds.

        Parameters
        ----------
        last_round
            The last completed round (``None``: not even the initial model was evaluated).
        planned_rounds
            ``num-server-rounds``.
        reason
            What stopped it (for the sink), e.g. ``"interrupted (SIGINT) after round 2 of 5"``.
        resumable
            Whether the run can be resumed at all (a pooled run cannot); with no completed
            round it cannot either.
        """
        self.stop_recording()
        self.wait_for_writes(raise_errors=False)
        data = {
            "status": "interrupted",
            "rounds": last_round,
            "last_completed_round": last_round,
            "num_server_rounds": planned_rounds,
            "seconds": time.time() - self.started,
            "resumable": resumable and last_round is not None,
        }
        _write_text(self.path / "summary.json", json.dumps(data, indent=2, sort_keys=True))
        if self.sink is not None:
            self.sink.run_failed(KeyboardInterrupt(reason))
