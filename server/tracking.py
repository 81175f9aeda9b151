"""Experiment tracking: a run's rounds, sites, params and artifacts in MLflow and TensorBoard.

:func:`export_run` copies a finished (or running) run directory; :class:`TrackingSink` writes
each round as it ends (run-config keys ``tracking-mlflow`` / ``tracking-tensorboard``, see
:func:`open_tracking_sinks`). Both go through one mapping, :func:`round_scalars`:

* ``global/<metric>``: the server's evaluation of the global model (test split, simulation);
* ``eval/<metric>`` and ``fit/<metric>``: the sites' aggregated validation and training metrics;
* ``site/<site>/eval/<metric>`` and ``site/<site>/fit/<metric>``: each site's own (incl. ``dp-epsilon``);
* ``round/seconds``, ``round/fit-results``, ``round/fit-failures``, ``secagg/dropped``.

The step of every scalar is the round (0: the initial model). Params are the run config (data
paths reduced to file names, no app signature) and ``version/<package>``. Artifacts: the run's
JSON files and its model card if written; checkpoints only when asked (they can be large).

MLflow's local file store (``./mlruns``) is in maintenance mode in MLflow 3 and refused unless
``MLFLOW_ALLOW_FILE_STORE=true``: a folder given here is an explicit request, so it is set for
the export. ``sqlite:///mlflow.db`` works too (artifacts then go beside the database).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.server.run_dir import read_metrics
from medfed.server.store.redaction import redact_config

__all__ = [
    "ARTIFACT_FILES",
    "MLFLOW_EXPERIMENT",
    "ExportResult",
    "MlflowTarget",
    "TensorBoardTarget",
    "TrackingError",
    "TrackingSink",
    "export_run",
    "mlflow_uri",
    "RunSinks",
    "open_run_sink",
    "open_tracking_sinks",
    "round_scalars",
]

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "medfed"
"""The MLflow experiment runs are exported into (unless told otherwise)."""
ARTIFACT_FILES = ("config.json", "summary.json", "metrics.jsonl", "cross_site.json", "app_bundle.json", "report.html")
"""Run-directory files copied as artifacts when present."""
RUN_TAG = "medfed.run_id"


class TrackingError(RuntimeError):
    """An export target cannot be written (the message names it and what to do)."""


# --------------------------------------------------------------------------- the mapping
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` record, keyed as the module docstring says."""
    out: dict[str, float] = {}
    for part in ("global", "eval", "fit"):
        for key, value in dict(record.get(part) or {}).items():
            number = _number(value)
            if number is not None:
                out[f"{part}/{key}"] = number
    for site, parts in dict(record.get("sites") or {}).items():
        for part, metrics in dict(parts).items():
            for key, value in dict(metrics).items():
                number = _number(value)
                if number is not None:
                    out[f"site/{site}/{part}/{key}"] = number
    for key, name in (("seconds", "round/seconds"), ("fit_results", "round/fit-results"),
                      ("fit_failures", "round/fit-failures"), ("eval_failures", "round/eval-failures")):
        number = _number(record.get(key))
        if number is not None:
            out[name] = number
    secagg = record.get("secagg")
    if isinstance(secagg, Mapping):
        for key in ("sampled", "survivors", "dropped"):
            number = _number(secagg.get(key))
            if number is not None:
                out[f"secagg/{key}"] = number
        out["secagg/completed"] = 1.0 if secagg.get("completed") else 0.0
    return out


def run_params(config: Mapping[str, Any], versions: Mapping[str, Any]) -> dict[str, str]:
    """Params of a run: its config (redacted, no signature) and ``version/<package>``."""
    params = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v)
              for k, v in redact_config(config).items() if k != "app-signature"}
    params.update({f"version/{k}": str(v) for k, v in versions.items()})
    return params


# --------------------------------------------------------------------------- targets
def mlflow_uri(target: str) -> tuple[str, bool]:
    """The MLflow tracking URI for ``target`` and whether it is a local file store.

    A URI with a scheme (``file:``, ``sqlite:``, ``http(s):``, ...) is kept; anything else is a
    folder (``./mlruns``), made absolute as a ``file:`` URI.
    """
    if "://" in target or target.startswith("file:"):
        return target, target.startswith("file:")
    return Path(target).resolve().as_uri(), True


def _mlflow() -> Any:
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise TrackingError(
            f"MLflow is not installed ({err}): pip install 'mlflow-skinny==3.18.0' (medfed's pinned version)."
        ) from None
    return mlflow, MlflowClient


