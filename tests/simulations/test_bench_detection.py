"""The detection benchmark's ``collect``: rows already in results.json are kept, new runs replace or join them."""

from __future__ import annotations

import json
from pathlib import Path

from medfed.simulations.bench.detection import SECTION, collect


def _row(method: str, map50: float) -> dict:
    return {"dataset": "bccd", "method": method, "map50": map50, "map50_95": map50 / 2, "per_class": {}, "wall_s": 1.0}


def test_collect_keeps_earlier_rows_and_adds_or_replaces_new_ones(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    earlier = [_row("federated", 0.05), _row("pooled", 0.35), _row("local-only", 0.06), _row("pooled-b3", 0.48)]
    results.write_text(json.dumps({"other": {"kept": True}, SECTION: earlier}))
    work = tmp_path / "work"
    work.mkdir()
    (work / "pooled-b3.json").write_text(json.dumps(_row("pooled-b3", 0.50)))  # a rerun replaces its row
    (work / "federated-b3-r80.json").write_text(json.dumps(_row("federated-b3-r80", 0.77)))  # a new variant
    rows = collect(work, results)
    data = json.loads(results.read_text())
    assert data["other"] == {"kept": True}
    assert [r["method"] for r in data[SECTION]] == ["federated", "pooled", "local-only", "pooled-b3", "federated-b3-r80"]
    assert rows == data[SECTION]
    assert {r["method"]: r["map50"] for r in rows}["pooled-b3"] == 0.50


def test_collect_writes_nothing_until_the_three_methods_exist(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"other": 1}))
    work = tmp_path / "work"
    work.mkdir()
    (work / "pooled.json").write_text(json.dumps(_row("pooled", 0.35)))
    assert collect(work, results) is None
    assert json.loads(results.read_text()) == {"other": 1}
