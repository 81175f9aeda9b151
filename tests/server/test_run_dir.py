"""Run-directory naming: runs started in the same second never share a folder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medfed.server.run_dir import new_run_path


def test_runs_started_together_get_their_own_folders(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(lambda _: new_run_path(tmp_path / "runs", name="fedavg-s0"), range(16)))
    assert len(set(paths)) == 16
    assert all(p.is_dir() and not any(p.iterdir()) for p in paths)  # created, empty, claimed
    assert {p.name.split("-fedavg-s0")[1] for p in paths} >= {""}  # the first one has no suffix