class MlflowTarget:
    """One medfed run as one MLflow run (tag ``medfed.run_id``) in ``experiment``.

    Parameters
    ----------
    target
        A tracking URI or a local folder (see :func:`mlflow_uri`).
    run_id
        The medfed run's id (its run directory's name): the MLflow run's name and tag.
    replace
        An MLflow run already tagged with ``run_id`` is deleted first (otherwise: an error).
    """

    def __init__(self, target: str, *, run_id: str, experiment: str = MLFLOW_EXPERIMENT, replace: bool = False,
                 tags: Mapping[str, str] | None = None) -> None:
        _, client_cls = _mlflow()
        from mlflow.entities import RunStatus  # noqa: F401 - checks the import once

        uri, file_store = mlflow_uri(target)
        if file_store:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for explicitly
        self.uri = uri
        self.client = client_cls(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = None
                if uri.startswith("sqlite:///"):
                    location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
            existing = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'"
            )
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; name the target
            raise TrackingError(f"MLflow at {uri} cannot be used: {type(err).__name__}: {err}") from None
        if existing and not replace:
            raise TrackingError(
                f"MLflow at {uri} already holds medfed run {run_id} (MLflow run {existing[0].info.run_id}): "
                "pass --replace to export it again."
            )
        for old in existing:
            self.client.delete_run(old.info.run_id)
        run = self.client.create_run(self.experiment_id, run_name=run_id, tags={RUN_TAG: run_id, **dict(tags or {})})
        self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_round(self, step: int, scalars: Mapping[str, float], *, wall_time: float) -> None:
        from mlflow.entities import Metric

        stamp = int(wall_time * 1000)
        items = [Metric(k, v, stamp, step) for k, v in scalars.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: Path, *, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, *, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardTarget:
    """One medfed run as one TensorBoard run: event files in ``<log_dir>/<run_id>``."""

    def __init__(self, log_dir: str | Path, *, run_id: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise TrackingError(
                f"TensorBoard is not installed ({err}): pip install 'tensorboard==2.21.0' (medfed's pinned version)."
            ) from None
        self.path = Path(log_dir) / run_id
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"--tensorboard {log_dir}: cannot create {self.path} ({err}).") from None
        self.writer = SummaryWriter(log_dir=str(self.path))

    def log_params(self, params: Mapping[str, str]) -> None:
        table = "| key | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("run-config", table, global_step=0)

    def log_round(self, step: int, scalars: Mapping[str, float], *, wall_time: float) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall_time)
        self.writer.flush()

    def log_artifact(self, path: Path, *, folder: str | None = None) -> None:
        """TensorBoard has no artifacts: small text files go in as text, the rest is skipped."""
        if path.suffix in (".json",) and path.stat().st_size <= 200_000:
            self.writer.add_text(f"file/{path.name}", "```\n" + path.read_text(encoding="utf-8") + "\n```", global_step=0)

    def close(self, *, status: str = "FINISHED") -> None:
        self.writer.close()


# --------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_run` wrote."""

    rounds: int = 0
    scalars: int = 0
    params: int = 0
    artifacts: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    tensorboard_dir: Path | None = None


def _round_times(meta: Mapping[str, Any], records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], float]]:
    clock = float(meta.get("started") or time.time())
    for record in records:
        clock += float(record.get("seconds") or 0.0)
        yield record, clock


def export_run(
    run: str | Path,
    *,
    mlflow: str | None = None,
    tensorboard: str | Path | None = None,
    experiment: str = MLFLOW_EXPERIMENT,
    checkpoints: bool = False,
    replace: bool = False,
) -> ExportResult:
    """Export run directory ``run`` to MLflow (``mlflow``: URI or folder) and/or TensorBoard (``tensorboard``: folder).

    Raises
    ------
    TrackingError
        Neither target given, ``run`` is not a run directory, or a target cannot be written.
    """
    if mlflow is None and tensorboard is None:
        raise TrackingError("nothing to export to: give --mlflow URI_OR_FOLDER and/or --tensorboard FOLDER.")
    path = Path(run)
    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        records = read_metrics(path) if (path / "metrics.jsonl").exists() else []
    except FileNotFoundError:
        raise TrackingError(
            f"{path} is not a run directory (no config.json): give a folder `medfed simulate` or `medfed run` wrote."
        ) from None
    except ValueError as err:
        raise TrackingError(f"{path}: config.json or metrics.jsonl is not valid JSON ({err}).") from None
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.exists() else {}
    status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}.get(summary.get("status"), "RUNNING")
    tags = {"medfed.mode": str(meta.get("mode", "")), "medfed.status": str(summary.get("status", "running"))}
    targets: list[Any] = []
    result = ExportResult()
    if mlflow is not None:
        target = MlflowTarget(mlflow, run_id=path.name, experiment=experiment, replace=replace, tags=tags)
        targets.append(target)
        result.mlflow_run_id, result.mlflow_uri = target.run_id, target.uri
    if tensorboard is not None:
        board = TensorBoardTarget(tensorboard, run_id=path.name)
        targets.append(board)
        result.tensorboard_dir = board.path
    params = run_params(meta.get("config", {}), meta.get("versions", {}))
    files = [path / name for name in ARTIFACT_FILES if (path / name).is_file()]
    if checkpoints:
        files += sorted((path / "checkpoints").glob("*.pt"))
    try:
        for target in targets:
            target.log_params(params)
        for record, wall in _round_times(meta, records):
            scalars = round_scalars(record)
            for target in targets:
                target.log_round(int(record["round"]), scalars, wall_time=wall)
            result.scalars += len(scalars)
        for file in files:
            for target in targets:
                target.log_artifact(file, folder="checkpoints" if file.suffix == ".pt" else None)
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - a tracking backend's own error, with the target named
        raise TrackingError(f"export failed: {type(err).__name__}: {err}") from None
    finally:
        for target in targets:
            target.close(status=status if status != "RUNNING" else "FINISHED")
    result.rounds, result.params = len(records), len(params)
    result.artifacts = [f.name for f in files]
    return result


