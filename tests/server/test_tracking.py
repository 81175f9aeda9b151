"""``medfed export-run`` and live tracking: a run in MLflow (local folder) and TensorBoard, read back."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.server.run_dir import read_metrics
from medfed.server.tracking import TrackingError, TrackingSink, export_run, mlflow_uri, round_scalars
from tests.support.report_support import EPSILON, GLOBAL_AUC, SITE_AUC, make_run

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is not installed: pip install -e '.[tracking]'")
event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed: pip install -e '.[tracking]'",
)

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("tracking") / "runs")


def _mlflow_run(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medfed")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`medfed.run_id` = '{run_id}'")
    return client, found


def _tensorboard(folder: Path):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_round_scalars_cover_global_site_and_round_figures() -> None:
    record = {"round": 3, "seconds": 2.5, "global": {"auc": 0.8, "flag": True}, "eval": {"auc": 0.7},
              "fit": {}, "sites": {"site-1": {"fit": {"dp-epsilon": 1.5}}}, "fit_results": 2,
              "secagg": {"sampled": 3, "survivors": 2, "dropped": 1, "completed": True}}
    assert round_scalars(record) == {
        "global/auc": 0.8, "eval/auc": 0.7, "site/site-1/fit/dp-epsilon": 1.5, "round/seconds": 2.5,
        "round/fit-results": 2.0, "secagg/sampled": 3.0, "secagg/survivors": 2.0, "secagg/dropped": 1.0,
        "secagg/completed": 1.0,
    }


@pytest.mark.parametrize(
    ("target", "uri", "file_store"),
    [("sqlite:///x/mlflow.db", "sqlite:///x/mlflow.db", False), ("http://mlflow:5000", "http://mlflow:5000", False),
     ("file:///tmp/mlruns", "file:///tmp/mlruns", True)],
)
def test_mlflow_targets(target: str, uri: str, file_store: bool) -> None:
    assert mlflow_uri(target) == (uri, file_store)


def test_a_folder_is_a_local_file_store(tmp_path: Path) -> None:
    assert mlflow_uri(str(tmp_path / "mlruns")) == ((tmp_path / "mlruns").as_uri(), True)


def test_export_to_mlflow_and_tensorboard_reads_back(run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export-run", str(run), "--mlflow", str(tmp_path / "mlruns"),
                                 "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    records = read_metrics(run)

    client, found = _mlflow_run((tmp_path / "mlruns").as_uri(), run.name)
    assert len(found) == 1
    exported = found[0]
    history = client.get_metric_history(exported.info.run_id, "global/auc")
    assert [(m.step, m.value) for m in history] == sorted(GLOBAL_AUC.items())
    site = client.get_metric_history(exported.info.run_id, "site/site-1/eval/auc")
    assert [(m.step, m.value) for m in site] == sorted(SITE_AUC["site-1"].items())
    eps = client.get_metric_history(exported.info.run_id, "site/site-0/fit/dp-epsilon")
    assert [(m.step, m.value) for m in eps] == sorted(EPSILON.items())
    params = exported.data.params
    assert params["strategy"] == "fedavg" and params["model"] == "simplecnn" and params["version/flwr"] == "1.42.0"
    assert "app-signature" not in params
    assert exported.info.status == "FINISHED" and exported.data.tags["medfed.status"] == "finished"
    artifacts = {a.path for a in client.list_artifacts(exported.info.run_id)}
    assert {"config.json", "summary.json", "metrics.jsonl"} <= artifacts

    board = _tensorboard(tmp_path / "tb" / run.name)
    scalars = board.Tags()["scalars"]
    assert len(scalars) == len(set().union(*(round_scalars(r) for r in records)))
    assert [(e.step, pytest.approx(e.value)) for e in board.Scalars("global/auc")] == sorted(GLOBAL_AUC.items())
    assert [(e.step, pytest.approx(e.value)) for e in board.Scalars("site/site-0/eval/auc")] == sorted(
        SITE_AUC["site-0"].items())
    text = board.Tensors("run-config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| strategy | fedavg |" in text and "| model | simplecnn |" in text


def test_exporting_twice_needs_replace(run: Path, tmp_path: Path) -> None:
    target = str(tmp_path / "mlruns")
    export_run(run, mlflow=target)
    with pytest.raises(TrackingError, match="--replace"):
        export_run(run, mlflow=target)
    export_run(run, mlflow=target, replace=True)
    _, found = _mlflow_run((tmp_path / "mlruns").as_uri(), run.name)
    assert len(found) == 1  # the first export was deleted


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "nothing to export to"), (["--tensorboard", "tb"], "is not a run directory")],
    ids=["no target", "not a run"],
)
def test_bad_exports_exit_nonzero(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["export-run", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output


def test_the_live_sink_records_each_round_as_it_ends(tmp_path: Path) -> None:
    sink = TrackingSink(mlflow=str(tmp_path / "mlruns"), tensorboard=str(tmp_path / "tb"))
    run = make_run(tmp_path / "runs", sink=sink)
    _, found = _mlflow_run((tmp_path / "mlruns").as_uri(), run.name)
    client = _mlflow_run((tmp_path / "mlruns").as_uri(), run.name)[0]
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    history = client.get_metric_history(found[0].info.run_id, "global/auc")
    assert [(m.step, m.value) for m in history] == sorted(GLOBAL_AUC.items())
    board = _tensorboard(tmp_path / "tb" / run.name)
    assert [e.step for e in board.Scalars("site/site-1/fit/dp-epsilon")] == [1, 2]


def test_a_broken_tracking_target_does_not_stop_the_run(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = TrackingSink(tensorboard=str(blocker))  # a file where the log folder should be
    run = make_run(tmp_path / "runs", sink=sink)
    assert (run / "summary.json").exists()
    assert "experiment tracking stopped" in caplog.text


def test_the_config_keys_add_live_tracking_beside_the_run_store(tmp_path: Path) -> None:
    from medfed.server.store import RunStore, StoreSink
    from medfed.server.tracking import RunSinks, open_run_sink
    from medfed.shared.config import RunConfig

    assert open_run_sink(RunConfig(store="off")) is None
    alone = open_run_sink(RunConfig(store="off", tracking_tensorboard=str(tmp_path / "tb")))
    assert isinstance(alone, TrackingSink) and alone.tensorboard == str(tmp_path / "tb")
    both = open_run_sink(RunConfig(run_dir=str(tmp_path / "runs"), tracking_mlflow=str(tmp_path / "mlruns")))
    assert isinstance(both, RunSinks) and [type(s) for s in both.sinks] == [StoreSink, TrackingSink]
    run = make_run(tmp_path / "runs", sink=both)
    assert both.run_id == run.name  # the run store's id
    store = RunStore(f"sqlite:///{tmp_path / 'runs' / 'medfed.db'}")
    try:
        from medfed.server.dashboard.read_models import RunReader

        assert [r["rounds_done"] for r in RunReader(store).list_runs()] == [2]
    finally:
        store.close()
    _, found = _mlflow_run((tmp_path / "mlruns").as_uri(), run.name)
    assert len(found) == 1 and found[0].info.status == "FINISHED"


def test_a_resumed_run_is_tracked_again_from_its_first_round(tmp_path: Path) -> None:
    import json

    from medfed.server.run_dir import RoundRecord, RunDirectory

    target = str(tmp_path / "mlruns")
    run = make_run(tmp_path / "runs", rounds=1, finish=False, sink=TrackingSink(mlflow=target))
    config = json.loads((run / "config.json").read_text())["config"]
    resumed = RunDirectory(run, config=config, mode="federated", sink=TrackingSink(mlflow=target), resume_after=1)
    resumed.write_round(RoundRecord(round=2, global_metrics={"auc": 0.9}))
    resumed.write_summary({"status": "finished"})
    client, found = _mlflow_run((tmp_path / "mlruns").as_uri(), run.name)
    assert len(found) == 1 and found[0].info.status == "FINISHED"  # the interrupted one was replaced
    history = client.get_metric_history(found[0].info.run_id, "global/auc")
    assert [(m.step, m.value) for m in history] == [(0, GLOBAL_AUC[0]), (1, GLOBAL_AUC[1]), (2, 0.9)]
