"""Helpers shared by the dashboard tests: a small DP simulation, free ports, the Chromium check."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from medfed.shared.config import RunConfig

TOKEN = "test-token-" + "0123456789abcdef" * 2

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"

# A real federation, as small as it gets: 2 hospitals, sample-level DP so each reports epsilon.
SMALL = {
    "dataset": "synthetic", "synthetic_samples": 96, "model": "simplecnn", "norm": "group", "num_sites": 2,
    "local_epochs": 1, "batch_size": 16, "image_size": 16, "augment": False,
    "dp": True, "dp_noise_multiplier": 1.3, "dp_budget_epsilon": 20.0, "dp_secure_noise": False,
}


def small_config(run_dir: Path, *, rounds: int) -> RunConfig:
    """The small DP federation writing under ``run_dir`` (its store: ``run_dir/medfed.db``)."""
    return RunConfig(run_dir=str(run_dir), num_server_rounds=rounds, **SMALL)  # type: ignore[arg-type]


def simulate_command(run_dir: Path, *, rounds: int) -> list[str]:
    """``medfed simulate`` for :func:`small_config`, as a subprocess command line."""
    cfg = small_config(run_dir, rounds=rounds).to_run_config()
    sets = [f"--set={key.replace('_', '-')}={cfg[key.replace('_', '-')]}" for key in SMALL if key != "dataset"]
    return [sys.executable, "-m", "medfed.cli", "simulate", "--dataset", "synthetic",
            "--rounds", str(rounds), "--run-dir", str(run_dir), *sets]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chromium_missing() -> str | None:
    """Why the browser test cannot run, or ``None`` when it can."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        reason = os.environ.get("MEDFED_CHROMIUM_SKIP_REASON") or (
            "apt-get install chromium (as root) provides it; .ci/run does so"
        )
        return f"Chromium not installed at {CHROMIUM}: {reason}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        return f"the playwright package is missing ({err}): pip install -e '.[test]'"
    return None


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (Linux ``/proc/net/tcp``)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    raw = bytes.fromhex(address)
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found
