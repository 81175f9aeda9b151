"""Keep reporting libraries out of a simulated site's process (it starts faster).

Importing any part of MONAI imports all of it: ``monai/__init__.py`` walks every subpackage with
``pkgutil.walk_packages``, which imports each package it walks into (``monai.handlers`` too,
although MONAI's own exclude list names it), and those import their optional dependencies eagerly:
``monai.handlers.mlflow_handler`` imports MLflow, ``monai.utils.jupyter_utils`` imports
``matplotlib.pyplot``. A site training in a simulation uses neither: MLflow tracking and plots
run in the coordinator's process. In each of Flower's Ray workers these two cost about 1.5 s of
CPU out of about 6 s of imports (idle, 5 runs each: ``MEDFED_SIMULATED_SITE=1 /usr/bin/time -f
"%U+%S" python -c "import medfed.client.client_app"`` against the same without the variable), paid
again at every simulation start, for every worker.

:func:`simulated_site_environment` sets :data:`SITE_PROCESS_ENV` while a simulation starts its
Ray workers, which inherit it; ``medfed/__init__.py`` calls :func:`skip_reporting_libraries` first thing in a
process that has it, so MONAI finds these libraries missing (its ``optional_import`` and
``try: import`` treat them as not installed). Anything else that imports them there gets a
``ModuleNotFoundError`` that says why and how to turn this off. The same finder refuses
``scipy.signal`` to the two MONAI modules that import it eagerly and that no site uses
(:data:`SKIPPED_FOR_IMPORTERS`; 0.4-0.5 s of CPU per site, 5 runs each, idle, 2026-12-07), and
only to them. Other processes (the coordinator, ``medfed`` commands, deployed sites) are unchanged.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = [
    "SITE_PROCESS_ENV",
    "SKIPPED_FOR_IMPORTERS",
    "SKIPPED_IN_SITE_PROCESSES",
    "simulated_site_environment",
    "skip_reporting_libraries",
]

SITE_PROCESS_ENV = "MEDFED_SIMULATED_SITE"
"""Set to ``"1"`` in the environment of a simulated site's process (Ray worker)."""

SKIPPED_IN_SITE_PROCESSES: tuple[str, ...] = ("mlflow", "matplotlib")
"""Top-level packages a simulated site's process does not import (with their submodules)."""

SKIPPED_FOR_IMPORTERS: dict[str, tuple[str, ...]] = {
    "scipy.signal": ("monai.data.ultrasound_confidence_map", "monai.transforms.signal.array"),
}
"""Modules a simulated site's process does not import *for these importers only*: MONAI's
ultrasound confidence map (``hilbert``) and its 1D-signal transforms (``iirnotch``) import
``scipy.signal``, with ``scipy.stats``, eagerly; no medfed site uses either. Anything else gets
``scipy.signal`` as usual (Opacus's PRV accountant, which a DP site needs, imports it)."""


class _SkipReportingLibraries(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that refuses :data:`SKIPPED_IN_SITE_PROCESSES`, and
    :data:`SKIPPED_FOR_IMPORTERS` to their importers."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        importer = _importing(SKIPPED_FOR_IMPORTERS.get(fullname, ()))
        if importer is not None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} for {importer} in this simulated site's process: medfed "
                f"keeps it out of MONAI's import there so sites start faster ({importer} is not used by "
                f"medfed's sites). To load it, start the simulation with {SITE_PROCESS_ENV}=0 in the environment.",
                name=fullname,
            )
        if fullname.partition(".")[0] in SKIPPED_IN_SITE_PROCESSES:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} in this simulated site's process: medfed keeps "
                f"{', '.join(SKIPPED_IN_SITE_PROCESSES)} out of it so it starts faster (they serve "
                f"tracking and plots, which run in the coordinator's process). To load them there, "
                f"start the simulation with {SITE_PROCESS_ENV}=0 in the environment.",
                name=fullname,
            )
        return None


def _importing(modules: tuple[str, ...], *, depth: int = 64) -> str | None:
    """The one of ``modules`` whose body is on the call stack (being imported), within ``depth`` frames."""
    if not modules:
        return None
    frame = sys._getframe(1)
    while frame is not None and depth > 0:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") in modules:
            return frame.f_globals["__name__"]
        frame, depth = frame.f_back, depth - 1
    return None


def skip_reporting_libraries() -> bool:
    """Refuse :data:`SKIPPED_IN_SITE_PROCESSES` from now on in this process (idempotent).

    Returns
    -------
    bool
        ``True`` when the finder is installed, ``False`` when one of the libraries was already
        imported (then nothing changes: refusing it later would not save its import).
    """
    if any(isinstance(finder, _SkipReportingLibraries) for finder in sys.meta_path):
        return True
    if any(name in sys.modules for name in SKIPPED_IN_SITE_PROCESSES):
        return False
    sys.meta_path.insert(0, _SkipReportingLibraries())
    return True


@contextmanager
def simulated_site_environment() -> Iterator[None]:
    """Set :data:`SITE_PROCESS_ENV` to ``"1"`` while a simulation starts its sites, then restore it.

    Flower's Ray backend starts Ray inside the run (its own ``runtime_env`` carries only
    ``PYTHONPATH``), and Ray's worker processes inherit this process's environment, so the
    variable reaches the sites and no other process started after the run. This process itself
    already imported medfed, so it is unchanged. A value already set wins:
    ``MEDFED_SIMULATED_SITE=0 medfed simulate ...`` keeps the libraries loadable in the sites.
    """
    before = os.environ.get(SITE_PROCESS_ENV)
    os.environ[SITE_PROCESS_ENV] = before if before is not None else "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SITE_PROCESS_ENV, None)
        else:
            os.environ[SITE_PROCESS_ENV] = before
