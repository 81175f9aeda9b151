"""Which site a result comes from: the node's authenticated identity, never what it reports.

A ClientApp reports ``site-index`` in its metrics, but that is the site's word. The server
keys its records by identities it can check itself (:class:`SiteIdentities`):

``enrolled`` (deployment)
    The SuperLink authenticates every SuperNode by its registered public key, and the
    ServerApp's Grid lists each node's public key (``Grid.get_nodes()``, Flower's
    ``NodeInfo.public_key``). The coordinator's enrolment (``federation.toml``, written by
    ``medfed provision``: each site's name, index and public key) is handed to the ServerApp
    through :data:`ENROLMENT_ENV`, which ``medfed server start`` sets for the SuperLink and
    so for the ServerApp processes it launches. A node is the site whose enrolled key it
    authenticated with; its records are keyed by that site's name.
``registered`` (deployment without the enrolment file)
    The name the coordinator registered the node's key under (``NodeInfo.name``); no index
    check is possible.
``simulation``
    No authentication: the nodes' registration order at the (in-process) SuperLink is their
    partition order, so the ``K``-th registered node is ``site-K``. Where the Grid does not
    tell registration times apart, the first node to claim an index owns it for the run.

A node whose reported ``site-index`` disagrees with its identity, or (simulation) claims an
index another node owns, or (deployment) authenticated with a key no enrolled site has, is
refused: :meth:`SiteIdentities.identify` returns a refusal, the result is left out of the
round and recorded as a rejection with reason ``"identity"`` (the run store's
``identity-refused`` event). A result without a node (in-process unit tests) keeps the
reported index, as before.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.common import Scalar
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

__all__ = [
    "ENROLMENT_ENV",
    "IDENTITY_REASON",
    "EnrolledSite",
    "Identity",
    "SiteIdentities",
    "enrolled_sites",
    "enrolment_from_env",
    "flower_public_key",
]

logger = logging.getLogger(__name__)

ENROLMENT_ENV = "MEDFED_FEDERATION"
"""Environment variable naming the federation folder whose ``federation.toml`` is the enrolment."""

IDENTITY_REASON = "identity"
"""The ``reason`` of a rejection for a node that claimed another identity."""


@dataclass(frozen=True)
class EnrolledSite:
    """A site of the enrolment: name, index, and public key in Flower's form (PEM SPKI bytes)."""

    name: str
    index: int
    public_key: bytes


@dataclass(frozen=True)
class Identity:
    """Who sent a result: the record ``key`` and, if refused, why."""

    key: str
    index: int | None
    node: int | None
    refused: str | None = None
    """Why the result is refused (``None``: accepted); no data values."""


def flower_public_key(openssh: str) -> bytes:
    """An OpenSSH public key line in the form Flower stores it (``NodeInfo.public_key``)."""
    key = serialization.load_ssh_public_key(" ".join(openssh.split()[:2]).encode())
    return public_key_to_bytes(key)  # type: ignore[arg-type]


def enrolled_sites(sites: Iterable[Any]) -> list[EnrolledSite]:
    """:class:`EnrolledSite` of each provisioned :class:`medfed.server.provision.SiteEntry` with a key."""
    out = []
    for site in sites:
        if not site.key:
            continue
        try:
            out.append(EnrolledSite(site.name, int(site.index), flower_public_key(site.key)))
        except (ValueError, UnsupportedAlgorithm):
            logger.error("site %s: its enrolled public key cannot be read; re-run `medfed provision`", site.name)
    return out


def enrolment_from_env(environ: Mapping[str, str] | None = None) -> list[EnrolledSite] | None:
    """The enrolment of the federation named by :data:`ENROLMENT_ENV` (``None``: not set).

    Raises
    ------
    medfed.server.provision.ProvisionError
        The variable names a folder without a readable ``federation.toml``.
    """
    from medfed.server.provision import load_federation

    folder = (environ if environ is not None else os.environ).get(ENROLMENT_ENV, "")
    if not folder:
        return None
    return enrolled_sites(load_federation(Path(folder)).sites)


def _reported_index(metrics: Mapping[str, Scalar]) -> int | None:
    value = metrics.get("site-index")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if float(value) == int(value) else None


def _registered_at(info: Any) -> dt.datetime | None:
    text = str(getattr(info, "registered_at", "") or "")
    try:
        return dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


