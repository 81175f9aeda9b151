"""medfed: federated learning for medical imaging (Flower + MONAI + Opacus).

One import namespace for the whole platform:

* :mod:`medfed.shared`: models, transforms, data loading, training, evaluation, privacy
  accounting and the run configuration (pure PyTorch / MONAI / Opacus, never ``flwr``);
* :mod:`medfed.client`: the hospital side (ClientApp, site data, site policy, site commands);
* :mod:`medfed.server`: the coordinator side (ServerApp, strategies, run store, dashboard,
  provisioning);
* :mod:`medfed.simulations`: multi-site simulation, partitioning and benchmarks.

In the repository (and in an app bundle built from it) these four folders sit beside this one,
at the top level; an installed wheel has them inside ``medfed/`` (``package-dir`` in
``pyproject.toml``). In the source layout this package's ``__path__`` also names the folder
above it, so ``medfed.shared`` is the ``shared/`` folder there: the code a ``flwr run .`` bundle
carries is the code that runs. Nothing but ``medfed`` is importable at the top level.
"""

from __future__ import annotations

import os as _os
from importlib import metadata as _metadata
from pathlib import Path as _Path

# Idle OpenMP threads sleep instead of spinning (a value already set wins). Read once, when torch
# loads its OpenMP runtime, so it is set here, before any medfed module imports torch: with
# another process on the cores, torch's spinning threads made two-thread training about 4x slower
# than one thread (BENCHMARKS.md, "Performance close to the limit").
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# No network at run time: Flower's telemetry posts an event to telemetry.flower.ai when a simulation
# or server starts (an HTTPS connection from a hospital's or researcher's machine; 0.1 s of a
# simulation's start). Flower reads the variable when it is first imported, so it is set here; a
# value already set wins (FLWR_TELEMETRY_ENABLED=1 turns it back on).
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

SUBPACKAGES: tuple[str, ...] = ("shared", "client", "server", "simulations")
"""medfed's subpackages, in layer order (each may import only those before it; ``simulations``
is imported by none)."""


def _source_root() -> _Path | None:
    """The folder holding the subpackages beside this one (a checkout or app bundle), else ``None``."""
    here = _Path(__file__).resolve().parent
    if all((here / name).is_dir() for name in SUBPACKAGES):
        return None  # installed wheel: the subpackages are inside this folder
    root = here.parent
    if all((root / name / "__init__.py").is_file() for name in SUBPACKAGES):
        return root
    return None


_root = _source_root()
if _root is not None:
    __path__.append(str(_root))  # noqa: F821 - the package's own __path__

# A simulated site's process (a Ray worker of `medfed simulate`) skips MLflow and matplotlib, which
# MONAI imports eagerly and sites never use: about 1.5 s of CPU less at every worker start.
if _os.environ.get("MEDFED_SIMULATED_SITE") == "1":
    from medfed.shared.site_process import skip_reporting_libraries as _skip_reporting_libraries

    _skip_reporting_libraries()


def _version() -> str:
    try:
        return _metadata.version("medfed")
    except _metadata.PackageNotFoundError:  # an app bundle run without the package installed
        return "0+unknown"


__version__: str = _version()

__all__ = ["SUBPACKAGES", "__version__"]
