"""State a site keeps between rounds (``medfed.shared.site_state``): local BatchNorm entries under
``bn-mode = "local-stats"`` (SiloBN) and ``"fedbn"`` never leave the site and carry over to its
next round and its evaluation; SCAFFOLD's site control variate follows Option II and survives a
restart of the site (it is read back from the state file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.shared.config import RunConfig
from medfed.shared.scaffold import path_length, site_control_update
from medfed.shared.site_state import SiteState, site_state_path
from medfed.shared.training import cosine_lr
from medfed.shared.weights import batchnorm_entries


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tmp_path: Path, **changes) -> RunConfig:
    return RunConfig(dataset="synthetic", synthetic_samples=48, model="simplecnn", image_size=12, batch_size=8,
                     num_sites=2, local_epochs=1, num_server_rounds=3, run_dir=str(tmp_path), **changes)


def _site(cfg: RunConfig) -> SiteClient:
    return SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=1, num_sites=2), site_index=1)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", ["local-stats", "fedbn"])
def test_local_batchnorm_entries_are_not_sent_and_persist_across_rounds(tmp_path: Path, mode: str) -> None:
    cfg = _cfg(tmp_path, bn_mode=mode)
    site = _site(cfg)
    stats, affine = batchnorm_entries(site.model)
    local = sorted(stats + affine) if mode == "fedbn" else stats
    sent = site.get_parameters({})
    returned, _, _ = site.fit([w.copy() for w in sent], {"server-round": 1})
    for i in local:  # what leaves the site is what it received
        assert np.array_equal(returned[i], sent[i])
    assert not all(np.array_equal(returned[i], sent[i]) for i in range(len(sent)) if i not in local)  # it trained
    kept = SiteState(site_state_path(cfg, site_index=1)).before(2)["local"]
    assert not all(np.array_equal(k, sent[i]) for k, i in zip(kept, local, strict=True))  # its own statistics
    # a rebuilt site (simulation recreates it every round) evaluates and trains with its own entries,
    # whatever the server's values of them are
    garbage = [w.copy() for w in returned]
    for i in stats:
        if np.issubdtype(garbage[i].dtype, np.floating):
            garbage[i] = garbage[i] + 100.0
    rebuilt = _site(cfg)
    _, _, with_garbage = rebuilt.evaluate(garbage, {})
    own = [w.copy() for w in returned]
    for i, k in zip(local, kept, strict=True):
        own[i] = k
    _, _, with_own = _site(cfg.replace(bn_mode="global")).evaluate(own, {})
    assert with_garbage == pytest.approx(with_own)
    second, _, _ = rebuilt.fit(garbage, {"server-round": 2})
    for i in local:
        assert np.array_equal(second[i], garbage[i])
    assert len(SiteState(site_state_path(cfg, site_index=1)).rounds) == 2


def test_global_mode_sends_the_batchnorm_statistics(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    site = _site(cfg)
    stats, _ = batchnorm_entries(site.model)
    sent = site.get_parameters({})
    returned, _, _ = site.fit([w.copy() for w in sent], {"server-round": 1})
    assert not all(np.array_equal(returned[i], sent[i]) for i in stats)
    assert site.state_path is None  # nothing to keep


def test_scaffold_site_control_follows_option_two_and_survives_a_restart(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, strategy="scaffold", learning_rate=0.05)
    veteran = _site(cfg)
    x = veteran.get_parameters({})
    rng = np.random.default_rng(0)
    control = [(0.01 * rng.standard_normal(w.shape)).astype(np.float32) for w in x]
    y, _, metrics = veteran.fit([*x, *control], {"server-round": 1})
    assert len(y) == len(x)  # only the weights go back
    state = SiteState(site_state_path(cfg, site_index=1))
    expected = site_control_update(
        site_control=[np.zeros_like(c) for c in control], control=control, global_weights=x, local_weights=y,
        length=path_length(
            optimizer="sgd", learning_rate=cosine_lr(0.05, step=1, total=3), steps=int(metrics["train-steps"])
        ),
    )
    assert _same(state.before(2)["control"], expected)
    # the correction changes training: the same round without a control variate differs
    plain, _, _ = _site(cfg.replace(run_dir=str(tmp_path / "other"))).fit([*x, *[np.zeros_like(c) for c in control]],
                                                                          {"server-round": 1})
    assert not _same(plain, y)
    # round 2 in the same process and after a restart (a new SiteClient reads the file)
    again, _, _ = veteran.fit([*y, *control], {"server-round": 2})
    restarted = _site(cfg)
    after_restart, _, _ = restarted.fit([*y, *control], {"server-round": 2})
    assert _same(again, after_restart)
    # without the file the restarted site would train with c_i = 0, and differ
    site_state_path(cfg, site_index=1).unlink()
    forgot, _, _ = _site(cfg).fit([*y, *control], {"server-round": 2})
    assert not _same(forgot, after_restart)


def test_round_one_starts_afresh_and_an_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "site-0.pt"
    state = SiteState(path)
    state.save(5, {"control": [np.ones(2)]})
    assert SiteState(path).before(6)["control"][0].tolist() == [1.0, 1.0]
    assert SiteState(path).before(1) == {}  # a new run with the same config does not inherit it
    SiteState(path).save(1, {"control": [np.zeros(2)]})
    assert list(SiteState(path).rounds) == [1]
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="site-0.pt"):
        SiteState(path)