class SiteIdentities:
    """Map nodes to sites from what the server knows, and refuse nodes that claim another site.

    Parameters
    ----------
    nodes
        Returns the run's nodes (Flower ``NodeInfo``: ``node_id``, ``public_key``, ``name``,
        ``registered_at``), e.g. ``grid.get_nodes``; asked again whenever an unknown node
        answers. ``None``: no node information (every node is then identified by its first claim).
    enrolled
        The enrolment (deployment); ``None`` or empty: none.
    """

    def __init__(
        self,
        *,
        nodes: Callable[[], Iterable[Any]] | None = None,
        enrolled: Sequence[EnrolledSite] | None = None,
    ) -> None:
        self._nodes = nodes
        self._by_key = {site.public_key: site for site in enrolled or ()}
        self._known: dict[int, tuple[str, int | None]] = {}
        """node id -> (record key, expected index or None) from the Grid."""
        self._unenrolled: set[int] = set()
        self._claims: dict[int, int] = {}
        """First-claim mode: index -> node id that claimed it first."""
        self._grid_error = ""
        self.mode = "enrolled" if self._by_key else "unknown"

    def _refresh(self) -> None:
        if self._nodes is None or self.mode in ("first-claim", "simulation"):
            return
        try:
            infos = list(self._nodes())
        except Exception as err:  # noqa: BLE001 - enrolled: refuse unknown nodes; else first claims decide
            self._grid_error = type(err).__name__
            logger.warning("the Grid did not list its nodes (%s): %s", self._grid_error,
                           "nodes it cannot match to an enrolled key are refused" if self._by_key
                           else "sites are identified by their first claim")
            return
        self._grid_error = ""
        if self._by_key:
            for info in infos:
                site = self._by_key.get(bytes(getattr(info, "public_key", b"") or b""))
                if site is None:
                    self._unenrolled.add(int(info.node_id))
                else:
                    self._known[int(info.node_id)] = (site.name, site.index)
            return
        names = {int(i.node_id): str(getattr(i, "name", "") or "") for i in infos}
        if infos and all(names.values()) and len(set(names.values())) == len(names):
            self.mode = "registered"
            self._known.update({node: (name, None) for node, name in names.items()})
            return
        times = {int(i.node_id): _registered_at(i) for i in infos}
        stamps = list(times.values())
        if infos and all(t is not None for t in stamps) and len(set(stamps)) == len(stamps):
            self.mode = "simulation"
            order = sorted(times, key=lambda n: (times[n], n))
            self._known = {node: (f"site-{rank}", rank) for rank, node in enumerate(order)}
        else:
            self.mode = "first-claim"

    def _lookup(self, node: int) -> tuple[str, int | None] | None:
        if node not in self._known and node not in self._unenrolled:
            self._refresh()
        return self._known.get(node)

    def key_of_node(self, node: int | None) -> str | None:
        """The record key of ``node`` as far as the server knows it (``None``: unknown)."""
        if node is None:
            return None
        known = self._lookup(int(node))
        if known is not None:
            return known[0]
        for index, owner in self._claims.items():
            if owner == node:
                return f"site-{index}"
        return None

    def identify(self, node: int | None, metrics: Mapping[str, Scalar], *, position: int) -> Identity:
        """Who sent a result with ``metrics`` from ``node`` (``position``: its place in the round)."""
        claimed = _reported_index(metrics)
        if node is None:  # no node to check (in-process tests): the report is all there is
            return Identity(f"site-{claimed}" if claimed is not None else f"site-?{position}", claimed, None)
        node = int(node)
        known = self._lookup(node)
        if known is not None:
            key, index = known
            if index is not None and claimed is not None and claimed != index:
                return Identity(key, index, node, refused=(
                    f"node {node} authenticated as {key} (site-index {index}) but reports site-index {claimed}"
                ))
            return Identity(key, index, node)
        if self._by_key:  # deployment: a key that is not enrolled (registered by hand, or revoked late)
            if self._grid_error:
                return Identity(f"node-{node}", None, node, refused=(
                    f"node {node}'s identity cannot be checked: the Grid did not list its nodes ({self._grid_error})"
                ))
            return Identity(f"node-{node}", None, node, refused=(
                f"node {node} authenticated with a key that no enrolled site has (federation.toml)"
            ))
        if claimed is None:
            return Identity(f"site-?{position}", None, node, refused=f"node {node} reports no usable site-index")
        owner = self._claims.setdefault(claimed, node)
        if owner != node:
            return Identity(f"node-{node}", None, node, refused=(
                f"node {node} reports site-index {claimed}, which node {owner} holds in this run"
            ))
        earlier = [i for i, n in self._claims.items() if n == node and i != claimed]
        if earlier:
            del self._claims[claimed]
            return Identity(f"site-{earlier[0]}", earlier[0], node, refused=(
                f"node {node} reported site-index {earlier[0]} before and now reports {claimed}"
            ))
        return Identity(f"site-{claimed}", claimed, node)
