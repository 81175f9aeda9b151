"""A simulation's ClientApp pickles by reference: no closure travels with every message."""

from __future__ import annotations

import pickle

import pytest
from flwr.client import ClientApp

from medfed.client.client_app import BoundClientApp, SiteClientFn, make_client_app
from medfed.client.egress import egress_guard
from medfed.client.secagg_packed import packed_secaggplus_mod
from medfed.shared.config import RunConfig
from medfed.simulations.bench.secagg import NoiseClientFn, noise_client_fn


def _mod_names(app: ClientApp) -> list[str]:
    return [getattr(m, "__qualname__", type(m).__name__) for m in app._mods]  # noqa: SLF001


@pytest.mark.parametrize(
    ("cfg", "mods"),
    [
        (RunConfig(), ["egress_guard"]),
        (RunConfig(secagg=True), ["egress_guard", "packed_secaggplus_mod", "make_update_mod.<locals>.update_mod"]),
        (RunConfig(client_dp="fixed"), ["egress_guard", "make_update_mod.<locals>.update_mod", "fixedclipping_mod",
                                         "freeze_counters_mod"]),
    ],
    ids=["plain", "secagg", "client-dp"],
)
def test_a_bound_app_pickles_without_closures_and_rebuilds_the_same_mods(cfg: RunConfig, mods: list[str]) -> None:
    """The standard pickle refuses closures and lambdas, so success means nothing travels by value:
    what Ray's cloudpickle would otherwise serialise (code and globals) for every message."""
    app = make_client_app(cfg)
    assert isinstance(app, BoundClientApp) and _mod_names(app) == mods
    payload = pickle.dumps(app)
    assert len(payload) < 4000
    again = pickle.loads(payload)
    assert isinstance(again, BoundClientApp) and _mod_names(again) == mods
    assert again._parts[0] == cfg and isinstance(again._parts[1], SiteClientFn)  # noqa: SLF001


def test_a_plain_clientapp_with_closures_does_not_pickle_by_reference() -> None:
    """What the bound app avoids: Flower's ClientApp holds closures (its own wrappers, the mods)."""
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(ClientApp(client_fn=NoiseClientFn([1, 2]), mods=[egress_guard, packed_secaggplus_mod]))


def test_a_custom_client_fn_travels_with_the_app() -> None:
    app = make_client_app(RunConfig(secagg=True), client_fn=noise_client_fn([10, 20]))
    again = pickle.loads(pickle.dumps(app))
    assert isinstance(again._parts[1], NoiseClientFn) and again._parts[1].sizes == [10, 20]  # noqa: SLF001


def test_the_deployment_app_reads_the_run_config_per_message() -> None:
    app = make_client_app()
    assert not isinstance(app, BoundClientApp)
    assert _mod_names(app) == ["egress_guard", "run_config_privacy_mod"]
