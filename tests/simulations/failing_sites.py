"""Test-only ClientApps whose every site fails (importable by the Ray workers that run the sites)."""

from __future__ import annotations

from flwr.app import Context
from flwr.client import Client, ClientApp

from medfed.client.client_app import privacy_mods
from medfed.client.egress import egress_guard
from medfed.shared.config import RunConfig

__all__ = ["import_error_client_app"]


def _import_fails(context: Context) -> Client:
    """A site whose code cannot be imported (as with a missing or shadowed module)."""
    raise ImportError("No module named 'medfed_missing_module' (test: every site fails to start)")


def import_error_client_app(cfg: RunConfig) -> ClientApp:
    """medfed's ClientApp mods around a ``client_fn`` that raises :class:`ImportError` at every site."""
    return ClientApp(client_fn=_import_fails, mods=[egress_guard, *privacy_mods(cfg)])
