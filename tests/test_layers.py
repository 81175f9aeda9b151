"""The layers of medfed, enforced on the source: every import of every module, read with ``ast``.

* ``medfed.shared`` imports no ``flwr`` and none of ``medfed.client``, ``medfed.server``,
  ``medfed.simulations`` (it is what both sides share: pure PyTorch / MONAI / Opacus);
* ``medfed.client`` (the hospital) and ``medfed.server`` (the coordinator) never import each other;
* nothing imports ``medfed.simulations`` but ``medfed.simulations`` itself and ``medfed/cli.py``
  (the composition root of the ``medfed`` command);
* no module imports the old top-level names (``shared``, ``client``, ...), only ``medfed.*``.

Imports inside functions and under ``if TYPE_CHECKING:`` count, as do relative imports and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. The case table at
the end shows the checker flags each kind of violation and passes the allowed imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("shared", "client", "server", "simulations")
COMPOSITION_ROOT = "medfed.cli"
SOURCE_FOLDERS = (*SUBPACKAGES, "medfed")


def module_of(path: Path) -> tuple[str, bool]:
    """The dotted name a source file imports as (``client/deploy.py``: ``medfed.client.deploy``), and
    whether it is a package's ``__init__``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    if parts[0] != "medfed":
        parts = ["medfed", *parts]
    return ".".join(parts), is_package


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imported_names(source: str, importer: str, *, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``; ``from m import x`` gives ``m`` and ``m.x``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, importer, is_package)
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}" if base else alias.name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "medfed" and parts[1] in SUBPACKAGES else None


def rule_broken(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (``None``: it may)."""
    top = imported.split(".")[0]
    if top in SUBPACKAGES:
        return f"imports the top-level {top!r}: use medfed.{top}"
    own, target = _layer(importer), _layer(imported)
    if own == "shared" and (top == "flwr"):
        return "medfed.shared imports no flwr"
    if own == "shared" and target in ("client", "server", "simulations"):
        return f"medfed.shared imports no medfed.{target}"
    if {own, target} == {"client", "server"}:
        return f"medfed.{own} never imports medfed.{target}"
    if target == "simulations" and own != "simulations" and importer != COMPOSITION_ROOT:
        return f"only medfed.simulations and {COMPOSITION_ROOT} import medfed.simulations"
    return None


def violations(source: str, importer: str, *, is_package: bool = False) -> list[str]:
    """Every broken rule in ``source``, as ``line: imported (why)``."""
    found = []
    for line, name in imported_names(source, importer, is_package=is_package):
        why = rule_broken(importer, name)
        if why:
            found.append(f"{line}: {name} ({why})")
    return found


def source_files() -> list[Path]:
    files: list[Path] = []
    for folder in SOURCE_FOLDERS:
        files.extend(p for p in sorted((ROOT / folder).rglob("*.py")) if "__pycache__" not in p.parts)
    return files


def test_the_layers_hold_in_every_module() -> None:
    files = source_files()
    modules = {module_of(p)[0] for p in files}
    assert {"medfed.shared.config", "medfed.client.deploy", "medfed.server.store.writes",
            "medfed.simulations.bench.quality", "medfed.cli"} <= modules  # the walk saw the tree
    broken = []
    for path in files:
        module, is_package = module_of(path)
        for problem in violations(path.read_text(encoding="utf-8"), module, is_package=is_package):
            broken.append(f"{path.relative_to(ROOT)}:{problem}")
    assert broken == [], "\n".join(broken)


FLAGGED = [
    ("medfed.shared.training", "import flwr", "no flwr"),
    ("medfed.shared.training", "from flwr.common import Scalar", "no flwr"),
    ("medfed.shared.training", "def f():\n    import flwr.server\n", "no flwr"),
    ("medfed.shared.training", "from medfed.server.store import RunStore", "no medfed.server"),
    ("medfed.shared.training", "from medfed.client import site_client", "no medfed.client"),
    ("medfed.shared.training", "from .. import simulations", "no medfed.simulations"),
    ("medfed.shared.training", "import shared.config", "top-level 'shared'"),
    ("medfed.client.deploy", "from medfed.server.signing import verify_app", "never imports medfed.server"),
    ("medfed.client.deploy", "def start():\n    from medfed.server import signing\n", "never imports medfed.server"),
    ("medfed.client.deploy", "from ..server.signing import verify_app", "never imports medfed.server"),
    ("medfed.client.deploy", "from medfed import server", "never imports medfed.server"),
    ("medfed.server.validation", "import medfed.client.site_client as site", "never imports medfed.client"),
    ("medfed.server.validation", "import importlib\nimportlib.import_module('medfed.client.deploy')", "never imports"),
    ("medfed.server.store", "from ...client.site_client import SKIPPED", "never imports medfed.client"),
    ("medfed.server.rounds", "from medfed.simulations.faults import Attack", "import medfed.simulations"),
    ("medfed.client.client_app", "if TYPE_CHECKING:\n    from medfed.simulations.simulate import X\n", "import medfed"),
    ("medfed.server.cli", "__import__('medfed.simulations.bench')", "import medfed.simulations"),
    ("medfed", "from medfed.simulations import cli", "import medfed.simulations"),
]

ALLOWED = [
    ("medfed.simulations.bench.quality", "from medfed.simulations.simulate import run_federated"),
    ("medfed.simulations.bench.quality", "from ..pooled import run_pooled\nfrom medfed.server.strategies import x"),
    ("medfed.cli", "from medfed.simulations.cli import simulate\nfrom medfed.client.cli import site"),
    ("medfed.server.validation", "from medfed.shared.config import RunConfig\nimport flwr"),
    ("medfed.client.deploy", "from medfed.shared.app_signature import verify_app\nfrom flwr.app import Context"),
    ("medfed.shared.training", "import flwrlike\nfrom . import files\nfrom .data import npz"),
    ("medfed.server.store", "from . import migrate"),
]


@pytest.mark.parametrize(("importer", "source", "why"), FLAGGED)
def test_the_checker_flags(importer: str, source: str, why: str) -> None:
    is_package = importer in ("medfed", "medfed.server.store")
    found = violations(source, importer, is_package=is_package)
    assert found and all(why in problem for problem in found), found


@pytest.mark.parametrize(("importer", "source"), ALLOWED)
def test_the_checker_allows(importer: str, source: str) -> None:
    assert violations(source, importer, is_package=importer == "medfed.server.store") == []


def test_relative_imports_resolve_from_the_module_or_its_package() -> None:
    assert _resolve("pooled", 2, "medfed.simulations.bench.quality", False) == "medfed.simulations.pooled"
    assert _resolve("migrate", 1, "medfed.server.store", True) == "medfed.server.store.migrate"
    assert _resolve(None, 1, "medfed.shared.config", False) == "medfed.shared"
    assert module_of(ROOT / "server" / "store" / "__init__.py") == ("medfed.server.store", True)
    assert module_of(ROOT / "medfed" / "cli.py") == ("medfed.cli", False)
