"""The dashboard's link from each run to its model card (``/runs/{id}/report``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medfed.server.dashboard.app import create_app
from medfed.server.report import REPORT_FILE, REPORT_SECTIONS
from medfed.server.store import RunStore, StoreSink
from tests.support.dashboard_support import TOKEN
from tests.support.report_support import make_run

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def served(tmp_path: Path):
    runs = tmp_path / "runs"
    url = f"sqlite:///{runs / 'medfed.db'}"
    run = make_run(runs, sink=StoreSink(RunStore(url, create=True)))
    store = RunStore(url)
    try:
        with TestClient(create_app(store=store, token=TOKEN)) as client:
            yield client, run
    finally:
        store.close()


def test_the_report_is_written_once_and_rewritten_when_the_run_changes(served) -> None:
    client, run = served
    first = client.get(f"/runs/{run.name}/report", headers=AUTH)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    for _, title in REPORT_SECTIONS:
        assert f"<h2>{title}</h2>" in first.text
    assert "img-src 'self' data:" in first.headers["content-security-policy"]  # the inline plots may show
    written = (run / REPORT_FILE).stat().st_mtime_ns
    assert client.get(f"/runs/{run.name}/report", headers=AUTH).text == first.text
    assert (run / REPORT_FILE).stat().st_mtime_ns == written  # served as it was
    later = written + 5_000_000_000
    os.utime(run / "metrics.jsonl", ns=(later, later))  # a new round was recorded
    assert client.get(f"/runs/{run.name}/report", headers=AUTH).status_code == 200
    assert (run / REPORT_FILE).stat().st_mtime_ns != written


def test_unknown_runs_missing_directories_and_no_token_are_refused(served, tmp_path: Path) -> None:
    client, run = served
    assert client.get(f"/runs/{run.name}/report").status_code == 401
    assert client.get("/runs/nope/report", headers=AUTH).status_code == 404
    shutil.move(run, tmp_path / "elsewhere")
    gone = client.get(f"/runs/{run.name}/report", headers=AUTH)
    assert gone.status_code == 404 and "medfed report RUN_DIR" in gone.json()["detail"]

