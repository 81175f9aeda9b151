"""The run store: WAL reads while a run writes, the sink the server uses, redaction (migrations: test_store_migrations.py)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from medfed.server.dashboard.read_models import STALE_AFTER_S, RunReader
from medfed.server.run_dir import RoundRecord, RunDirectory
from medfed.server.store import (
    RunStore,
    StoreError,
    StoreSink,
    open_sink,
    redact_config,
    scrub,
)
from medfed.shared.config import ConfigError, RunConfig


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs' / 'medfed.db'}"


def _record(server_round: int, *, eps: float, declined_site: str | None = None, failures: int = 0) -> RoundRecord:
    sites = {}
    for i, auc in enumerate((0.70, 0.80, 0.65)):
        site = f"site-{i}"
        declined = site == declined_site
        sites[site] = {
            "fit": {"num_examples": 0.0 if declined else 30.0 + i, "dp-epsilon": eps, "dp-budget-epsilon": 8.0,
                    "dp-declined": float(declined), "train-loss": 0.5},
            "eval": {"loss": 0.6, "auc": auc + 0.01 * server_round, "num_examples": 10.0},
        }
    return RoundRecord(round=server_round, seconds=1.5, global_metrics={"auc": 0.7 + 0.01 * server_round, "loss": 0.6},
                       sites=sites, num_fit_results=3, num_fit_failures=failures)


def test_a_missing_store_is_an_error_only_when_asked_not_to_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no run store at .*medfed simulate"):
        RunStore(_url(tmp_path), create=False)
    with pytest.raises(StoreError, match="invalid"):
        RunStore("not a url")


def test_readers_see_committed_rounds_while_a_writer_holds_its_transaction(tmp_path: Path) -> None:
    url = _url(tmp_path)
    writer, reader = RunStore(url), RunStore(url)
    run_id = writer.start_run("run-a", mode="federated", config={"num-server-rounds": 2})
    writer.round_finished(run_id, _record(1, eps=1.0).to_json())
    with writer.engine.connect() as conn:
        conn.execution_options(medfed_write=True)
        with conn.begin():  # BEGIN IMMEDIATE: the write lock is held until the block ends
            conn.execute(sa.text("UPDATE runs SET rounds_done = 2 WHERE id = 'run-a'"))
            start = time.perf_counter()
            (run,) = RunReader(reader).list_runs()  # does not wait for the writer (WAL)
            assert time.perf_counter() - start < 2.0
            assert run["rounds_done"] == 1  # the uncommitted change is not visible
            assert [r["round"] for r in RunReader(reader).rounds(run_id)] == [1]
        assert RunReader(reader).list_runs()[0]["rounds_done"] == 2
    writer.close()
    reader.close()


def test_a_reader_polls_while_a_writer_records_rounds(tmp_path: Path) -> None:
    url = _url(tmp_path)
    writer, reader = RunStore(url), RunStore(url)
    run_id = writer.start_run("run-b", mode="federated", config={"num-server-rounds": 40, "num-sites": 3})
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for rnd in range(1, 41):
                writer.round_started(run_id, rnd, selected=3)
                writer.round_finished(run_id, _record(rnd, eps=0.1 * rnd).to_json())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    while thread.is_alive():
        seen.append(RunReader(reader).get_run(run_id)["rounds_done"])
    thread.join()
    assert not errors, errors
    assert seen == sorted(seen)  # never goes backwards
    assert len(set(seen)) > 2  # the reader saw the run progress, not only its start and end
    assert RunReader(reader).get_run(run_id)["rounds_done"] == 40
    writer.close()
    reader.close()


def test_the_sink_records_a_run_through_its_run_directory(tmp_path: Path) -> None:
    url = _url(tmp_path)
    config = RunConfig(dataset=str(tmp_path / "hospital-a" / "patients.npz"), num_sites=3, num_server_rounds=2,
                       dp=True, store=url).to_run_config()
    run_dir = RunDirectory(tmp_path / "runs" / "run-x", config=config, mode="federated",
                           sink=StoreSink(RunStore(url)))
    run_dir.write_round(RoundRecord(round=0, seconds=0.0, global_metrics={"auc": 0.5, "loss": 0.7}))
    run_dir.round_started(1, selected=3)
    run_dir.write_round(_record(1, eps=2.0, failures=1))
    run_dir.round_started(2, selected=3)
    run_dir.write_round(_record(2, eps=3.0, declined_site="site-2"))
    run_dir.save_checkpoint("best", torch_module(), server_round=2, metrics={"auc": 0.72})
    run_dir.write_summary({"rounds": 2, "final_metrics": {"auc": 0.72}})

    with RunStore(url) as store:
        run = RunReader(store).get_run("run-x")
        assert run["status"] == "finished" and run["rounds_done"] == 2 and run["planned_rounds"] == 2
        assert run["config"]["dataset"] == "patients.npz"  # never the path
        assert "hospital-a" not in repr(run)  # nor any part of it
        assert [c["kind"] for c in run["checkpoints"]] == ["best"] and run["checkpoints"][0]["round"] == 2
        rounds = RunReader(store).rounds("run-x")
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert rounds[1]["selected"] == 3 and rounds[1]["responded"] == 3 and rounds[1]["failures"] == 1
        assert rounds[2]["secagg"] is None  # SecAgg+ off
        sites = {s["site"]: s for s in RunReader(store).sites("run-x")}
        assert set(sites) == {"site-0", "site-1", "site-2"}
        assert sites["site-0"]["epsilon"] == 3.0 and sites["site-0"]["budget_epsilon"] == 8.0
        assert sites["site-2"]["rounds_declined"] == 1 and sites["site-2"]["num_examples"] == 32.0
        assert sites["site-1"]["local_metrics"]["auc"] == pytest.approx(0.82)
        fairness = RunReader(store).fairness("run-x")
        assert fairness["metric"] == "auc" and fairness["higher_is_better"]
        last = fairness["rounds"][-1]
        assert (last["best_site"], last["worst_site"]) == ("site-1", "site-2")
        assert last["gap"] == pytest.approx(0.80 - 0.65)
        kinds = [e["kind"] for e in RunReader(store).events("run-x")]
        for kind in ("run-started", "round-started", "round-finished", "site-failures", "dp-declined",
                     "checkpoint", "run-finished"):
            assert kind in kinds, kind
        after = RunReader(store).events("run-x")[3]["id"]
        assert all(e["id"] > after for e in RunReader(store).events("run-x", after=after))


def test_secagg_outcomes_per_round_and_their_events(tmp_path: Path) -> None:
    with RunStore(_url(tmp_path)) as store:
        run_id = store.start_run("run-sa", mode="federated", config={"secagg": True})
        held = {"sampled": 3, "survivors": 2, "dropped": 1, "completed": True, "failed_stage": None,
                "seconds": 0.4, "active_after_stage": {"share-keys": 3, "collect-masked-vectors": 2}}
        failed = {"sampled": 3, "survivors": 1, "dropped": 2, "completed": False,
                  "failed_stage": "unmask", "seconds": 0.2, "active_after_stage": {"share-keys": 3}}
        store.round_finished(run_id, {**_record(1, eps=1.0).to_json(), "secagg": held})
        store.round_finished(run_id, {**_record(2, eps=1.0).to_json(), "secagg": failed})
        first, second = RunReader(store).rounds(run_id)
        assert first["secagg"] == {**held, "failed_stage": None}
        assert second["secagg"]["completed"] is False and second["secagg"]["failed_stage"] == "unmask"
        events = {e["kind"]: e for e in RunReader(store).events(run_id)}
        assert events["secagg-dropouts"]["round"] == 1 and "1 dropout" in events["secagg-dropouts"]["message"]
        assert events["secagg-failed"]["level"] == "error" and "unmask" in events["secagg-failed"]["message"]


def torch_module():
    from torch import nn

    return nn.Linear(2, 1)


def test_a_failed_run_and_its_warnings_are_recorded_without_paths(tmp_path: Path) -> None:
    url = _url(tmp_path)
    sink = StoreSink(RunStore(url))
    run_dir = RunDirectory(tmp_path / "runs" / "run-f", config={"num-server-rounds": 3}, mode="federated", sink=sink)
    log = logging.getLogger("medfed.server.test_store")
    log.warning("site data at /srv/hospital/patient-0042/scan.nii.gz looks odd")
    other = threading.Thread(target=lambda: log.warning("from another run's thread"))
    other.start()
    other.join()
    run_dir.fail(RuntimeError("cannot read /srv/hospital/patient-0042/scan.nii.gz"))
    log.warning("after the run")  # the handler is gone
    with RunStore(url) as store:
        run = RunReader(store).get_run("run-f")
        assert run["status"] == "failed"
        assert run["error"] == "RuntimeError: cannot read <path>"
        messages = [e["message"] for e in RunReader(store).events("run-f")]
        assert "site data at <path> looks odd" in messages
        assert not any("another run" in m or "after the run" in m for m in messages)
        assert not any("patient-0042" in m for m in messages)
        assert RunReader(store).events("run-f")[-1]["kind"] == "run-failed"


def test_a_store_write_that_fails_does_not_stop_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = RunStore(_url(tmp_path))
    sink = StoreSink(store)
    sink.run_started(run_dir=tmp_path / "run-w", mode="federated", config={}, versions={})

    def broken(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE", {}, Exception("disk I/O error"))

    store.round_finished = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="medfed.server.store"):
        sink.round_finished(_record(1, eps=1.0).to_json())
        sink.round_finished(_record(2, eps=1.0).to_json())
    warnings = [r for r in caplog.records if "could not record" in r.getMessage()]
    assert len(warnings) == 1  # said once, then quiet
    sink.run_finished({"rounds": 2})
    with RunStore(_url(tmp_path)) as again:
        assert RunReader(again).get_run("run-w")["status"] == "finished"


def test_a_silent_running_run_is_reported_stale(tmp_path: Path) -> None:
    with RunStore(_url(tmp_path)) as store:
        run_id = store.start_run("run-s", mode="federated", config={})
        assert RunReader(store).get_run(run_id)["status"] == "running"
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE runs SET last_update = :t"), {"t": time.time() - STALE_AFTER_S - 5})
        assert RunReader(store).get_run(run_id)["status"] == "stale"


def test_run_ids_stay_unique_in_a_shared_store(tmp_path: Path) -> None:
    with RunStore(_url(tmp_path)) as store:
        ids = [store.start_run("20260101-000000-fedavg-s0", mode="federated", config={}) for _ in range(3)]
    assert ids == ["20260101-000000-fedavg-s0", "20260101-000000-fedavg-s0-2", "20260101-000000-fedavg-s0-3"]


def test_the_store_key_of_the_run_config(tmp_path: Path) -> None:
    assert RunConfig().store_url == "sqlite:///runs/medfed.db"
    assert RunConfig(run_dir=str(tmp_path)).store_url == f"sqlite:///{tmp_path / 'medfed.db'}"
    assert RunConfig(store="postgresql+psycopg://coord@db/medfed").store_url == "postgresql+psycopg://coord@db/medfed"
    assert RunConfig(store="off").store_url is None and open_sink(RunConfig(store="off")) is None
    assert RunConfig.from_mapping({"store": "sqlite:///x.db"}).store == "sqlite:///x.db"
    for bad in ("mysql://x/y", "runs/medfed.db", "sqlite:"):
        with pytest.raises(ConfigError, match=r"store = .* is invalid"):
            RunConfig(store=bad)
    sink = open_sink(RunConfig(run_dir=str(tmp_path / "r")))
    assert isinstance(sink, StoreSink) and (tmp_path / "r" / "medfed.db").exists()
    sink.store.close()


def test_redaction_of_config_and_messages() -> None:
    cfg = redact_config({"dataset": "/data/site-a/datalist.json", "store": "postgresql://coord:s3cret@db/medfed",
                         "ledger-dir": "/var/medfed/ledgers", "model": "unet"})
    assert cfg == {"dataset": "datalist.json", "store": "postgresql://coord:***@db/medfed",
                   "ledger-dir": "ledgers", "model": "unet"}
    assert redact_config({"dataset": "synthetic"})["dataset"] == "synthetic"
    assert scrub("bad file C:\\data\\p1\\x.dcm and ./a/b/c.nii") == "bad file <path> and <path>"
    assert scrub("x" * 900).endswith("…") and len(scrub("x" * 900)) == 500
