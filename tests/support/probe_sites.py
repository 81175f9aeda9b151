"""Test-only probe: medfed's ClientApp with a mod that records facts about the site's process.

Importable by Ray workers (a test module's closures are not always).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.client import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from medfed.client.client_app import privacy_mods, site_client_fn
from medfed.client.egress import egress_guard
from medfed.shared.config import RunConfig

__all__ = ["process_probe_mod", "probed_client_app"]


def process_probe_mod(*, out: Path, modules: tuple[str, ...], env: tuple[str, ...]) -> Mod:
    """A mod writing ``out/<pid>.json``: which of ``modules`` are imported, and the ``env`` values."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        facts = {
            "modules": {name: name in sys.modules for name in modules},
            "env": {name: os.environ.get(name) for name in env},
        }
        (out / f"{os.getpid()}.json").write_text(json.dumps(facts))
        return call_next(msg, context)

    return mod


def probed_client_app(cfg: RunConfig, *, out: Path, modules: tuple[str, ...], env: tuple[str, ...]) -> ClientApp:
    """medfed's ClientApp (egress guard, privacy mods, SiteClient) with :func:`process_probe_mod` first."""
    return ClientApp(
        client_fn=site_client_fn(cfg),
        mods=[process_probe_mod(out=out, modules=modules, env=env), egress_guard, *privacy_mods(cfg)],
    )
