"""A simulated site's process (``MEDFED_SIMULATED_SITE=1``) skips MLflow and matplotlib (MONAI imports them eagerly; sites never use them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.shared.site_process import (
    SITE_PROCESS_ENV,
    SKIPPED_FOR_IMPORTERS,
    SKIPPED_IN_SITE_PROCESSES,
    simulated_site_environment,
)

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


def test_monai_imports_scipy_signal_through_the_skipped_importers_only() -> None:
    # Why SKIPPED_FOR_IMPORTERS exists: `import monai` loads scipy.signal (and scipy.stats) through
    # exactly these modules. Fails when MONAI stops doing so, or imports it from somewhere else too.
    # The watch refuses every attempt, as a site process does, so each importer's attempt is seen.
    code = (
        "import sys\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'scipy.signal':\n"
        "            f = sys._getframe(1)\n"
        "            while f is not None:\n"
        "                n = f.f_globals.get('__name__', '')\n"
        "                if f.f_code.co_name == '<module>' and n.startswith('monai.') and n != 'monai.utils.module':\n"
        "                    seen.append(n); break\n"
        "                f = f.f_back\n"
        "            raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import monai\n"
        "print(sorted(set(seen)))\n"
    )
    out = _python(code, site=None)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == sorted(SKIPPED_FOR_IMPORTERS["scipy.signal"])


def test_a_site_process_leaves_scipy_signal_out_of_monai_but_gives_it_to_anyone_else() -> None:
    code = (
        "import sys\n"
        "import medfed.client.client_app, monai.transforms, monai.data\n"
        "print(['scipy.signal' in sys.modules, 'scipy.stats' in sys.modules])\n"
        "from monai.data import ultrasound_confidence_map as ucm\n"
        "try:\n    ucm.hilbert([1.0, 2.0])\nexcept Exception as err:\n    print(type(err).__name__, '|', str(err).splitlines()[0])\n"
        "import scipy.signal  # anyone else gets it (Opacus's PRV accountant of a DP site does)\n"
        "print(callable(scipy.signal.hilbert))\n"
    )
    out = _python(code, site="1")
    assert out.returncode == 0, out.stderr
    loaded, error, later = out.stdout.strip().splitlines()
    assert loaded == "[False, False]"
    kind, message = error.split(" | ")
    assert kind == "OptionalImportError"
    assert "monai.data.ultrasound_confidence_map" in message and f"{SITE_PROCESS_ENV}=0" in message
    assert later == "True"
    # The same code outside a site process: MONAI has the real function.
    out = _python(code, site=None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[0] == "[True, True]"


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
