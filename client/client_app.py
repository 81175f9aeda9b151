"""medfed's Flower ClientApp (thin: the work is in :mod:`client.site_client`)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.client import Client, ClientApp

from client.egress import egress_guard
from client.site_client import SiteClient
from client.site_data import simulated_site_data
from shared.config import RunConfig

__all__ = ["app", "make_client_app"]


def _client_fn_for(fixed: RunConfig | None) -> Callable[[Context], Client]:
    def client_fn(context: Context) -> Client:
        cfg = fixed or RunConfig.from_mapping(context.run_config, source="run config")
        site_index = int(context.node_config["partition-id"])
        num_sites = int(context.node_config["num-partitions"])
        data = simulated_site_data(cfg, site_index=site_index, num_sites=num_sites)
        return SiteClient(cfg=cfg, data=data, site_index=site_index).to_client()

    return client_fn


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg`` (simulation), or reading the run config (``flwr run``).

    Every reply passes the :func:`client.egress.egress_guard` last, so nothing but numeric
    arrays and scalar metrics leaves the site.
    """
    return ClientApp(client_fn=_client_fn_for(cfg), mods=[egress_guard])


app = make_client_app()
