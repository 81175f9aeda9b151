"""``python -m medfed.simulations.bench.throughput --record``: rows in section ``throughput``, others kept."""

from __future__ import annotations

import json
from pathlib import Path

from medfed.simulations.bench import throughput


def test_record_appends_one_checked_row_per_configuration(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"throughput": [{"model": "kept"}], "other": {"x": 1}}))
    throughput.main(["--models", "simplecnn:2:16", "--threads", "1", "--dtypes", "fp32", "--batch", "2",
                     "--steps", "1", "--record", str(results)])
    data = json.loads(results.read_text())
    assert data["other"] == {"x": 1} and data["throughput"][0] == {"model": "kept"}
    (row,) = data["throughput"][1:]
    assert (row["model"], row["dtype"], row["threads"], row["image_size"]) == ("simplecnn", "fp32", 1, 16)
    assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0 and row["measured_at"]
    assert row["command"].startswith("python -m medfed.simulations.bench.throughput --models simplecnn:2:16")
