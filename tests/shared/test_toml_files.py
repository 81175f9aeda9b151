"""``read_toml``: parsed tables, or the caller's error naming the file and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.shared.toml_files import read_toml


class KitError(RuntimeError):
    pass


def test_a_valid_file_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "kit.toml"
    path.write_text('site-name = "site-1"\n[superlink]\naddress = "coord:9092"\n')
    assert read_toml(path, error=KitError, missing="x") == {"site-name": "site-1", "superlink": {"address": "coord:9092"}}


def test_missing_and_malformed_files_raise_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(KitError, match=r"^no kit here: ask the coordinator$"):
        read_toml(tmp_path / "kit.toml", error=KitError, missing="no kit here: ask the coordinator")
    bad = tmp_path / "site.toml"
    bad.write_text("site-name = \n")
    with pytest.raises(KitError, match=r"^site config .*site\.toml is not valid TOML \(.*\); fix it\.$"):
        read_toml(bad, error=KitError, missing="x", label=f"site config {bad}", fix="; fix it")
    with pytest.raises(KitError, match=r"^/.*site\.toml is not valid TOML \(.*\)\.$"):
        read_toml(bad, error=KitError, missing="x")
