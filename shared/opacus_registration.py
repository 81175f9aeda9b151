"""Register :mod:`medfed.shared.opacus_fixes` with Opacus whenever Opacus loads, without loading it.

Importing Opacus costs a simulated site about 1 s of CPU at every start (its ``__init__`` imports
``torch.distributed.tensor`` and ``scipy.stats``; 2 s in ``python -X importtime``, part of it
shared with MONAI), and most processes that build medfed's models never run DP-SGD: a simulated
site without DP, the coordinator, ``medfed`` commands. They used to pay it because
``medfed.shared.models`` imported the fixes module, which needs Opacus, so that any code wrapping
a medfed model in Opacus (medfed's own DP-SGD, or a user's ``GradSampleModule``) gets the fixed
per-sample gradients.

:func:`register_fixes_when_opacus_loads` keeps that guarantee lazily: when Opacus is already
imported it imports the fixes at once; otherwise it puts a one-shot finder on ``sys.meta_path``
that lets Opacus's package load as usual and imports the fixes right after Opacus's
``__init__`` has run, before the statement that imported Opacus continues.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["FIXES_MODULE", "register_fixes_when_opacus_loads"]

FIXES_MODULE = "medfed.shared.opacus_fixes"
"""The module whose import registers medfed's grad samplers with Opacus."""


class _ThenImportFixes(importlib.abc.Loader):
    """Opacus's own loader, followed by an import of :data:`FIXES_MODULE`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        except BaseException:
            sys.meta_path.insert(0, _OpacusFinder())  # Opacus failed to load: register on the next try
            raise
        importlib.import_module(FIXES_MODULE)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _OpacusFinder(importlib.abc.MetaPathFinder):
    """Finds ``opacus`` with the other finders and wraps its loader; removes itself on first use."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "opacus":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec  # not installed: the import fails as it would have
        spec.loader = _ThenImportFixes(spec.loader)
        return spec


def register_fixes_when_opacus_loads() -> None:
    """Import :data:`FIXES_MODULE` now if Opacus is loaded, else as soon as it is (idempotent)."""
    if "opacus" in sys.modules:
        importlib.import_module(FIXES_MODULE)
    elif not any(isinstance(finder, _OpacusFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OpacusFinder())
