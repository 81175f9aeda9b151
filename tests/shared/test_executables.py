"""``installed_executable``: the program beside the interpreter first, then ``PATH``, else the caller's error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medfed.shared.executables import installed_executable


def _program(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_program_beside_the_interpreter_wins_over_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = _program(tmp_path / "venv" / "bin", "flwr")
    on_path = _program(tmp_path / "elsewhere", "flwr")
    monkeypatch.setattr(sys, "executable", str(venv.parent / "python"))
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert installed_executable("flwr") == str(venv)
    venv.unlink()
    assert installed_executable("flwr") == str(on_path)


class KitError(RuntimeError):
    pass


def test_a_missing_program_raises_the_callers_error_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="flower-supernode is not installed: install medfed with its pinned"):
        installed_executable("flower-supernode")
    with pytest.raises(KitError, match=r"^medfed-clientapp is not installed: reinstall medfed\.$"):
        installed_executable("medfed-clientapp", error=KitError, fix="reinstall medfed")
