"""``medfed dashboard``: the token-bearing URL goes only to a terminal, and a missing store is refused
unless ``--create-store`` asks for one."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.server.dashboard_cli import access_lines, open_store
from medfed.server.store import RunStore, StoreError
from tests.support.dashboard_support import ROOT, free_port

TOKEN = "t" * 43


@pytest.mark.parametrize("terminal", [True, False])
def test_only_a_terminal_is_shown_the_token(terminal: bool, tmp_path: Path) -> None:
    lines = access_lines(base_url="http://127.0.0.1:8765", token=TOKEN, token_path=tmp_path / "dashboard.token",
                         terminal=terminal)
    text = "\n".join(lines)
    if terminal:
        assert lines == [f"open: http://127.0.0.1:8765/?token={TOKEN}"]
    else:
        assert lines[0] == "open: http://127.0.0.1:8765/"
        assert TOKEN not in text and str(tmp_path / "dashboard.token") in text and "mode 0600" in text


def test_a_missing_store_is_refused_naming_the_path_and_the_flag(tmp_path: Path) -> None:
    runs = tmp_path / "no-such-runs"
    result = CliRunner().invoke(app, ["dashboard", "--run-dir", str(runs), "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    output = "".join(result.output.split())  # rich wraps long lines anywhere
    assert f"norunstoreat{runs / 'medfed.db'}" in output and "--create-store" in output
    assert not runs.exists()  # neither the folder nor an empty database was made
    with pytest.raises(StoreError, match="--create-store"):
        open_store(f"sqlite:///{runs / 'medfed.db'}", create=False)
    assert not runs.exists()


def test_open_store_creates_one_when_asked(tmp_path: Path) -> None:
    db = tmp_path / "new" / "medfed.db"
    with open_store(f"sqlite:///{db}", create=True) as store:
        assert db.is_file() and store.schema_revision is not None


def _serve(args: list[str], *, read: Callable[[], str], proc: subprocess.Popen, pattern: str) -> str:
    """Wait until the dashboard's output matches ``pattern`` (90 s at most); return the output."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        out = read()
        if re.search(pattern, out):
            return out
        assert proc.poll() is None, out
        time.sleep(0.2)
    raise AssertionError(f"medfed dashboard {' '.join(args)} printed no {pattern!r}: {read()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_piped_output_gets_a_tokenless_url_and_create_store_makes_the_store(tmp_path: Path) -> None:
    """As under a service manager or `> dashboard.log`: stdout is a file, not a terminal."""
    runs, port = tmp_path / "runs", free_port()
    args = ["dashboard", "--run-dir", str(runs), "--port", str(port), "--create-store"]
    log = tmp_path / "dashboard.log"
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "medfed.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env)
    try:
        out = _serve(args, read=log.read_text, proc=proc, pattern=r"Ctrl\+C stops it")
        token_file = runs / "dashboard.token"
        token = token_file.read_text().strip()
        assert (runs / "medfed.db").is_file() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert f"open: http://127.0.0.1:{port}/\n" in out
        assert token not in out and f"it is in {token_file}" in " ".join(out.split())
    finally:
        _stop(proc)
    assert token not in log.read_text()


def test_a_terminal_gets_the_url_with_the_token(tmp_path: Path) -> None:
    runs, port = tmp_path / "runs", free_port()
    RunStore(f"sqlite:///{runs / 'medfed.db'}").close()  # an existing (empty) store
    args = ["dashboard", "--run-dir", str(runs), "--port", str(port)]
    main, side = pty.openpty()
    env = {**os.environ, "COLUMNS": "400", "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "medfed.cli", *args], stdout=side, stderr=side, cwd=ROOT, env=env)
    os.close(side)
    seen: list[str] = []

    def read() -> str:
        while select.select([main], [], [], 0)[0]:
            try:
                seen.append(os.read(main, 65536).decode(errors="replace"))
            except OSError:
                break
        return "".join(seen)

    try:
        out = _serve(args, read=read, proc=proc, pattern=r"Ctrl\+C stops it")
        token = (runs / "dashboard.token").read_text().strip()
        assert f"open: http://127.0.0.1:{port}/?token={token}" in re.sub(r"\x1b\[[0-9;]*m", "", out)
    finally:
        _stop(proc)
        os.close(main)
