"""What the server sends the sites each round is what they read (issue 13).

For every strategy (and client-level DP), the keys of the fit and evaluate configs that the
server's strategy puts into each round's instructions equal the keys medfed's site reads from
them; the only extra keys are Flower's own client-DP protocol keys, which Flower's client mods
(installed by ``medfed.client.client_app.privacy_mods``) read.
"""

from __future__ import annotations

from typing import Any

import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client.client_app import privacy_mods
from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.server.strategies import build_strategy
from medfed.shared.config import STRATEGIES, RunConfig
from medfed.shared.round_config import EVALUATE_CONFIG_KEYS, EVALUATE_REQUEST_FLAGS, FIT_CONFIG_KEYS
from medfed.shared.task import round_settings
from medfed.shared.training import cosine_lr
from medfed.shared.weights import get_weights

SITES = 7  # bulyan with one malicious site needs 4f + 3 = 7 per round


class _Proxy(ClientProxy):
    """A connected site that is never called (only sampled by ``configure_fit``)."""

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError


class _ReadKeys(dict):
    """A config that records which keys are read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def _cfg(**changes: Any) -> RunConfig:
    return RunConfig(dataset="synthetic", synthetic_samples=64, model="simplecnn", image_size=12, batch_size=8,
                     num_sites=SITES, min_fit_clients=SITES, local_epochs=1, num_server_rounds=4, store="off",
                     **changes)


def _sent(cfg: RunConfig, weights: list) -> tuple[set[str], set[str]]:
    """Keys of the fit and evaluate configs the strategy sends in round 2."""
    strategy = build_strategy(cfg, initial_weights=weights, evaluate_fn=None, min_available_clients=SITES)
    manager = SimpleClientManager()
    for i in range(SITES):
        manager.register(_Proxy(f"site-{i}"))
    parameters = ndarrays_to_parameters(weights)
    fit = strategy.configure_fit(2, parameters, manager)
    evaluate = strategy.configure_evaluate(2, parameters, manager)
    assert len(fit) == SITES and len(evaluate) == SITES
    fit_keys = {frozenset(ins.config) for _, ins in fit}
    evaluate_keys = {frozenset(ins.config) for _, ins in evaluate}
    assert len(fit_keys) == len(evaluate_keys) == 1  # every site gets the same keys
    return set(next(iter(fit_keys))), set(next(iter(evaluate_keys)))


@pytest.fixture(scope="module")
def site() -> SiteClient:
    cfg = _cfg()
    return SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=0, num_sites=SITES), site_index=0)


def _read(site: SiteClient, fit_config: dict, evaluate_config: dict) -> tuple[set[str], set[str]]:
    weights = site.get_parameters({})
    fit, evaluate = _ReadKeys(fit_config), _ReadKeys(evaluate_config)
    site.fit([w.copy() for w in weights], fit)
    site.evaluate([w.copy() for w in weights], evaluate)
    return fit.read, evaluate.read


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_keys_sent_each_round_are_the_keys_the_site_reads(site: SiteClient, strategy: str) -> None:
    cfg = _cfg(strategy=strategy)
    fit_sent, evaluate_sent = _sent(cfg, get_weights(site.model))
    fit_read, evaluate_read = _read(site, dict.fromkeys(fit_sent, 2), dict.fromkeys(evaluate_sent, 2))
    assert fit_sent == fit_read == set(FIT_CONFIG_KEYS)
    assert evaluate_sent == set(EVALUATE_CONFIG_KEYS)
    # the site also looks for the flags of other evaluate requests (cross-site), absent in a round's config
    assert evaluate_read == set(EVALUATE_CONFIG_KEYS) | set(EVALUATE_REQUEST_FLAGS)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_client_dp_adds_only_the_clipping_norm_which_flowers_mod_reads(site: SiteClient, mode: str) -> None:
    cfg = _cfg(client_dp=mode)
    fit_sent, evaluate_sent = _sent(cfg, get_weights(site.model))
    fit_read, _ = _read(site, dict.fromkeys(fit_sent - {KEY_CLIPPING_NORM}, 2), {})
    assert fit_sent - fit_read == {KEY_CLIPPING_NORM}
    assert fit_read == set(FIT_CONFIG_KEYS) and evaluate_sent == set(EVALUATE_CONFIG_KEYS)
    mod_names = {getattr(m, "__name__", "") for m in privacy_mods(cfg)}
    assert f"{mode}clipping_mod" in mod_names  # the Flower mod that reads the clipping norm


def test_the_sites_hyperparameters_come_from_the_run_config_not_the_message() -> None:
    """The round's learning rate follows the run config's schedule at the sent round; fedprox's mu
    comes from the run config (nothing in the message can change either)."""
    cfg = _cfg(strategy="fedprox", proximal_mu=0.3, learning_rate=0.2)
    settings = round_settings(cfg, server_round=3, site_index=1)
    assert settings.learning_rate == cosine_lr(0.2, step=3, total=4) and settings.learning_rate < 0.2
    assert settings.proximal_mu == 0.3
    assert round_settings(cfg.replace(strategy="fedavg"), server_round=3, site_index=1).proximal_mu == 0.0
