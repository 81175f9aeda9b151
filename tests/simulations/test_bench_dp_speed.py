"""``python -m medfed.simulations.bench.trainable_speed --dp-speed``: rows and the results section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfed.simulations.bench.trainable_speed import DP_SECTION, main


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_speed_writes_one_row_per_mode_and_keeps_other_rows(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results.json"
    other = {"model": "resnet18", "spatial_dims": 3, "image_size": 16, "batch": 64, "physical_batch": 16,
             "mode": "hooks", "dp_time_ratio": 9.9}
    results.write_text(json.dumps({"quality": {"kept": True}, DP_SECTION: [other]}))
    args = ["--dp-speed", "--models", "simplecnn", "--image-size", "12", "--batch-size", "4", "--steps", "1",
            "--repeats", "1", "--results", str(results)]
    main([*args, "--spatial-dims", "3", "--physical-batch", "2"])
    main(args)
    main(args)  # the same configuration again replaces its rows
    data = json.loads(results.read_text())
    assert data["quality"] == {"kept": True}
    rows = data[DP_SECTION]
    assert rows[0] == other
    mine = [(r["spatial_dims"], r["physical_batch"], r["mode"]) for r in rows[1:]]
    assert sorted(mine) == [(2, 4, "bookkeeping"), (2, 4, "hooks"), (3, 2, "bookkeeping"), (3, 2, "hooks")]
    for row in rows[1:]:
        assert row["dp_s_per_step"] > 0 and row["nondp_s_per_step"] > 0
        # times are rounded to 0.1 ms: the ratio of the rounded times agrees to a few percent here
        assert row["dp_time_ratio"] == pytest.approx(row["dp_s_per_step"] / row["nondp_s_per_step"], rel=0.1)
        assert row["secure_noise"] is True and "--dp-speed" in row["command"]
    assert "bookkeeping" in capsys.readouterr().out
