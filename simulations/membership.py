"""Empirical privacy: a loss-threshold membership-inference attack on a trained model.

The attack (Yeom et al., CSF 2018) scores each example by its negative loss under the model:
examples the model was trained on ("members") tend to have lower loss than examples it never
saw ("non-members"). Its ROC AUC over members vs non-members is 0.5 when the model leaks
nothing about membership and approaches 1 for a model that memorised its training set.
DP-SGD bounds any attack's advantage, so the AUC should stay near 0.5 at small epsilon.

:class:`UpdateAttack` is the stronger attack of a curious server that sees every site update (no
SecAgg+): it calibrates each example's loss by the model the site received (Watson et al., ICLR
2022, "difficulty calibration"; Sablayrolles et al. 2019), scoring ``loss_before - loss_after``
summed over the rounds it sees, so an example that is hard for every model no longer looks like a
non-member. Sample-level DP-SGD at the site bounds this attack too: the site's whole local
training is the private mechanism.

:func:`train_fedavg_in_process` runs real :class:`~medfed.client.site_client.SiteClient` objects
through FedAvg rounds in this process (no Ray), so the attack sees the same DP-SGD path, ledger
and budget checks as a federated run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import DataLoader

from medfed.client.site_client import SiteClient
from medfed.shared.data.base import ImageSet
from medfed.shared.round_config import fit_config
from medfed.shared.training import make_loss
from medfed.shared.transforms import ImageSetDataset
from medfed.shared.weights import get_weights, set_weights

__all__ = [
    "MembershipResult",
    "per_example_losses",
    "attack_auc",
    "loss_threshold_attack",
    "matched_non_members",
    "score_auc",
    "score_auc_interval",
    "train_fedavg_in_process",
    "UpdateAttack",
    "UpdateAttackResult",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MembershipResult:
    """Outcome of a loss-threshold membership-inference attack.

    Attributes
    ----------
    auc
        ROC AUC of the score ``-loss`` for members (positives) vs non-members; 0.5 = chance.
    member_loss, non_member_loss
        Mean per-example loss of each group.
    num_members, num_non_members
        Group sizes.
    """

    auc: float
    member_loss: float
    non_member_loss: float
    num_members: int
    num_non_members: int


@torch.no_grad()
def per_example_losses(
    model: nn.Module, data: ImageSet, *, device: torch.device | str = "cpu", batch_size: int = 256
) -> np.ndarray:
    """The training loss of every example of ``data`` under ``model`` (eval mode, no augmentation).

    Returns
    -------
    numpy.ndarray
        ``float64`` array of shape ``(N,)``. Segmentation losses are averaged over voxels.
    """
    if data.task != "classification":
        raise ValueError(
            f"the loss-threshold attack here supports classification data; got task = {data.task!r}."
        )
    loss_fn = make_loss(data.task)
    loss_fn.reduction = "none"
    device = torch.device(device)
    model.to(device).eval()
    losses = []
    for images, targets in DataLoader(ImageSetDataset(data), batch_size=batch_size, shuffle=False):
        losses.append(loss_fn(model(images.to(device)), targets.to(device)).double().cpu())
    return torch.cat(losses).numpy()


def attack_auc(member_losses: np.ndarray, non_member_losses: np.ndarray) -> float:
    """ROC AUC of ``-loss`` as a membership score; members are the positives (:func:`score_auc`)."""
    return score_auc(-np.asarray(member_losses, np.float64), -np.asarray(non_member_losses, np.float64))


def score_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """ROC AUC of a membership score (higher: more likely a member), ties counted half.

    The Mann-Whitney statistic over the two groups: the probability that a random member scores
    above a random non-member (MONAI's ``compute_roc_auc`` of the same scores; this one takes
    O(n log n) numpy work, so the bootstrap of :func:`score_auc_interval` stays cheap).
    """
    m, n = np.asarray(member_scores, np.float64), np.asarray(non_member_scores, np.float64)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("the attack needs at least one member and one non-member example.")
    ranks = rankdata(np.concatenate([m, n]))  # ties get their average rank
    return float((ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def score_auc_interval(
    member_scores: np.ndarray, non_member_scores: np.ndarray, *, seed: int = 0, resamples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
    """A percentile bootstrap interval of :func:`score_auc` (members and non-members resampled
    separately, each with replacement): the ``level`` interval, e.g. ``(0.47, 0.56)``."""
    rng = np.random.default_rng(seed)
    m, n = np.asarray(member_scores, np.float64), np.asarray(non_member_scores, np.float64)
    draws = [score_auc(rng.choice(m, len(m)), rng.choice(n, len(n))) for _ in range(resamples)]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def loss_threshold_attack(
    model: nn.Module,
    *,
    members: ImageSet,
    non_members: ImageSet,
    device: torch.device | str = "cpu",
) -> MembershipResult:
    """Attack ``model``: can its per-example loss tell ``members`` from ``non_members``?

    Parameters
    ----------
    model
        The (final global) model, mapping ``(B, C, *spatial)`` to logits ``(B, K)``.
    members
        Examples the model was trained on (the sites' training images).
    non_members
        Held-out examples from the same distribution, never trained on.
    """
    m = per_example_losses(model, members, device=device)
    n = per_example_losses(model, non_members, device=device)
    return MembershipResult(
        auc=attack_auc(m, n),
        member_loss=float(m.mean()),
        non_member_loss=float(n.mean()),
        num_members=len(m),
        num_non_members=len(n),
    )


@dataclass(frozen=True)
class UpdateAttackResult:
    """Outcome of an :class:`UpdateAttack` over the sites' updates.

    Attributes
    ----------
    auc
        ROC AUC of the summed loss drop for members (positives) vs non-members; 0.5 = chance.
    low, high
        Its 95% bootstrap interval (:func:`score_auc_interval`).
    member_drop, non_member_drop
        Mean summed loss decrease of each group over the observed updates.
    num_members, num_non_members
        Group sizes (summed over sites).
    updates
        Number of (site, round) updates observed.
    """

    auc: float
    low: float
    high: float
    member_drop: float
    non_member_drop: float
    num_members: int
    num_non_members: int
    updates: int


class UpdateAttack:
    """A curious server's membership attack on the sites' updates (no SecAgg+), round after round.

    For every update it sees (:meth:`observe`), the server scores each example by how much the
    site's training lowered its loss: ``loss(received) - loss(returned)``, the loss under the
    model the site received minus that under the model it sent back (difficulty calibration:
    Watson et al., ICLR 2022). Scores add up over the rounds a site takes part in, so the signal
    of an example trained on in every round grows with the rounds. The AUC is over every site's
    members and non-members together, each scored under its own site's updates.

    Parameters
    ----------
    model
        A module of the run's architecture; its weights are overwritten. Logits ``(B, K)``.
    members, non_members
        Per site (in site order), its training examples and held-out examples of the same
        distribution (class mix matched: :func:`matched_non_members`).
    """

    def __init__(
        self, model: nn.Module, *, members: Sequence[ImageSet], non_members: Sequence[ImageSet],
        device: torch.device | str = "cpu",
    ) -> None:
        if len(members) != len(non_members) or not members:
            raise ValueError("UpdateAttack needs one member set and one non-member set per site.")
        self.model, self.device = model, device
        self.members, self.non_members = list(members), list(non_members)
        self.member_scores = [np.zeros(len(m)) for m in self.members]
        self.non_member_scores = [np.zeros(len(n)) for n in self.non_members]
        self.updates = 0
        self.seconds = 0.0  # spent in observe(), for callers that time the training around it

    def observe(self, site_index: int, received: list[np.ndarray], returned: list[np.ndarray]) -> None:
        """Add one update of site ``site_index``: the weights it received and those it sent back
        (``get_weights`` order)."""
        if not 0 <= site_index < len(self.members):
            raise ValueError(f"site_index {site_index} is out of range: the attack has {len(self.members)} site(s).")
        start = time.perf_counter()
        mine, others = self.members[site_index], self.non_members[site_index]
        set_weights(self.model, received)
        before = per_example_losses(self.model, mine, device=self.device), per_example_losses(
            self.model, others, device=self.device)
        set_weights(self.model, returned)
        after = per_example_losses(self.model, mine, device=self.device), per_example_losses(
            self.model, others, device=self.device)
        self.member_scores[site_index] += before[0] - after[0]
        self.non_member_scores[site_index] += before[1] - after[1]
        self.updates += 1
        self.seconds += time.perf_counter() - start

    def result(self, *, seed: int = 0) -> UpdateAttackResult:
        """The attack's AUC and 95% bootstrap interval over everything observed so far."""
        m, n = np.concatenate(self.member_scores), np.concatenate(self.non_member_scores)
        low, high = score_auc_interval(m, n, seed=seed)
        return UpdateAttackResult(
            auc=score_auc(m, n), low=low, high=high, member_drop=float(m.mean()), non_member_drop=float(n.mean()),
            num_members=len(m), num_non_members=len(n), updates=self.updates,
        )


def matched_non_members(members: ImageSet, pool: ImageSet, *, seed: int) -> ImageSet:
    """The largest subset of ``pool`` whose class proportions match those of ``members``.

    A loss-threshold attack on a model whose loss depends on the class would otherwise measure
    a difference in class mix between members and non-members, not membership.
    """
    fractions = np.bincount(members.targets, minlength=members.num_classes) / len(members)
    counts = np.bincount(pool.targets, minlength=members.num_classes)
    total = int(min(counts[c] / f for c, f in enumerate(fractions) if f > 0))
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(pool.targets == c))[: int(round(total * f))]
        for c, f in enumerate(fractions)
    ]
    return pool.subset(np.sort(np.concatenate(chosen)))


