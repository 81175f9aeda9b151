"""``medfed bench``: the quick profile end to end (CI smoke), and the orchestrator's checks.

The quick profile trains on tiny slices of the MedMNIST files (``$MEDFED_DATA_DIR``, else
``../shared/data/medmnist``; a section whose file is missing says so in its cells, which counts as a
reason; the checks of real figures are marked ``data`` and skip, saying why, without the files) and starts Flower's
simulation engine a few times: about 2-3 minutes on 2 idle cores, one run shared by the tests
of this module.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from medfed.simulations.bench import suite as bench
from medfed.simulations.bench.figures import SCHEMAS, check_rows
from medfed.simulations.bench.suite import (
    PROFILES,
    SECTIONS,
    BenchContext,
    SectionResult,
    SectionSpec,
    Table,
    Target,
    incomplete_cells,
    register_section,
    run_bench,
    run_section,
    write_regions,
)
from tests.support.medmnist import medmnist_dir

DATA_DIR = medmnist_dir()
PREAMBLE = "# medfed benchmarks\n\nHand-written notes that the generator must keep.\n"
TRAILER = "\n## Notes after the generated part\n\nAlso kept.\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, SectionResult]]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "BENCHMARKS.md"
    out.write_text(PREAMBLE + "\n<!-- bench:quality -->\nstale figures\n<!-- /bench -->\n" + TRAILER)
    plots = tmp / "docs" / "bench"
    results = run_bench(profile=PROFILES["quick"], out=out, plots_dir=plots, data_dir=DATA_DIR, workdir=tmp / "work")
    return out, plots, results


def test_quick_profile_fills_every_cell_or_says_why(quick_run) -> None:
    _, _, results = quick_run
    assert list(results) == list(SECTIONS)
    assert incomplete_cells(results) == []
    for name, result in results.items():
        assert result.tables, name
        assert all(table.rows for table in result.tables), name


@pytest.mark.data("breastmnist.npz", "adrenalmnist3d.npz")
def test_quick_profile_reports_every_ratio_of_the_issue(quick_run) -> None:
    out, _, results = quick_run
    text = out.read_text()
    columns = {c for r in results.values() for t in r.tables for c in t.columns}
    for ratio_column in (
        "FedAvg / pooled",  # federated vs pooled AUC
        "AUC / no-DP AUC",  # accuracy cost of DP
        "DP time ratio",  # DP-SGD epoch time
        "SecAgg+ / plain time",
        "upload per site, SecAgg+ / fp32 model",
        "overhead ratio (wall)",
        "round time / medfed's",  # medfed vs plain Flower (and NVFlare)
    ):
        assert ratio_column in columns, ratio_column
        assert ratio_column in text
    peers = results["peers"].tables[0]
    names = [row[0] for row in peers.rows]
    assert any("quickstart" in n for n in names) and any("NVIDIA FLARE" in n for n in names)
    flare = next(row for row in peers.rows if "NVIDIA FLARE" in row[0])
    assert flare[1].startswith(("not run:", "not available:", "failed:")) or float(flare[1]) > 0
    quality = results["quality"].tables[0]  # real figures, not reasons: the data is there
    assert {row[0] for row in quality.rows} >= {"breastmnist"}
    assert 0.0 <= float(quality.rows[0][3].split()[0]) <= 1.0  # pooled AUC
    assert float(peers.rows[0][4]) > 0.0  # medfed's final AUC


def test_quick_profile_keeps_hand_written_text_and_writes_regions(quick_run) -> None:
    out, _, results = quick_run
    text = out.read_text()
    assert text.startswith(PREAMBLE)
    assert TRAILER.strip() in text
    assert "stale figures" not in text
    for name in ["conditions", "targets", *results]:
        assert text.count(f"<!-- bench:{name} -->") == 1, name
    assert text.count("<!-- /bench -->") == len(results) + 2
    assert "flwr 1.42.0" in text and "medfed bench --profile quick" in text
    assert "### Targets from the other issues" in text


def test_quick_profile_plots_exist_small_and_are_linked(quick_run) -> None:
    out, plots, results = quick_run
    text = out.read_text()
    written = [p for r in results.values() for p in r.plots]
    if DATA_DIR.joinpath("breastmnist.npz").exists():
        names = {p.name for p in written}
        assert {"dp-epsilon.png", "medfed-rounds.png", "quality-breastmnist.png"} <= names
        assert any(n.startswith("secagg-sites-") for n in names)  # round time vs number of sites
    for plot in written:
        assert plot.parent == plots and plot.exists()
        data = plot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000, plot.name
        assert f"(docs/bench/{plot.name})" in text  # linked relative to the output file


# --------------------------------------------------------------------------- orchestrator (no training)
def test_quick_profile_writes_every_figure_to_results_json_in_its_schema(quick_run) -> None:
    """Issue 19: results.json beside the plots holds the secagg, overhead, scale and throughput rows."""
    _, plots, results = quick_run
    data = json.loads((plots / "results.json").read_text())
    for section, schema in SCHEMAS.items():
        rows = data[section]
        assert rows and check_rows(section, rows) == rows, section
        assert rows == results[section].figures[section], section
        assert all(set(schema) <= set(row) for row in rows)
    secagg = data["secagg"][0]
    assert secagg["training"] is False and secagg["upload_ratio"] <= 1.1  # 32-bit masked vectors
    assert {row["dtype"] for row in data["throughput"]} == {"fp32", "bf16"}


@pytest.mark.parametrize(
    ("section", "row", "fragment"),
    [
        ("secagg", {"sites": 8, "params": 10, "time_ratio": 2.0, "upload_ratio": 1.0}, "'training' is missing"),
        ("secagg", {"sites": 8, "params": 10, "time_ratio": 2.0, "upload_ratio": 1.0, "training": 1}, "'training' = 1"),
        ("scale", {"sites": True, "sites_per_round": 1, "seconds_per_round": 1.0, "peak_mib": 2.0}, "'sites' = True"),
        ("overhead", {"model": "m", "sites": 2, "ratio_wall": float("nan"), "ratio_later_rounds": 1}, "'ratio_wall'"),
        ("speed", {}, "known sections: secagg, overhead, scale, throughput"),
    ],
)
def test_results_schema_names_the_bad_field(section: str, row: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        check_rows(section, [row])
    assert fragment in str(err.value)


def test_results_schema_accepts_extra_fields_and_ints_for_floats() -> None:
    row = {"model": "resnet18", "images_per_s": 12, "dtype": "fp32", "threads": 2, "load": 0.5}
    assert check_rows("throughput", [row]) == [row]


def test_incomplete_cells_accepts_values_and_reasons_only() -> None:
    table = Table(title="t", columns=["a", "b"])
    table.add("0.91", "not available: module x is missing")
    table.add("", "nan")
    table.add("n/a:", "0.5 ± nan (n=3)")
    table.add_unavailable("failed: ValueError: boom", "row")
    problems = incomplete_cells({"s": SectionResult(tables=[table])})
    assert problems == ["s/t/row 1/a: ''", "s/t/row 1/b: 'nan'", "s/t/row 2/a: 'n/a:'", "s/t/row 2/b: '0.5 ± nan (n=3)'"]
    assert incomplete_cells({"s": SectionResult()}) == ["s: no table"]
    with pytest.raises(ValueError, match="3 cells but there are 2 columns"):
        table.add(1, 2, 3)


def test_write_regions_replaces_inside_markers_and_appends_new_ones(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    out.write_text("intro\n<!-- bench:a -->\nold a\n<!-- /bench -->\nmiddle\n<!-- bench:z -->\nkeep z\n<!-- /bench -->\n")
    write_regions(out, {"a": "new a\n", "b": "new b"})
    assert out.read_text() == (
        "intro\n<!-- bench:a -->\nnew a\n<!-- /bench -->\nmiddle\n<!-- bench:z -->\nkeep z\n<!-- /bench -->\n\n"
        "<!-- bench:b -->\nnew b\n<!-- /bench -->\n"
    )
    write_regions(out, {"b": "newer b"})  # idempotent layout: replaced in place, nothing appended
    assert out.read_text().count("<!-- bench:b -->") == 1 and "newer b" in out.read_text()


def _ctx(tmp_path: Path) -> BenchContext:
    return BenchContext(profile=PROFILES["quick"], workdir=tmp_path, plots_dir=tmp_path / "plots",
                        data_dir=tmp_path, command="test")


def test_missing_section_module_and_failing_section_report_a_reason(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "SECTIONS", dict(SECTIONS))
    register_section("absent", SectionSpec(title="Absent", module="medfed.simulations.bench.does_not_exist",
                                           columns=("x", "y"), owner="branch elsewhere"))
    result = run_section("absent", _ctx(tmp_path))
    assert result.tables[0].rows == [
        ["not available: module medfed.simulations.bench.does_not_exist is not in this tree (branch elsewhere)", "n/a: see left"]
    ]

    module = types.ModuleType("medfed.simulations.bench.fake_for_test")

    def broken(ctx: BenchContext) -> SectionResult:
        raise ValueError("no data here")

    module.bench_section = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, module.__name__, module)
    register_section("broken", SectionSpec(title="Broken", module=module.__name__))
    failed = run_section("broken", _ctx(tmp_path))
    assert failed.tables[0].rows[0][0] == "failed: ValueError: no data here"
    assert incomplete_cells({"absent": result, "broken": failed}) == []

    with pytest.raises(ValueError, match="already registered"):
        register_section("broken", SectionSpec(title="Again", module=module.__name__))
    with pytest.raises(ValueError, match="invalid"):
        register_section("Bad Name", SectionSpec(title="x", module="m"))
    with pytest.raises(ValueError, match="unknown section 'nope'. Valid sections:"):
        run_section("nope", _ctx(tmp_path))


def test_target_check_says_met_not_met_or_not_measured() -> None:
    assert Target.check("r", "issue 2", value=1.2, at_most=1.3).met is True
    missed = Target.check("r", "issue 2", value=1.7, at_most=1.3, limits="Ray start-up")
    assert (missed.met, missed.measured, missed.limits) == (False, "1.70", "Ray start-up")
    assert Target.check("auc", "issue 2", value=0.9, at_least=0.88, limits="x").limits == ""
    assert Target.check("auc", "issue 2", value=float("nan"), at_least=0.88).met is None


def test_a_run_of_some_sections_keeps_the_complete_runs_conditions_and_targets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "SECTIONS", dict(SECTIONS))
    module = types.ModuleType("medfed.simulations.bench.tiny_for_test")

    def tiny(ctx: BenchContext) -> SectionResult:
        table = Table(title="Tiny", columns=["a"])
        table.add("1")
        return SectionResult(tables=[table], targets=[Target.check("tiny figure", "issue 2", value=9.0, at_most=1.0)])

    module.bench_section = tiny  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, module.__name__, module)
    register_section("tiny", SectionSpec(title="Tiny section", module=module.__name__))
    out = tmp_path / "BENCHMARKS.md"
    complete = "<!-- bench:conditions -->\nFULL RUN\n<!-- /bench -->\n<!-- bench:targets -->\nALL TARGETS\n<!-- /bench -->\n"
    out.write_text(PREAMBLE + complete)
    run_bench(profile=PROFILES["quick"], out=out, plots_dir=tmp_path / "plots", data_dir=tmp_path,
              sections=["tiny"], workdir=tmp_path / "work")
    text = out.read_text()
    assert "FULL RUN" in text and "ALL TARGETS" in text and "tiny figure" not in text
    assert "### Tiny section" in text and "Re-run alone" in text and "`--section tiny`" in text
