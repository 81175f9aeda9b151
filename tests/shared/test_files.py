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


class _MyError(ValueError):
    pass


def test_read_toml_is_the_one_reader_with_errors_naming_the_file(tmp_path: Path) -> None:
    from medfed.shared.files import read_toml

    good = tmp_path / "a.toml"
    good.write_text('x = 1\n[t]\ny = "z"\n')
    assert read_toml(good, error=_MyError, what="Config file") == {"x": 1, "t": {"y": "z"}}
    with pytest.raises(_MyError, match=r"^Config file .*missing\.toml does not exist\.$"):
        read_toml(tmp_path / "missing.toml", error=_MyError, what="Config file")
    with pytest.raises(_MyError, match=r"^copy the kit$"):
        read_toml(tmp_path / "missing.toml", error=_MyError, what="kit", if_missing="copy the kit")
    broken = tmp_path / "b.toml"
    broken.write_text("x = = 1")
    with pytest.raises(_MyError, match=r"site config .*b\.toml is not valid TOML: .*Ask for a fresh one\.$"):
        read_toml(broken, error=_MyError, what="site config", if_invalid="Ask for a fresh one.")
    with pytest.raises(_MyError, match=r"Config file .* cannot be read \(IsADirectoryError"):
        read_toml(tmp_path, error=_MyError, what="Config file")


def test_the_mode_is_set_as_given_and_defaults_to_owner_only(tmp_path: Path) -> None:
    shared = write_atomically(tmp_path / "kit" / "ca.crt", lambda fh: fh.write(b"cert"), mode=0o644)
    private = write_atomically(tmp_path / "kit" / "site.key", lambda fh: fh.write(b"key"))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    write_atomically(shared, lambda fh: fh.write(b"again"), mode=0o600)  # replacing changes the mode too
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600 and shared.read_bytes() == b"again"
