"""One import namespace: everything installs and imports as ``medfed.*``, nothing else at the top level."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("shared", "client", "server", "simulations")


def _declared() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return list(setuptools["packages"]), dict(setuptools["package-dir"])


def test_every_package_folder_is_declared_under_medfed() -> None:
    packages, package_dir = _declared()
    found = []
    for top, folder in package_dir.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            found.append(".".join([top, *rel.parts]) if rel.parts else top)
    assert sorted(set(found)) == sorted(packages), "pyproject.toml [tool.setuptools] packages must list every package"
    assert all(name == "medfed" or name.startswith("medfed.") for name in packages)


@pytest.mark.parametrize("layout", ["empty", "own-generic-folders"])
def test_only_medfed_is_importable_at_the_top_level(tmp_path: Path, layout: str) -> None:
    if layout == "own-generic-folders":
        for name in GENERIC:  # a user's project with folders of these names must not shadow or be shadowed
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
            (tmp_path / name / "data").mkdir()
    code = (
        "import importlib.util, medfed.shared, medfed.client, medfed.server, medfed.simulations\n"
        "import medfed.shared.data.base, medfed.client.client_app, medfed.server.server_app\n"
        f"print([importlib.util.find_spec(n) is None for n in {GENERIC!r}] if {layout == 'empty'!r} else 'ok')\n"
    )
    # Without PYTHONPATH: Flower's Ray backend exports the driver's sys.path (here pytest's, with the
    # repository root) as PYTHONPATH once a simulation ran in this process; a user's shell has none.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = "[True, True, True, True]" if layout == "empty" else "ok"
    assert proc.stdout.strip().splitlines()[-1] == expected


def test_medfed_subpackages_are_the_repository_folders() -> None:
    import medfed

    for name in medfed.SUBPACKAGES:
        spec = importlib.util.find_spec(f"medfed.{name}")
        assert spec is not None and Path(spec.origin).resolve() == ROOT / name / "__init__.py"


def test_version_flag_prints_the_installed_version() -> None:
    from typer.testing import CliRunner

    import medfed
    from medfed.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"medfed {medfed.__version__} (flwr 1.42.0")
