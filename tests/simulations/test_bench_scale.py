"""The load benchmark's memory sampling and table (the 64-site run itself is a benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from medfed.shared.config import sites_per_round
from medfed.simulations.bench.scale import ScaleResult, markdown_table, measure_scale, scale_config, tree_memory


def test_tree_memory_counts_descendants() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(80 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
         "print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        alone = tree_memory(child.pid)
        with_parent = tree_memory(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert alone.processes == 1 and alone.rss == alone.root_rss >= 80 * 2**20
    assert 0 < alone.pss <= alone.rss
    assert with_parent.processes >= 2 and with_parent.rss >= alone.rss + with_parent.root_rss
    time.sleep(0.1)
    assert tree_memory(child.pid).processes == 0  # gone: nothing counted


def test_markdown_table_has_one_row_per_size() -> None:
    row = ScaleResult(
        sites=64, rounds=3, samples_per_site=10, sites_per_round=64, wall_s=32.0, startup_s=11.8, round_s=[14.9, 3.0, 2.3],
        mean_round_s=6.73, later_round_mean_s=2.64, peak_rss_mib=2294.5, peak_pss_mib=1746.2,
        peak_driver_rss_mib=604.0, peak_processes=12, fit_results_last_round=64, final_accuracy=0.5,
    )  # fmt: skip
    lines = markdown_table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2].startswith("| 64 | 64 | 3 | 32.0 | 11.8 | 6.73 | 2.64 | 14.9, 3.0, 2.3 | 2294 | 1746 | 604 | 12 | 64 |")


@pytest.mark.slow
def test_a_small_scale_run_reports_every_site_and_its_memory(tmp_path) -> None:
    result = measure_scale(sites=4, rounds=2, samples_per_site=10, run_dir=str(tmp_path))
    assert result.fit_results_last_round == 4 and len(result.round_s) == 2
    assert result.peak_pss_mib > 100 and result.peak_processes >= 4  # driver, GCS, raylet, workers


@pytest.mark.parametrize(("sites", "fraction", "expected"), [(1000, 0.1, 100), (4, 1.0, 4), (10, 0.1, 2), (1, 0.5, 1)])
def test_scale_runs_sample_a_fraction_of_the_sites_per_round(sites: int, fraction: float, expected: int) -> None:
    cfg = scale_config(sites=sites, rounds=3, samples_per_site=10, run_dir="runs", fraction=fraction)
    assert sites_per_round(cfg) == expected
    assert cfg.fraction_evaluate == fraction and cfg.synthetic_samples == 10 * sites
