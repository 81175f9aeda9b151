"""medfed's Flower ClientApp (thin: the work is in :mod:`client.site_client`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.client import Client, ClientApp

from client.egress import egress_guard
from client.site_client import SiteClient
from client.site_data import deployment_site_data, simulated_site_data
from shared.config import RunConfig

__all__ = ["app", "make_client_app"]


def _client_fn_for(fixed: RunConfig | None) -> Callable[[Context], Client]:
    def client_fn(context: Context) -> Client:
        cfg = fixed or RunConfig.from_mapping(context.run_config, source="run config")
        if "datalist" in context.node_config:  # deployment: the site's own files
            return _deployment_client(cfg, context.node_config)
        if cfg.is_deployment:
            raise ValueError(
                'dataset = "deployment" but this SuperNode\'s node config has no "datalist": '
                "start the site with `medfed site start --kit DIR --config site.toml`."
            )
        site_index = int(context.node_config["partition-id"])
        num_sites = int(context.node_config["num-partitions"])
        data = simulated_site_data(cfg, site_index=site_index, num_sites=num_sites)
        return SiteClient(cfg=cfg, data=data, site_index=site_index).to_client()

    return client_fn


def _deployment_client(cfg: RunConfig, node_config: Mapping[str, Any]) -> Client:
    """A site of a deployed federation (node config written by ``medfed site start``).

    Node-config keys: ``datalist`` (path), ``site-index`` (int), ``device`` and
    ``dp-budget-epsilon`` (the site's own cap: the run's budget is lowered to it, never raised).
    """
    site_index = int(node_config.get("site-index", 0))
    site_budget = float(node_config.get("dp-budget-epsilon", cfg.dp_budget_epsilon))
    if site_budget < cfg.dp_budget_epsilon:
        cfg = cfg.replace(dp_budget_epsilon=site_budget)
    data = deployment_site_data(cfg, datalist=str(node_config["datalist"]))
    device = str(node_config.get("device", "auto"))
    return SiteClient(cfg=cfg, data=data, site_index=site_index, device=device).to_client()


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg`` (simulation), or reading the run config (``flwr run``).

    Every reply passes the :func:`client.egress.egress_guard` last, so nothing but numeric
    arrays and scalar metrics leaves the site.
    """
    return ClientApp(client_fn=_client_fn_for(cfg), mods=[egress_guard])


app = make_client_app()
