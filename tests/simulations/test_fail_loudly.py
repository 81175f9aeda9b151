"""``medfed simulate`` runs that cannot work fail loudly: refused before Ray starts (naming the
flag and a fix), or, when every site fails, one error, one traceback and a non-zero exit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from tests.shared.test_preflight import tiny_npz

REPO = Path(__file__).resolve().parents[2]
FAST = ["--model", "simplecnn", "--image-size", "16", "--batch-size", "16", "--local-epochs", "1"]


def _medfed(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """``python -m medfed.cli simulate ARGS`` in ``tmp_path`` (its Ray temp folder there too):
    the result, its wall seconds and its CPU seconds (user + system)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(tmp_path / "ray"), "COLUMNS": "200"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "simulate", *args, "--run-dir", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize(("args", "expected"), [
    (["--dataset", "tiny.npz", "--sites", "12"],
     ["num-sites (--sites) = 12 is more sites than tiny.npz can fill", "7 training (after 1 kept for the sites'", "Fix: --sites 3"]),
    (["--set", "dp=true", "--set", "norm=batch"],
     ['norm = "batch"', "dp = true", "Fix: --norm group (or --set norm=group"]),
], ids=["sites-12-on-7-training-images", "dp-with-batchnorm"])
def test_impossible_runs_are_refused_before_ray_starts(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    tiny_npz(tmp_path / "tiny.npz")
    done, wall, cpu = _medfed(tmp_path, *args)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    for text in expected:
        assert text in " ".join(out.split()), (text, out)
    # Under 30 s: measured in CPU time, which other jobs on a shared machine do not stretch
    # (about 8 s here, most of it importing torch and MONAI); the wall time is printed.
    assert cpu < 30, f"used {cpu:.1f} s of CPU ({wall:.1f} s wall)"
    print(f"{' '.join(args)}: exit {done.returncode} after {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert "Traceback" not in out
    assert not (tmp_path / "ray").exists(), "Ray was started"
    assert not (tmp_path / "runs").exists(), "a run directory was created"


def test_a_pooled_run_that_raises_exits_non_zero_with_one_message(tmp_path: Path, monkeypatch) -> None:
    import medfed.simulations.pooled as pooled

    def broken(*args, **kwargs):
        raise RuntimeError("test: out of memory in the pooled baseline")

    monkeypatch.setattr(pooled, "train_epochs", broken)
    result = CliRunner().invoke(app, ["simulate", "--centralized", *FAST, "--rounds", "2", "--set", "synthetic-samples=96",
                                      "--run-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "error: the pooled run failed in round 1: RuntimeError: test: out of memory in the pooled baseline" in text
    assert "Traceback" not in result.output and "summary" not in result.output


@pytest.mark.slow
def test_every_site_failing_on_ray_exits_1_with_one_traceback_and_one_error(tmp_path: Path, monkeypatch) -> None:
    """Flower's simulation engine (Ray) with a ClientApp that raises ImportError at every site."""
    import medfed.simulations.simulate as simulate
    from tests.support.failing_sites import MISSING_MODULE, import_error_client_app

    monkeypatch.setattr(simulate, "make_client_app", import_error_client_app)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["simulate", *FAST, "--sites", "3", "--rounds", "3", "--set", "synthetic-samples=96",
                                      "--run-dir", str(tmp_path / "runs")])
    seconds = time.monotonic() - start
    out = result.output
    assert result.exit_code == 1, out
    assert out.count("Traceback") == 1, out  # Flower logs 2 per failure: 3 sites x 3 rounds x 2 = 18 before
    assert out.count("a site failed: ImportError") == 1
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    text = " ".join(out.split())
    assert "error: round 1: every site failed to train (3 of 3" in text
    assert f"The sites raised ImportError: No module named '{MISSING_MODULE}'" in text and "(3 times" in text
    assert "medfed simulate --resume" in text
    assert "summary" not in out and "final auc" not in out
    assert len(out.splitlines()) < 60, out
    print(f"every site failed: exit {result.exit_code} after {seconds:.1f} s, {len(out.splitlines())} lines")