def train_fedavg_in_process(
    clients: Sequence[SiteClient], *, rounds: int, initial: list[np.ndarray] | None = None,
    attack: UpdateAttack | None = None,
) -> list[np.ndarray]:
    """FedAvg over ``clients`` for ``rounds`` rounds, in this process; return the global weights.

    Each round every client's :meth:`SiteClient.fit` trains the current global model (with
    DP-SGD and its ledger when its config says ``dp``); the new global model is the
    example-weighted mean of the results, as Flower's FedAvg computes it. Sites that decline
    (``num_examples = 0``) get no weight; when all decline the global model stays as it is.
    ``attack``, when given, observes every site's update (:meth:`UpdateAttack.observe`).
    """
    if not clients:
        raise ValueError("train_fedavg_in_process needs at least one client.")
    weights = initial if initial is not None else get_weights(clients[0].model)
    for server_round in range(1, rounds + 1):
        results = [c.fit(weights, fit_config(server_round)) for c in clients]
        if attack is not None:  # a curious server sees every update
            for i, (returned, _, _) in enumerate(results):
                attack.observe(i, weights, returned)
        total = sum(n for _, n, _ in results)
        if total == 0:
            logger.warning("round %d: every site declined; the global model is unchanged.", server_round)
            continue
        weights = [
            np.sum([w[i].astype(np.float64) * (n / total) for w, n, _ in results if n > 0], axis=0).astype(
                weights[i].dtype
            )
            for i in range(len(weights))
        ]
    return weights
