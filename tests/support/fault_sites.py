"""Test-only fault injection: medfed's ClientApp with one site that crashes (importable by Ray workers).

Faults are injected only here, by building a different ClientApp in a test: no run-config key or
environment variable of medfed can make a real site fail on purpose.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.compat.common import recorddict_compat as compat

from medfed.client.client_app import privacy_mods, site_client_fn
from medfed.client.egress import egress_guard
from medfed.shared.config import RunConfig

__all__ = ["crashing_client_app", "crash_mod", "fit_round"]


def fit_round(msg: Message) -> int:
    """The ``server-round`` of a training message's fit config (what the site trains as)."""
    return int(compat.recorddict_to_fitins(msg.content, keep_input=True).config["server-round"])


def crash_mod(*, site: int, server_round: int) -> Mod:
    """A mod that makes partition ``site`` raise while training in round ``server_round`` only."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            msg.metadata.message_type == MessageType.TRAIN
            and int(context.node_config["partition-id"]) == site
            and fit_round(msg) == server_round
        ):
            raise RuntimeError(f"test: site {site} crashes while training in round {server_round}")
        return call_next(msg, context)

    return mod


def crashing_client_app(cfg: RunConfig, *, site: int, server_round: int) -> ClientApp:
    """medfed's ClientApp (egress guard, privacy mods, SiteClient) with :func:`crash_mod` inside the guard."""
    return ClientApp(
        client_fn=site_client_fn(cfg),
        mods=[egress_guard, crash_mod(site=site, server_round=server_round), *privacy_mods(cfg)],
    )
