"""Cross-site evaluation in a simulation (in process, on the LocalGrid): after the last round every
site scores the final model on its local test split; one row per site and per reported subgroup
lands in ``cross_site.json``, the run store and the dashboard API; a subgroup below the minimum
leaves no trace in the messages; the on-demand evaluation of the checkpoint gives the same rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from flwr.app import Context, RecordDict
from PIL import Image
from typer.testing import CliRunner

from medfed.cli import app
from medfed.client.client_app import make_client_app
from medfed.client.egress import allowed_name, inspect_message
from medfed.client.site_data import simulated_site_data
from medfed.server.dashboard.app import BackgroundServer, create_app
from medfed.server.dashboard.read_models import RunReader
from medfed.server.server_app import ServerHooks, run_server
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from medfed.shared.data.metadata import subgroup_code
from medfed.simulations.cross_site import cross_site_of_checkpoint
from medfed.simulations.progress import summary_lines
from tests.support.dashboard_support import TOKEN
from tests.support.local_grid import LocalGrid, server_identity

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the sites run in this process

MIN_COUNT = 8
RARE = "Canon Aquilion"  # about 4 test images per site: always below the minimum


def _same(got: Any, expected: Any) -> bool:
    """Equal, floats to 1e-9 (JSON and the store round-trip them)."""
    if isinstance(expected, dict):
        return isinstance(got, dict) and got.keys() == expected.keys() and all(_same(got[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(_same, got, expected))
    if isinstance(expected, float):
        return got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    return got == expected


def _entries(root: Path, n: int, offset: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        label = i % 2
        name = f"img/{offset + i}.png"
        Image.fromarray((rng.random((8, 8)) * 100 + label * 120).astype(np.uint8)).save(root / name)
        scanner = RARE if i % 10 == 7 else ("Siemens Skyra" if i % 3 else "GE Signa 1.5T")
        out.append({"image": name, "label": label, "sex": "F" if (i // 2) % 2 else "M",
                    "age": 20 + (i * 7) % 60, "scanner": scanner})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cross-site")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    datalist = {"training": _entries(root, 160, 0, rng), "validation": _entries(root, 40, 1000, rng),
                "test": _entries(root, 40, 2000, rng)}
    (root / "datalist.json").write_text(json.dumps(datalist))
    cfg = RunConfig(dataset=str(root / "datalist.json"), image_size=8, model="simplecnn", batch_size=16,
                    num_sites=2, num_server_rounds=1, local_test_fraction=0.5, cross_site_min_count=MIN_COUNT,
                    run_dir=str(root / "runs"), store=f"sqlite:///{root / 'runs' / 'medfed.db'}")
    grid = LocalGrid(make_client_app(cfg), num_nodes=2)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(root / "run"))
    report = json.loads((root / "run" / "cross_site.json").read_text())
    return {"cfg": cfg, "grid": grid, "dir": root / "run", "report": report}


def test_one_row_per_site_with_its_local_test_figures(run: dict[str, Any]) -> None:
    report, cfg = run["report"], run["cfg"]
    assert list(report) == ["checkpoint", "round", "task", "min_count", "sites", "gaps"]
    assert (report["checkpoint"], report["round"], report["task"], report["min_count"]) == (
        "final", 1, "classification", MIN_COUNT)
    assert [s["site"] for s in report["sites"]] == ["site-0", "site-1"]
    final = json.loads((run["dir"] / "summary.json").read_text())
    for k, site in enumerate(report["sites"]):
        assert site["n"] == len(simulated_site_data(cfg, site_index=k, num_sites=2).test)
        assert {"auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "threshold"} <= set(site["metrics"])
        assert site["metrics"]["threshold"] == pytest.approx(final["final_metrics"]["threshold"])  # the global one
    assert final["cross_site"]["sites"] == 2 and final["cross_site"]["file"] == "cross_site.json"
    subgroups = sum(len(s["subgroups"]) for s in report["sites"])
    line = dict(summary_lines(final))["cross-site"]
    assert line.startswith(f"2 site(s), {subgroups} subgroup row(s)") and line.endswith("cross_site.json")


def test_subgroup_rows_and_suppression(run: dict[str, Any]) -> None:
    cfg = run["cfg"]
    suppressed_codes = set()
    for k, site in enumerate(run["report"]["sites"]):
        keys = {g["key"] for g in site["subgroups"]}
        assert "sex" in keys and "age" in keys
        assert all(g["n"] >= MIN_COUNT for g in site["subgroups"])
        test = simulated_site_data(cfg, site_index=k, num_sites=2).test
        counts = Counter(subgroup_code("scanner", m["scanner"]) for m in test.metadata)
        small = {code for code, n in counts.items() if n < MIN_COUNT}
        assert subgroup_code("scanner", RARE) in small  # the rare scanner is really there, below the minimum
        suppressed_codes |= small
        shown = {g["value"] for g in site["subgroups"] if g["key"] == "scanner"}
        assert not shown & small and site["suppressed"] >= len(small)
        for key in keys:  # what the reported groups leave out is 0 or at least the minimum
            left = site["n"] - sum(g["n"] for g in site["subgroups"] if g["key"] == key)
            assert left == 0 or left >= MIN_COUNT
    replies = [m for m in run["grid"].received if m.metadata.group_id == "cross-site"]
    assert len(replies) == 2 and not any(m.has_error() for m in replies)
    for reply in replies:
        inspect_message(reply)  # the egress guard's check passes (it raises otherwise)
        names = list(reply.content.config_records["evaluateres.metrics"])
        assert all(allowed_name(name) for name in names) and any(name.startswith("xsite-sg-") for name in names)
        assert not any(code in name for name in names for code in suppressed_codes)


def test_gaps_pool_the_reported_subgroups(run: dict[str, Any]) -> None:
    report = run["report"]
    gap = next(g for g in report["gaps"] if g["key"] == "sex" and g["metric"] == "accuracy")
    pooled = {}
    for value in ("F", "M"):
        groups = [g for s in report["sites"] for g in s["subgroups"] if (g["key"], g["value"]) == ("sex", value)]
        pooled[value] = sum(g["n"] * g["metrics"]["accuracy"] for g in groups) / sum(g["n"] for g in groups)
    assert gap["gap"] == pytest.approx(max(pooled.values()) - min(pooled.values()))
    assert gap["best"] == pytest.approx(pooled[gap["best_value"]])


def test_the_store_and_the_dashboard_hold_the_same_rows(run: dict[str, Any]) -> None:
    report = run["report"]
    with RunStore(run["cfg"].store_url) as store:
        [listed] = RunReader(store).list_runs()
        assert _same(RunReader(store).cross_site(listed["id"]), report)
        assert any(e["kind"] == "cross-site" for e in RunReader(store).events(listed["id"]))
        with BackgroundServer(create_app(store=store, token=TOKEN)) as server:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
                got = client.get(f"/api/runs/{listed['id']}/cross-site").json()
                assert client.get(f"/api/runs/{listed['id']}/cross-site", params={"checkpoint": "best"}).json() is None
                page = client.get(f"/runs/{listed['id']}").text
    assert _same(got, report)
    assert 'id="cross-site-table"' in page and "Cross-site evaluation" in page


def test_on_demand_evaluation_of_the_checkpoint_gives_the_same_rows(run: dict[str, Any]) -> None:
    path, again = cross_site_of_checkpoint(run["dir"] / "checkpoints" / "final.pt")
    assert path == run["dir"] / "cross_site.json"
    assert _same(again, run["report"])
    best_path, best = cross_site_of_checkpoint(run["dir"] / "checkpoints" / "best.pt")
    assert best_path.name == "cross_site_best.json" and best["checkpoint"] == "best"
    with RunStore(run["cfg"].store_url) as store:
        [listed] = RunReader(store).list_runs()
        assert _same(RunReader(store).cross_site(listed["id"], checkpoint="best"), best)


def test_the_command_prints_the_rows_and_refuses_other_options(run: dict[str, Any]) -> None:
    checkpoint = str(run["dir"] / "checkpoints" / "final.pt")
    result = CliRunner().invoke(app, ["simulate", "--cross-site-only", checkpoint])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "site-0" in output and "site-1" in output and "sex = F" in output and "gap sex" in output
    assert "cross_site.json" in output.replace(" ", "")  # rich may wrap the path
    refused = CliRunner().invoke(app, ["simulate", "--cross-site-only", checkpoint, "--sites", "3"])
    assert refused.exit_code == 2 and "leave out the other options (given: --sites)" in " ".join(refused.output.split())


def test_the_model_card_shows_the_runs_cross_site_rows_subgroups_and_gaps(run: dict[str, Any], tmp_path: Path) -> None:
    """``medfed report`` on this real run: every site's row, every reported subgroup and every gap of
    cross_site.json is in the page; the suppressed rare scanner is not."""
    from html import escape

    from medfed.server.report import write_report

    html = write_report(run["dir"], out=tmp_path / "card.html", calibrate=False).read_text()
    report = run["report"]
    subgroups = html[html.index("Per-subgroup metrics"):]
    for site in report["sites"]:
        assert f"<td>{site['site']}</td>" in html
        for group in site["subgroups"]:
            assert f"<td>{escape(group['value'])}</td>" in subgroups
    assert report["gaps"] and all(f"{gap['gap']:.3f}" in html for gap in report["gaps"])
    assert subgroup_code("scanner", RARE) not in subgroups
