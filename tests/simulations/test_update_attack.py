"""The calibrated attack on sites' updates (``membership.UpdateAttack``) and the rank AUC with its
bootstrap interval: hand-checkable cases, and what ``federate_in_process`` hands the attack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from torch import nn

from medfed.shared.config import RunConfig
from medfed.shared.data.base import ImageSet
from medfed.shared.weights import get_weights
from medfed.simulations.bench.quality import federate_in_process
from medfed.simulations.membership import UpdateAttack, UpdateAttackResult, attack_auc, score_auc, score_auc_interval


@pytest.mark.parametrize(
    ("members", "non_members", "auc"),
    [
        ([3.0, 4.0], [1.0, 2.0], 1.0),  # every member above every non-member
        ([1.0, 2.0], [3.0, 4.0], 0.0),
        ([1.0, 1.0], [1.0, 1.0], 0.5),  # ties count half
        ([2.0, 0.0], [1.0], 0.5),
        ([3.0, 1.0, 2.0], [1.0, 0.0], 5.5 / 6),  # pairs above: 2 + (0.5 + 1) + 2
    ],
)
def test_score_auc_counts_the_pairs_a_member_wins(members: list[float], non_members: list[float], auc: float) -> None:
    assert score_auc(np.array(members), np.array(non_members)) == pytest.approx(auc)
    # MONAI's ROC AUC of the same scores, and the loss-threshold attack's AUC of -loss
    labels = torch.tensor([1.0] * len(members) + [0.0] * len(non_members))
    assert float(compute_roc_auc(torch.tensor(members + non_members), labels)) == pytest.approx(auc, abs=1e-6)
    assert attack_auc(-np.array(members), -np.array(non_members)) == pytest.approx(auc)


def test_the_bootstrap_interval_holds_the_estimate_and_narrows_with_more_examples() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 800):
        m, o = rng.normal(0.5, 1.0, n), rng.normal(0.0, 1.0, n)
        low, high = score_auc_interval(m, o, seed=0, resamples=300)
        assert low < score_auc(m, o) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    with pytest.raises(ValueError, match="at least one member"):
        score_auc(np.array([]), np.array([1.0]))


def _images(n: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 2, n).astype(np.int64),
                    "classification", 2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def _site_update(members: ImageSet, *, optimizer: str, steps: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The weights a site receives (``_model()``) and those it returns after ``steps`` full-batch
    steps on ``members`` (Adam lr 0.05 or SGD lr 0.1)."""
    model = _model()
    received = [w.copy() for w in get_weights(model)]
    opt = (torch.optim.Adam(model.parameters(), lr=0.05) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.as_tensor(members.images), torch.as_tensor(members.targets)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return received, get_weights(model)


def _attack_once(received: list[np.ndarray], returned: list[np.ndarray], members: ImageSet,
                 others: ImageSet) -> UpdateAttackResult:
    attack = UpdateAttack(_model(), members=[members], non_members=[others])
    attack.observe(0, received, returned)
    return attack.result()


def test_an_update_that_memorised_its_site_is_caught_and_no_update_is_chance() -> None:
    members, others = _images(24, seed=0), _images(24, seed=1)  # random labels, 64 inputs: only memorising fits them
    received, returned = _site_update(members, optimizer="adam", steps=200)
    caught = _attack_once(received, returned, members, others)
    assert caught.auc > 0.7 and caught.low > 0.55 and caught.member_drop > 0 > caught.non_member_drop
    assert (caught.num_members, caught.num_non_members) == (24, 24)
    idle = _attack_once(received, received, members, others)
    assert idle.auc == 0.5 and idle.member_drop == idle.non_member_drop == 0.0
    with pytest.raises(ValueError, match="per site"):
        UpdateAttack(_model(), members=[members, members], non_members=[others])


def test_scores_add_up_over_the_rounds_a_site_is_seen() -> None:
    members, others = _images(24, seed=0), _images(24, seed=1)
    attack = UpdateAttack(_model(), members=[members, members], non_members=[others, others])
    received, returned = _site_update(members, optimizer="sgd", steps=20)
    attack.observe(0, received, returned)
    one = attack.result()
    attack.observe(0, received, returned)  # the same update again: every score doubles, the ranks stay
    two = attack.result()
    assert two.updates == 2 and two.auc == one.auc
    assert two.member_drop == pytest.approx(2 * one.member_drop)
    assert np.all(attack.member_scores[1] == 0)  # site 1 was never seen
    with pytest.raises(ValueError, match="out of range"):
        attack.observe(2, received, returned)


def test_federate_in_process_shows_every_update_as_a_server_sees_it(tmp_path: Path) -> None:
    cfg = RunConfig(dataset="synthetic", synthetic_samples=96, image_size=12, model="simplecnn", num_sites=3,
                    num_server_rounds=2, local_epochs=1, batch_size=16, run_dir=str(tmp_path), store="off",
                    cross_site=False, personalize="off", augment=False, norm="group")
    globals_: list[list[np.ndarray]] = [[]]
    updates: list[tuple[int, int, list[np.ndarray], list[np.ndarray]]] = []
    curve = federate_in_process(
        cfg, on_round=lambda r, w: globals_.append(w), on_update=lambda r, i, sent, back: updates.append((r, i, sent, back))
    )
    assert [(r, i) for r, i, _, _ in updates] == [(r, i) for r in (1, 2) for i in range(cfg.num_sites)]
    for r, _, received, returned in updates:
        if r == 2:  # what each site received in round 2 is round 1's global model
            assert all(np.array_equal(a, b) for a, b in zip(received, globals_[1], strict=True))
        assert any(not np.array_equal(a, b) for a, b in zip(received, returned, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(globals_[-1], curve.final_weights, strict=True))
