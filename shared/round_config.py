"""What the server sends the sites with each round, and how a site reads it: one definition.

The per-round fit config carries only what changes from round to round and what a site cannot
know on its own: the round number (``server-round``). Every training hyperparameter (learning
rate and its cosine schedule, local epochs, batch size, optimizer, ``proximal-mu``) comes from
the validated run config, which the server and every site hold identically (simulation: the
same :class:`~medfed.shared.config.RunConfig`; ``flwr run``: the same run config, signed with the app
in deployment). So a site never trains with a hyperparameter a round message changed, and
nothing is sent that a site does not read. The evaluate step sends nothing: a site's
validation does not depend on the round.

Flower's own protocol keys (client-level DP's clipping norm, SecAgg+'s stages) are read by
Flower's client mods, not by medfed's site; they are not listed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medfed.shared.cross_site import CROSS_SITE

__all__ = [
    "SERVER_ROUND", "FIT_CONFIG_KEYS", "EVALUATE_CONFIG_KEYS", "EVALUATE_REQUEST_FLAGS", "fit_config",
    "evaluate_config", "server_round_of",
]

SERVER_ROUND = "server-round"
"""The round number (1-based; a resumed run continues the count). Sets the site's seed and its
point on the learning-rate schedule."""

FIT_CONFIG_KEYS: tuple[str, ...] = (SERVER_ROUND,)
"""Keys of the per-round fit config (sent by the server, each read by the site)."""

EVALUATE_CONFIG_KEYS: tuple[str, ...] = ()
"""Keys of the per-round evaluate config: none."""

EVALUATE_REQUEST_FLAGS: tuple[str, ...] = (CROSS_SITE,)
"""Keys a site looks for in every evaluate config to tell another request from a round's
evaluation; a round's config never holds them. ``cross-site``: the evaluation of the final model
on each site's local test split after the last round (:mod:`medfed.shared.cross_site`)."""


def fit_config(server_round: int) -> dict[str, int]:
    """The fit config of round ``server_round`` (the strategies' ``on_fit_config_fn``)."""
    return {SERVER_ROUND: int(server_round)}


def evaluate_config(server_round: int) -> dict[str, int]:
    """The evaluate config of round ``server_round``: empty (see the module docstring)."""
    return {}


def server_round_of(config: Mapping[str, Any]) -> int:
    """The round number a site reads from its fit config (``1`` when absent: a direct call).

    Raises
    ------
    ValueError
        The value is not a positive integer.
    """
    value = config.get(SERVER_ROUND, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fit config {SERVER_ROUND} = {value!r} is invalid: the server sends the round number (>= 1).")
    return value
