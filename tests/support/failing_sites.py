"""Test-only ClientApps in which every site fails (importable by the Ray workers that run the sites).

As in ``tests/support/fault_sites.py``, faults are injected only by building a different ClientApp
in a test: nothing in medfed's configuration can make a real site fail on purpose.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import Client, ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from medfed.client.client_app import privacy_mods, site_client_fn
from medfed.client.egress import egress_guard
from medfed.shared.config import RunConfig
from tests.support.fault_sites import fit_round

__all__ = ["import_error_client_app", "all_sites_crash_client_app", "MISSING_MODULE"]

MISSING_MODULE = "medfed_missing_module"
"""The module every site of :func:`import_error_client_app` fails to import."""


def _import_fails(context: Context) -> Client:
    """A site whose code cannot be imported (as with a missing or shadowed module)."""
    raise ImportError(f"No module named {MISSING_MODULE!r} (test: every site fails to start)")


def import_error_client_app(cfg: RunConfig) -> ClientApp:
    """medfed's ClientApp mods around a ``client_fn`` that raises :class:`ImportError` at every site."""
    return ClientApp(client_fn=_import_fails, mods=[egress_guard, *privacy_mods(cfg)])


def _crash_in(server_round: int) -> Mod:
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and fit_round(msg) == server_round:
            raise RuntimeError(f"test: every site crashes while training in round {server_round}")
        return call_next(msg, context)

    return mod


def all_sites_crash_client_app(cfg: RunConfig, *, server_round: int) -> ClientApp:
    """medfed's ClientApp in which every site raises while training in ``server_round`` only."""
    return ClientApp(
        client_fn=site_client_fn(cfg),
        mods=[egress_guard, _crash_in(server_round), *privacy_mods(cfg)],
    )
