"""Crash-safe writes: the old file survives a failed write; no temporary file is left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from medfed.shared.files import write_atomically


def test_a_write_replaces_the_file_and_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "ledger.json"
    assert write_atomically(target, lambda fh: fh.write(b"new")) == target
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["ledger.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "resume.pt"
    target.write_bytes(b"old")

    def half_then_crash(fh) -> None:  # noqa: ANN001
        fh.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["resume.pt"]


def test_the_mode_is_set_as_given_and_defaults_to_owner_only(tmp_path: Path) -> None:
    shared = write_atomically(tmp_path / "kit" / "ca.crt", lambda fh: fh.write(b"cert"), mode=0o644)
    private = write_atomically(tmp_path / "kit" / "site.key", lambda fh: fh.write(b"key"))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    write_atomically(shared, lambda fh: fh.write(b"again"), mode=0o600)  # replacing changes the mode too
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600 and shared.read_bytes() == b"again"
