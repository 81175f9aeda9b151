"""medfed's Flower ClientApp (thin: the work is in :mod:`medfed.client.site_client`)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.client import Client, ClientApp
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod, make_ffn
from flwr.clientapp.typing import ClientAppCallable, Mod

from medfed.client.egress import egress_guard
from medfed.client.secagg_packed import packed_secaggplus_mod
from medfed.client.site_client import SiteClient
from medfed.client.site_data import deployment_site_data, simulated_site_data
from medfed.client.site_policy import SitePolicy
from medfed.client.update_mods import freeze_counters_mod, make_update_mod
from medfed.shared.config import BAD_DATA_MODES, ConfigError, RunConfig, parse_spacing
from medfed.shared.config_sources import config_from_run_config
from medfed.shared.privacy import deployment_ledger_path

__all__ = ["app", "make_client_app", "privacy_mods", "run_config_privacy_mod", "simulated_site", "site_client_fn"]

logger = logging.getLogger(__name__)


class SiteClientFn:
    """The ``client_fn`` of medfed's ClientApp: a :class:`SiteClient` on the node's data.

    Simulation: the node's share (``partition-id`` / ``num-partitions`` in its node config) of
    ``fixed`` (or the run config's) dataset; deployment: the site's datalist (``datalist``).
    A module-level class, so a simulation pickles it by reference (a closure is pickled by value,
    its code and globals, for every message).
    """

    def __init__(self, fixed: RunConfig | None) -> None:
        self.fixed = fixed

    def __call__(self, context: Context) -> Client:
        cfg = self.fixed or config_from_run_config(context.run_config)
        if "datalist" in context.node_config:  # deployment: the site's own files
            return _deployment_client(cfg, context.node_config)
        if cfg.is_deployment:
            raise ValueError(
                'dataset = "deployment" but this SuperNode\'s node config has no "datalist": '
                "start the site with `medfed site start --kit DIR --config site.toml`."
            )
        site_index = int(context.node_config["partition-id"])
        num_sites = int(context.node_config["num-partitions"])
        return simulated_site(cfg, site_index=site_index, num_sites=num_sites).to_client()


def site_client_fn(fixed: RunConfig | None) -> Callable[[Context], Client]:
    """The ``client_fn`` of medfed's ClientApp (:class:`SiteClientFn`)."""
    return SiteClientFn(fixed)


SIMULATED_SITES_KEPT = 8
"""How many simulated sites' :class:`SiteClient` one process keeps between messages."""

_simulated_sites: OrderedDict[tuple[RunConfig, int, int], SiteClient] = OrderedDict()


def simulated_site(cfg: RunConfig, *, site_index: int, num_sites: int) -> SiteClient:
    """The :class:`SiteClient` of simulated site ``site_index``, kept across messages and rounds.

    Flower calls ``client_fn`` for every message, so without this each training and each
    evaluation message rebuilt the site's model (about 0.2 s for ResNet-18 on one core, paid by
    every site twice a round). Reusing it changes no result: every message first overwrites the
    model's whole state with the server's (``set_weights``), each round seeds its own training
    from the run's seed, DP-SGD unwraps the model after the round, and what a site keeps between
    rounds (local BatchNorm entries, SCAFFOLD's control variate, the privacy ledger) lives in its
    files, as before. The :data:`SIMULATED_SITES_KEPT` most recently used sites are kept per
    process (least recently used dropped first), keyed by the run config, so another run or
    another config never sees them.
    """
    key = (cfg, site_index, num_sites)
    client = _simulated_sites.get(key)
    if client is not None:
        _simulated_sites.move_to_end(key)
        return client
    data = simulated_site_data(cfg, site_index=site_index, num_sites=num_sites)
    client = SiteClient(cfg=cfg, data=data, site_index=site_index)
    _simulated_sites[key] = client
    while len(_simulated_sites) > SIMULATED_SITES_KEPT:
        _simulated_sites.popitem(last=False)
    return client


_client_fn_for = site_client_fn  # the earlier private name


def _deployment_client(cfg: RunConfig, node_config: Mapping[str, Any]) -> Client:
    """A site of a deployed federation (node config written by ``medfed site start``).

    Node-config keys: ``datalist`` (path), ``site-index`` (int), ``device``, the site's privacy
    policy (:class:`~medfed.client.site_policy.SitePolicy`: ``require-dp``,
    ``dp-budget-epsilon``, ``dp-max-delta``, ``dp-min-noise-multiplier``,
    ``dp-require-secure-noise``, ``ledger-dir``) and ``bad-data`` (optional, ``"strict"`` or
    ``"skip"``: the site's choice for its own unusable datalist entries, which wins over the
    run's ``bad-data``) and ``spacing`` (optional: the voxel size in mm the site resamples its
    NIfTI/DICOM images to, which wins over the run's ``spacing``: the site knows its scanners).

    The policy is the site's, whatever the run config says: the site's client refuses a run
    that asks for less privacy (see :meth:`SiteClient.fit`), the run's ``dp-budget-epsilon``
    only ever lowers the site's, and the ledger is the site's one ledger for its datalist
    (:func:`~medfed.shared.privacy.deployment_ledger_path` under the policy's ``ledger-dir``):
    the run's ``ledger-dir`` and ``run-dir`` are ignored, and no folder is created where the
    coordinator says.

    Raises
    ------
    ConfigError
        ``bad-data`` in the node config is neither ``"strict"`` nor ``"skip"``, a policy value
        is invalid, or a DP run reaches a site whose node config has no ``ledger-dir``.
    """
    site_index = int(node_config.get("site-index", 0))
    policy = SitePolicy.from_node_config(node_config)
    if cfg.ledger_dir:
        logger.warning(
            "the run config's ledger-dir is ignored at a deployed site: this site keeps its privacy "
            "ledger in the ledger-dir of its own site.toml."
        )
    cfg = cfg.replace(dp_budget_epsilon=min(cfg.dp_budget_epsilon, policy.budget_epsilon), ledger_dir="")
    bad_data = node_config.get("bad-data")
    if bad_data is not None:
        if bad_data not in BAD_DATA_MODES:
            raise ConfigError(
                f"node config bad-data = {bad_data!r} is invalid. Valid choices: "
                + ", ".join(repr(m) for m in BAD_DATA_MODES)
                + " (set it in site.toml)."
            )
        cfg = cfg.replace(bad_data=str(bad_data))
    spacing = node_config.get("spacing")
    if spacing is not None:
        try:
            parse_spacing(spacing, key="node config spacing")
        except ConfigError as err:
            raise ConfigError(f"{err} (set it in site.toml).") from None
        cfg = cfg.replace(spacing=str(spacing))
    datalist = str(node_config["datalist"])
    ledger_path = None
    if cfg.dp:
        if not policy.ledger_dir:
            raise ConfigError(
                "this site's node config has no ledger-dir, so it has nowhere of its own to keep its "
                "privacy ledger: restart it with `medfed site start --kit DIR --config site.toml`."
            )
        ledger_path = deployment_ledger_path(policy.ledger_dir, datalist=datalist)
    data = deployment_site_data(cfg, datalist=datalist)
    device = str(node_config.get("device", "auto"))
    return SiteClient(
        cfg=cfg, data=data, site_index=site_index, device=device, policy=policy, ledger_path=ledger_path
    ).to_client()


def privacy_mods(cfg: RunConfig) -> list[Mod]:
    """The mods ``cfg`` asks for, outermost first (the egress guard goes before them).

    Flower's ``secaggplus_mod`` with medfed's 32-bit masked vectors
    (:func:`~medfed.client.secagg_packed.packed_secaggplus_mod`, ``secagg``), medfed's update mod (``secagg`` or ``client-dp``: updates
    instead of weights under SecAgg+, integer entries clippable under DP; see
    :mod:`medfed.client.update_mods`), then Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``
    with :func:`~medfed.client.update_mods.freeze_counters_mod` inside it (``client-dp``).
    """
    mods: list[Mod] = []
    if cfg.secagg:
        mods.append(packed_secaggplus_mod)
    if cfg.secagg or cfg.client_dp != "off":
        mods.append(make_update_mod(cfg))
    if cfg.client_dp == "fixed":
        mods += [fixedclipping_mod, freeze_counters_mod]
    elif cfg.client_dp == "adaptive":
        mods += [adaptiveclipping_mod, freeze_counters_mod]
    return mods


def run_config_privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """:func:`privacy_mods` chosen per message from ``context.run_config`` (``flwr run``)."""
    cfg = config_from_run_config(context.run_config)
    return make_ffn(call_next, privacy_mods(cfg))(msg, context)


def make_client_app(
    cfg: RunConfig | None = None, *, client_fn: Callable[[Context], Client] | None = None
) -> ClientApp:
    """A ClientApp bound to ``cfg`` (simulation), or reading the run config (``flwr run``).

    Every reply passes the :func:`medfed.client.egress.egress_guard` last, so nothing but numeric
    arrays, scalar metrics and SecAgg+ protocol values leaves the site. With a fixed ``cfg``
    the privacy mods are known now; without one they are chosen from each run's config.

    Parameters
    ----------
    cfg
        The run configuration (simulation), or ``None`` to read ``context.run_config``.
    client_fn
        The site's client (default: :class:`~medfed.client.site_client.SiteClient` on the site's
        data); benchmarks and tests pass their own.

    Returns
    -------
    ClientApp
        A :class:`BoundClientApp` when ``cfg`` is given (cheap to pickle per message).
    """
    if cfg is not None:
        return BoundClientApp(cfg, client_fn=client_fn or site_client_fn(cfg))
    return ClientApp(client_fn=client_fn or site_client_fn(cfg), mods=[egress_guard, run_config_privacy_mod])


class BoundClientApp(ClientApp):
    """medfed's ClientApp bound to one run configuration (a simulation's), pickled by reference.

    Flower's simulation engine sends the ClientApp to a Ray worker with every message, pickled
    with cloudpickle. A plain ``ClientApp`` holds closures (its mods' and its own wrappers), which
    cloudpickle serialises by value, scanning ``sys.modules`` (thousands of modules once torch
    and MONAI are loaded) for each: about 1 ms of the server's CPU per message (0.9 ms, 8.8 KB
    with SecAgg+'s mods), four messages per site and round under SecAgg+. This one pickles as
    ``(cfg, client_fn, mods)`` (0.04 ms, 2.5 KB; ``python -m medfed.simulations.bench.secagg_parts``)
    and is rebuilt by
    :func:`make_client_app` in the worker. (At 8 sites x 1M parameters the effect on a round was
    within the run-to-run noise: BENCHMARKS.md, issue 19.)

    Parameters
    ----------
    cfg
        The run configuration; chooses the privacy mods (:func:`privacy_mods`).
    client_fn
        The site's client; a module-level function or class instance pickles by reference.
    mods
        The mods after the egress guard (default: :func:`privacy_mods` of ``cfg``).
    """

    def __init__(
        self, cfg: RunConfig, *, client_fn: Callable[[Context], Client], mods: list[Mod] | None = None
    ) -> None:
        super().__init__(client_fn=client_fn, mods=[egress_guard, *(privacy_mods(cfg) if mods is None else mods)])
        self._parts = (cfg, client_fn, mods)

    def __reduce__(self) -> tuple[Any, ...]:
        cfg, client_fn, mods = self._parts
        return (_rebuild_bound_app, (cfg, client_fn, mods))


def _rebuild_bound_app(
    cfg: RunConfig, client_fn: Callable[[Context], Client], mods: list[Mod] | None
) -> BoundClientApp:
    return BoundClientApp(cfg, client_fn=client_fn, mods=mods)


app = make_client_app()
