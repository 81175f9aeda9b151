"""Ctrl-C of a real ``medfed simulate`` (Flower's simulation engine, its sites on Ray or in the
coordinator's process): the run stops within seconds with one line and exit status 130, every
process it started ends, and the run directory is marked interrupted and resumable; ``--resume``
then completes it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medfed.server.run_dir import read_metrics
from medfed.simulations.interrupt import descendants, is_alive

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the run's processes through /proc")

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 4
OPTIONS = ["--sites", "2", "--model", "simplecnn", "--rounds", str(ROUNDS), "--local-epochs", "1",
           "--batch-size", "16", "--image-size", "16", "--set", "synthetic-samples=96"]


def _medfed(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # Ray's own temp folder: its socket paths must stay short
    return subprocess.Popen(  # stdout is a pipe, as with nohup or `> run.log`
        [sys.executable, "-m", "medfed.cli", "simulate", *args], cwd=tmp_path, env=env,
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )



def _ray_processes_of(pid: int) -> list[int]:
    """Live processes of the Ray cluster that process ``pid`` started (their command line names
    its session folder, ``session_<time>_<pid>``), wherever they were reparented to."""
    session = re.compile(rf"session_[0-9_-]+_{pid}(\b|/)")
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session.search(text) and is_alive(int(cmdline.parent.name)):
            found.append(int(cmdline.parent.name))
    return found


def _read_until(proc: subprocess.Popen[bytes], pattern: str, *, timeout: float) -> str:
    """Read the process's output until a line matches ``pattern`` (while it runs: lines come as they happen)."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            pytest.fail(f"the run ended (exit {proc.wait()}) before {pattern!r}:\n{''.join(seen)[-3000:]}")
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    pytest.fail(f"no {pattern!r} within {timeout} s:\n{''.join(seen)[-3000:]}")


@pytest.fixture(scope="module", params=["ray", "in-process", "processes"])
def interrupted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("interrupt")
    proc = _medfed(tmp, *OPTIONS, "--set", f"sim-backend={request.param}", "--run-dir", str(tmp / "runs"))
    try:
        before = _read_until(proc, rf"^round 1/{ROUNDS}  ", timeout=600)
        family = descendants(proc.pid)  # Ray's head processes and the sites' workers
        ray_started = _ray_processes_of(proc.pid)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        after, _ = proc.communicate(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    return {"backend": request.param, "tmp": tmp, "proc": proc, "before": before, "after": after.decode(errors="replace"),
            "seconds": seconds, "family": family, "ray_started": ray_started,
            "left": sorted({p for p in family if is_alive(p)} | set(_ray_processes_of(proc.pid)))}


def test_ctrl_c_stops_the_run_within_seconds_with_one_line_and_status_130(interrupted: dict) -> None:
    if interrupted["backend"] == "ray":
        assert interrupted["family"], "the run had started no processes: was it running on Ray?"
        assert interrupted["ray_started"], "no process of the run's Ray session was found while it ran"
    elif interrupted["backend"] == "processes":  # forked site processes, no Ray
        assert interrupted["family"], "the run had started no site processes"
        assert not interrupted["ray_started"], "a run with forked site processes started Ray"
    else:  # the sites ran in the coordinator's process: nothing was started
        assert not interrupted["ray_started"], "an in-process run started Ray"
    assert interrupted["proc"].returncode == 130, interrupted["after"]
    assert interrupted["seconds"] < 15, f"took {interrupted['seconds']:.1f} s to exit"
    [run_dir] = [p for p in (interrupted["tmp"] / "runs").iterdir() if p.is_dir()]
    assert interrupted["after"].splitlines() == [
        f"interrupted (SIGINT) after round 1 of {ROUNDS}: run directory {run_dir} is resumable with "
        f"medfed simulate --resume {run_dir}"
    ], interrupted["after"]
    assert interrupted["left"] == [], "processes of the interrupted run are still alive"
    # The rounds before the signal were written as they happened, one plain line each.
    assert re.search(rf"^round 0/{ROUNDS}  auc .*\(initial model\)$", interrupted["before"], re.M)
    print(f"Ctrl-C: exit 130 after {interrupted['seconds']:.1f} s, {len(interrupted['family'])} processes ended")


def test_the_interrupted_run_directory_is_marked_and_resumable(interrupted: dict) -> None:
    [run_dir] = [p for p in (interrupted["tmp"] / "runs").iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["last_completed_round"] == 1
    assert summary["resumable"] is True and summary["num_server_rounds"] == ROUNDS
    assert torch.load(run_dir / "checkpoints" / "resume.pt", weights_only=True)["round"] == 1
    assert [r["round"] for r in read_metrics(run_dir)][:2] == [0, 1]


@pytest.mark.slow
def test_resume_completes_the_interrupted_run(interrupted: dict) -> None:
    [run_dir] = [p for p in (interrupted["tmp"] / "runs").iterdir() if p.is_dir()]
    proc = _medfed(interrupted["tmp"], "--resume", str(run_dir))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    assert [r["round"] for r in read_metrics(run_dir)] == list(range(ROUNDS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds"] == ROUNDS
    assert [r["after_round"] for r in summary["resumed"]] == [1]
