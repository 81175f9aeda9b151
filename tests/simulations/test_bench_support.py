"""bench.support.bench_command: the command a results.json row records carries no machine's own paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.simulations.bench.support import bench_command

CASES = [
    (["--sites", "4"], "python -m m --sites 4"),
    (["--run-dir", "/tmp/x", "--sites", "4"], "python -m m --sites 4"),  # a scratch folder changes no figure
    (["--workdir=/tmp/w", "--repeat", "3"], "python -m m --repeat 3"),
    (["--record", "{repo}/docs/bench/results.json"], "python -m m --record docs/bench/results.json"),
    (["--data-dir", "{shared}/data/medmnist"], "python -m m --data-dir ../shared/data/medmnist"),
    (["--record", "docs/bench/results.json"], "python -m m --record docs/bench/results.json"),
    (["--out", "/elsewhere/x.json"], "python -m m --out /elsewhere/x.json"),  # outside the checkout's folder: kept
]


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_bench_command(argv: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, shared = tmp_path / "repo", tmp_path / "shared"
    repo.mkdir()
    monkeypatch.chdir(repo)
    argv = [a.format(repo=repo, shared=shared) for a in argv]
    assert bench_command("m", argv) == expected
