"""Test-only faulty and malicious sites: simulation clients whose updates are broken on purpose.

Nothing in a deployment reaches this module: no run-config key, command-line option or node
config selects an attack, and :func:`attack_client_fn` refuses to build a site that has a
deployment node config (a ``datalist``) or runs a ``dataset = "deployment"`` config. Tests and
``python -m medfed.simulations.bench.robust`` pass it explicitly::

    app = make_client_app(cfg, client_fn=attack_client_fn(cfg, {1: Attack("nan")}))

An attacking site trains honestly (the real :class:`~medfed.client.site_client.SiteClient`) and then
changes the weights it returns, so every mod of the ClientApp (the egress guard, SecAgg+ and
medfed's update mod) still runs on them, as it would for a broken or hostile site's model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.common import NDArrays, Scalar

from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.round_config import server_round_of

__all__ = ["ATTACKS", "Attack", "AttackingClient", "attack_client_fn"]

logger = logging.getLogger(__name__)

ATTACKS: tuple[str, ...] = ("nan", "inf", "shape", "count", "dtype", "scale", "sign-flip")
"""What an attacking site does to its trained weights ``local`` (``global`` = the weights it got):

``nan`` / ``inf``: one entry of every floating-point array becomes NaN / +Inf;
``shape``: the first floating-point array gets one extra slice along its first axis;
``count``: the last array is left out;
``dtype``: floating-point arrays are sent as float16;
``scale``: ``global + factor * (local - global)`` (e.g. ``factor = 1e6``);
``sign-flip``: ``global - factor * (local - global)`` (model poisoning, e.g. ``factor = 10``).
Integer entries (step counters) are left as trained, except by ``count``.
"""


@dataclass(frozen=True)
class Attack:
    """One site's misbehaviour.

    Parameters
    ----------
    kind
        One of :data:`ATTACKS`.
    factor
        Scale of ``scale`` and ``sign-flip``.
    rounds
        Rounds in which the site misbehaves; empty: every round.
    """

    kind: str
    factor: float = 10.0
    rounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            valid = ", ".join(repr(a) for a in ATTACKS)
            raise ValueError(f"attack kind {self.kind!r} is unknown. Valid kinds: {valid}.")

    def active(self, server_round: int) -> bool:
        """Whether the site misbehaves in ``server_round``."""
        return not self.rounds or server_round in self.rounds

    def apply(self, local: NDArrays, *, global_weights: NDArrays) -> NDArrays:
        """The weights the attacking site sends instead of ``local``.

        Parameters
        ----------
        local
            The honestly trained state entries (the model's shapes and dtypes).
        global_weights
            The global model the site received this round (same shapes).
        """
        out = [np.array(a, copy=True) for a in local]
        floats = [i for i, a in enumerate(out) if a.dtype.kind == "f"]
        if self.kind in ("nan", "inf"):
            for i in floats:
                out[i].reshape(-1)[0] = np.nan if self.kind == "nan" else np.inf
        elif self.kind == "shape":
            first = out[floats[0]]
            out[floats[0]] = np.concatenate([first, first[:1]], axis=0) if first.ndim else np.stack([first, first])
        elif self.kind == "count":
            out = out[:-1]
        elif self.kind == "dtype":
            for i in floats:
                out[i] = out[i].astype(np.float16)
        else:
            sign = 1.0 if self.kind == "scale" else -1.0
            for i in floats:
                g = np.asarray(global_weights[i], np.float64)
                moved = g + sign * self.factor * (np.asarray(local[i], np.float64) - g)
                out[i] = moved.astype(local[i].dtype)
        return out


class AttackingClient(NumPyClient):
    """A site that trains like ``client`` and then sends :meth:`Attack.apply` of its weights.

    Parameters
    ----------
    client
        The honest site.
    attack
        What it does to its weights, and in which rounds.
    """

    def __init__(self, client: NumPyClient, *, attack: Attack) -> None:
        self.client = client
        self.attack = attack

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """Delegate."""
        return self.client.get_parameters(config)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train honestly, then misbehave in the attack's rounds."""
        received = [np.array(p, copy=True) for p in parameters]
        local, num_examples, metrics = self.client.fit(parameters, config)
        server_round = server_round_of(config)
        if self.attack.active(server_round):
            logger.info("test attack %r in round %d", self.attack.kind, server_round)
            local = self.attack.apply(local, global_weights=received)
        return local, num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Delegate."""
        return self.client.evaluate(parameters, config)


def attack_client_fn(cfg: RunConfig, attacks: Mapping[int, Attack]) -> Callable[[Context], Client]:
    """A simulation ``client_fn`` whose sites ``attacks`` (by ``partition-id``) misbehave.

    The other sites are medfed's honest :class:`SiteClient`, built as ``medfed simulate`` does.

    Parameters
    ----------
    cfg
        The run configuration (simulation only).
    attacks
        ``partition-id -> Attack``.

    Raises
    ------
    ValueError
        When ``cfg`` is a deployment config, or (at a site) the node config is a deployment
        site's: attacks exist for simulations only.
    """
    if cfg.is_deployment:
        raise ValueError('test attacks run in simulation only, not with dataset = "deployment".')
    plan: dict[int, Attack] = dict(attacks)

    def client_fn(context: Context) -> Client:
        node_config: Mapping[str, Any] = context.node_config
        if "datalist" in node_config or "partition-id" not in node_config:
            raise ValueError("test attacks run in simulation only; this node has a deployment node config.")
        site_index = int(node_config["partition-id"])
        num_sites = int(node_config["num-partitions"])
        data = simulated_site_data(cfg, site_index=site_index, num_sites=num_sites)
        site = SiteClient(cfg=cfg, data=data, site_index=site_index)
        attack = plan.get(site_index)
        return (AttackingClient(site, attack=attack) if attack is not None else site).to_client()

    return client_fn
