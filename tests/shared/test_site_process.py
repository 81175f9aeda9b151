"""A simulated site's process (``MEDFED_SIMULATED_SITE=1``) skips MLflow and matplotlib (MONAI imports them eagerly; sites never use them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.shared.site_process import SITE_PROCESS_ENV, SKIPPED_IN_SITE_PROCESSES, simulated_site_environment

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *, site: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != SITE_PROCESS_ENV}
    if site is not None:
        env[SITE_PROCESS_ENV] = site
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_monai_imports_the_reporting_libraries_eagerly() -> None:
    # Why the skip exists: `import monai` alone loads them. Fails when MONAI stops doing so, i.e. when
    # medfed.shared.site_process is no longer needed.
    names = sorted(SKIPPED_IN_SITE_PROCESSES)
    out = _python(f"import sys, monai; print([n for n in {names!r} if n in sys.modules])", site=None)
    assert out.returncode == 0, out.stderr
    expected = [n for n in names if _installed(n)]
    assert json.loads(out.stdout.strip().replace("'", '"')) == expected


def _installed(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


def test_a_site_process_trains_without_them_and_says_why_when_asked() -> None:
    code = (
        "import sys\n"
        "import medfed.client.client_app, monai.networks.nets, monai.transforms\n"
        "print([n for n in ('mlflow', 'matplotlib', 'matplotlib.pyplot') if n in sys.modules])\n"
        "try:\n    import matplotlib.pyplot\nexcept ModuleNotFoundError as err:\n    print(err)\n"
        "import opacus.accountants.prv  # a DP site loads Opacus on first use: nothing it needs is refused\n"
    )
    out = _python(code, site="1")
    assert out.returncode == 0, out.stderr
    loaded, message = out.stdout.strip().splitlines()
    assert loaded == "[]"
    assert "'matplotlib'" in message and f"{SITE_PROCESS_ENV}=0" in message  # the parent package is refused first


@pytest.mark.parametrize("preset", [None, "0", "1"])
def test_the_variable_is_set_only_while_the_sites_start_and_a_preset_wins(monkeypatch, preset: str | None) -> None:
    if preset is None:
        monkeypatch.delenv(SITE_PROCESS_ENV, raising=False)
    else:
        monkeypatch.setenv(SITE_PROCESS_ENV, preset)
    with simulated_site_environment():
        assert os.environ[SITE_PROCESS_ENV] == (preset or "1")
    assert os.environ.get(SITE_PROCESS_ENV) == preset
    with pytest.raises(RuntimeError), simulated_site_environment():
        raise RuntimeError("a failed run restores it too")
    assert os.environ.get(SITE_PROCESS_ENV) == preset
