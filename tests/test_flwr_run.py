"""``flwr run .`` from a clean checkout, as the README says (issue 13, acceptance 5).

The slow test copies the working tree (tracked and untracked-but-not-ignored files) into a fresh
git repository, runs the README's command there with ``FLWR_HOME`` in a temporary folder and
Flower's managed local SuperLink on free loopback ports, follows the run to its end, and checks:
the run completed, ``git status`` is clean, no package was installed (``pip freeze`` and no
Flower runtime environment), and after the README's stop step no process it started is left.
Whatever happens, every process that carries the test's ``FLWR_HOME`` is killed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.simulations.interrupt import command_line, is_alive

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLWR = str(BIN / "flwr")

NO_UV_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
"""What the README exports so the local SuperLink Flower starts runs the app in this environment."""
RUN_COMMAND = "flwr run . --stream"
STOP_COMMAND = 'kill $(pgrep -f "flower-superlink.*--port 39091")'
"""The README's stop step for Flower's managed local SuperLink (39091: Flower's default port)."""


def test_readme_gives_the_commands_this_test_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    for text in (f"export {NO_UV_ENV}", RUN_COMMAND, STOP_COMMAND, "flwr ls", "flwr log <run-id> --stream",
                 "flwr stop <run-id>"):
        assert text in readme, f"README.md no longer says `{text}`"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "[tool.flwr.federations" not in pyproject, (
        "flwr 1.42 migrates [tool.flwr.federations] into $FLWR_HOME/config.toml and comments the table "
        "out, rewriting the tracked pyproject.toml on `flwr run .`"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _copy_checkout(dest: Path) -> None:
    """The working tree as a clean clone would have it, committed in a fresh repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=medfed-test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], cwd=dest, check=True)


def _pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _started_by_test(before: set[int], marker: bytes) -> list[int]:
    return [pid for pid in sorted(_pids() - before) if is_alive(pid) and _environ_has(pid, marker)]


@pytest.mark.slow
def test_flwr_run_from_a_clean_checkout(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of medfed")
    checkout = tmp_path / "medfed"
    checkout.mkdir()
    _copy_checkout(checkout)
    flwr_home = tmp_path / "flwr-home"
    http_port, control_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    key, value = NO_UV_ENV.split("=")
    env[key] = value
    marker = f"FLWR_HOME={flwr_home}".encode()
    freeze = [sys.executable, "-m", "pip", "freeze", "--all"]
    packages_before = subprocess.run(freeze, capture_output=True, text=True, check=True).stdout
    before = _pids()
    try:
        start = time.perf_counter()
        proc = subprocess.run([*RUN_COMMAND.split(), "--run-config", "num-server-rounds=1"], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=1200)
        seconds = time.perf_counter() - start
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        print(f"\n`{RUN_COMMAND}` (1 round, submit to end of log): {seconds:.0f} s")
        (run_id,) = re.findall(r"Successfully started run (\d+)", output)
        assert "Run finished 1 round(s)" in output, output[-6000:]

        # The run as Flower recorded it, through the README's `flwr ls`.
        listed = subprocess.run([FLWR, "ls", "--run-id", run_id, "--format", "json"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        (run,) = json.loads(listed.stdout[listed.stdout.find("{"):])["runs"]
        assert run["status"] == "finished:completed", run
        (run_dir,) = [p for p in (checkout / "runs").iterdir() if p.is_dir()]
        (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[1:]]
        assert record["round"] == 1 and record["fit_results"] == 2 and record["fit_failures"] == 0, record

        # Nothing tracked changed, nothing untracked appeared (runs/ is ignored).
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout,
                                capture_output=True, text=True, check=True).stdout
        assert status == "", status
        # No second set of dependencies: no uv runtime environment, the same installed packages.
        assert not (flwr_home / "runtime-envs").exists()
        superlink_log = (flwr_home / "local-superlink" / "superlink.log").read_text()
        assert "uv sync" not in output + superlink_log
        assert subprocess.run(freeze, capture_output=True, text=True, check=True).stdout == packages_before

        # The README's stop step, with this test's port: the SuperLink takes its SuperExec along.
        superlinks = [pid for pid in _started_by_test(before, marker)
                      if re.search(rf"flower-superlink.*--port {http_port}\b", command_line(pid))]
        assert len(superlinks) == 1, [command_line(p) for p in _started_by_test(before, marker)]
        os.kill(superlinks[0], signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _started_by_test(before, marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: command_line(pid) for pid in _started_by_test(before, marker)}
        assert left == {}, f"processes left after stopping the local SuperLink: {left}"
    finally:
        for pid in _started_by_test(before, marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