# --------------------------------------------------------------------------- live
class TrackingSink:
    """A run sink (:class:`medfed.server.store.RunSink`) that writes each round as it ends.

    Tracking must never stop a run: a failed write is logged once and tracking stops.
    """

    def __init__(self, *, mlflow: str | None = None, tensorboard: str | None = None,
                 experiment: str = MLFLOW_EXPERIMENT) -> None:
        self.mlflow, self.tensorboard, self.experiment = mlflow, tensorboard, experiment
        self.targets: list[Any] = []
        self._clock = time.time()
        self._broken = False

    def _guard(self, action: str, fn: Any) -> None:
        if self._broken:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - tracking must not stop the run
            self._broken = True
            logger.warning("experiment tracking stopped: could not record %s (%s: %s); the run goes on and "
                           "`medfed export-run` can export it afterwards.", action, type(err).__name__, err)

    def _open(self, run_id: str, config: Mapping[str, Any], versions: Mapping[str, str], *, replace: bool) -> None:
        def start() -> None:
            if self.mlflow:
                self.targets.append(MlflowTarget(self.mlflow, run_id=run_id, experiment=self.experiment,
                                                 replace=replace, tags={"medfed.status": "running"}))
            if self.tensorboard:
                self.targets.append(TensorBoardTarget(self.tensorboard, run_id=run_id))
            params = run_params(config, versions)
            for target in self.targets:
                target.log_params(params)

        self._guard("the run's start", start)

    def run_started(self, *, run_dir: Path, mode: str, config: Mapping[str, Any], versions: Mapping[str, str]) -> None:
        self._open(Path(run_dir).name, config, versions, replace=False)

    def run_resumed(self, *, run_id: str, run_dir: Path, config: Mapping[str, Any], after_round: int) -> None:
        self._open(Path(run_dir).name, config, {}, replace=True)  # resumed: the rounds are exported again
        self._guard("the earlier rounds", lambda: [self.round_finished(r) for r in read_metrics(run_dir)])

    def round_started(self, server_round: int, *, selected: int) -> None:
        """Nothing to record until the round ends."""

    def round_finished(self, record: Mapping[str, Any]) -> None:
        self._clock = time.time()
        scalars = round_scalars(record)
        self._guard(f"round {record.get('round')}", lambda: [
            t.log_round(int(record["round"]), scalars, wall_time=self._clock) for t in self.targets])

    def checkpoint(self, kind: str, *, server_round: int, metrics: Mapping[str, float]) -> None:
        """Checkpoints stay in the run directory (``medfed export-run --checkpoints`` copies them)."""

    def run_finished(self, summary: Mapping[str, Any]) -> None:
        self._close("FINISHED")

    def run_failed(self, error: BaseException) -> None:
        self._close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def _close(self, status: str) -> None:
        targets, self.targets = self.targets, []
        for target in targets:
            self._guard("the run's end", lambda t=target: t.close(status=status))


class RunSinks:
    """Several run sinks as one (:class:`medfed.server.run_dir.RunDirectory` takes one): the run
    store's first, then live tracking. ``run_id`` is the run store's."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks

    @property
    def run_id(self) -> str | None:
        return next((s.run_id for s in self.sinks if getattr(s, "run_id", None) is not None), None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "sinks":
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> None:
            for sink in self.sinks:
                getattr(sink, name)(*args, **kwargs)

        return call


def open_run_sink(cfg: Any) -> Any:
    """Where a run is recorded besides its directory: the run store (``store``) and live tracking
    (``tracking-mlflow``, ``tracking-tensorboard``); ``None`` when all are off.

    Raises
    ------
    medfed.server.store.StoreError
        As :func:`medfed.server.store.open_sink`.
    """
    from medfed.server.store import open_sink

    store = open_sink(cfg)
    sinks = [s for s in (store, *open_tracking_sinks(cfg)) if s is not None]
    if not sinks:
        return None
    return sinks[0] if len(sinks) == 1 else RunSinks(sinks)


def open_tracking_sinks(cfg: Any) -> list[TrackingSink]:
    """The live tracking sink for ``cfg.tracking_mlflow`` / ``cfg.tracking_tensorboard`` (``[]`` when both are empty)."""
    mlflow = getattr(cfg, "tracking_mlflow", "") or None
    tensorboard = getattr(cfg, "tracking_tensorboard", "") or None
    if mlflow is None and tensorboard is None:
        return []
    return [TrackingSink(mlflow=mlflow, tensorboard=tensorboard)]
