"""``python -m medfed.simulations.bench.augment_speed`` on synthetic sets: rows, section, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medfed.simulations.bench import augment_speed


def _recorded(path: Path) -> str:
    """How a recorded command names ``path`` (``bench.support.bench_command``): relative to the
    repository when it lies at or below the repository's parent (a checkout in /tmp, as in a fresh
    clone there, has pytest's tmp_path beside it), else as given."""
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().parent) else str(path)


def test_synthetic_run_writes_one_row_per_set_and_keeps_other_rows(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({augment_speed.SECTION: [{"dataset": "kept"}], "other": {"x": 1}}))
    assert augment_speed.main(["--synthetic", "24", "--repeats", "1", "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    rows = data[augment_speed.SECTION]
    assert data["other"] == {"x": 1} and rows[0] == {"dataset": "kept"}
    assert [r["dataset"] for r in rows[1:]] == ["synthetic-2d", "synthetic-3d"]
    for row in rows[1:]:
        assert row["images"] > 0 and row["per_image_s"] > 0 and row["batched_s"] > 0
        assert abs(row["speedup"] - row["per_image_s"] / row["batched_s"]) < 0.02 * row["speedup"] + 0.01
        assert row["command"].endswith("--synthetic 24 --repeats 1 --results " + _recorded(results))
    assert "synthetic-3d" in capsys.readouterr().out


def test_a_missing_data_file_is_named_with_the_fix(tmp_path: Path, capsys) -> None:
    code = augment_speed.main(["--data-dir", str(tmp_path), "--datasets", "breastmnist",
                               "--results", str(tmp_path / "r.json")])
    assert code == 2
    out = capsys.readouterr().out
    assert "breastmnist.npz not found" in out and "--data-dir" in out and "--synthetic" in out
    assert not (tmp_path / "r.json").exists()
