"""How a run's epochs are spread over rounds: enough local steps a round for small sites.

A site with few images takes few optimizer steps per local epoch (BreastMNIST split over 4
sites: about 123 images, 4 steps of 32), so one local epoch a round gives the server a small
update to average and the federation makes less progress per epoch than pooled training. The
quality study (BENCHMARKS.md, "Local steps a round", issue 14) measured, at the same total
epochs (so pooled training and the site's compute are unchanged), that spreading them as fewer
rounds of more local epochs, so that an average site takes at least :data:`MIN_LOCAL_STEPS`
steps a round, raised BreastMNIST's federated / pooled test AUC from 0.901 to 0.934 (Dirichlet
0.5) and 0.922 to 0.962 (IID) and kept the other sets where they were.

:func:`spread_epochs` is that rule; the study's schedules (:data:`medfed.simulations.bench.
quality_study.SCHEDULES`) follow it, and ``medfed simulate`` states, below each site's class counts,
the steps an average site takes a round and the spread of the same epochs when they are fewer
(:func:`schedule_line`).
"""

from __future__ import annotations

import math

__all__ = ["MIN_LOCAL_STEPS", "MIN_ROUNDS", "local_epochs_for", "schedule_line", "spread_epochs", "steps_per_epoch"]

MIN_LOCAL_STEPS = 16
"""Optimizer steps an average site should take each round (measured, BENCHMARKS.md, issue 14)."""

MIN_ROUNDS = 5
"""Rounds the spread keeps at least (where the run has that many epochs): one or two rounds of
many local epochs is one-shot averaging of models that drifted apart, not federated training."""


def steps_per_epoch(samples: float, *, batch_size: int) -> int:
    """Optimizer steps of one epoch over ``samples`` images in batches of ``batch_size`` (the last
    batch kept, as :func:`medfed.shared.training.make_train_loader`)."""
    if batch_size < 1:
        raise ValueError(f"batch-size = {batch_size} is invalid: it must be at least 1.")
    return max(1, math.ceil(samples / batch_size))


def local_epochs_for(samples_per_site: float, *, batch_size: int, min_steps: int = MIN_LOCAL_STEPS) -> int:
    """The fewest local epochs that give a site of ``samples_per_site`` images ``min_steps`` steps."""
    return max(1, math.ceil(min_steps / steps_per_epoch(samples_per_site, batch_size=batch_size)))


def spread_epochs(
    total_epochs: int, *, samples_per_site: float, batch_size: int, min_steps: int = MIN_LOCAL_STEPS
) -> tuple[int, int]:
    """``(rounds, local_epochs)`` for ``total_epochs`` epochs of training: at least ``min_steps``
    steps a round for an average site, as many rounds as that leaves, and never fewer than
    :data:`MIN_ROUNDS` rounds where ``total_epochs`` allows (the local epochs are capped instead).

    ``rounds * local_epochs`` is ``total_epochs`` where ``local_epochs`` divides it, else the
    nearest product from below.

    Examples
    --------
    >>> spread_epochs(20, samples_per_site=123, batch_size=32)  # BreastMNIST, 4 sites
    (5, 4)
    >>> spread_epochs(10, samples_per_site=267, batch_size=32)  # AdrenalMNIST3D, 4 sites
    (5, 2)
    """
    if total_epochs < 1:
        raise ValueError(f"total epochs = {total_epochs} is invalid: it must be at least 1.")
    local = local_epochs_for(samples_per_site, batch_size=batch_size, min_steps=min_steps)
    local = max(1, min(local, total_epochs // MIN_ROUNDS))
    return max(1, total_epochs // local), local


def schedule_line(
    *, train_samples: int, num_sites: int, batch_size: int, rounds: int, local_epochs: int
) -> str:
    """``medfed simulate``'s line: the steps an average site takes a round, and the rule's spread of
    the same epochs when the run's gives fewer than :data:`MIN_LOCAL_STEPS` and more local epochs."""
    per_site = train_samples / max(1, num_sites)
    steps = steps_per_epoch(per_site, batch_size=batch_size) * local_epochs
    line = (f"local training: about {per_site:.0f} training images a site, {steps} optimizer step(s) a round "
            f"({local_epochs} local epoch(s) x batch-size {batch_size})")
    if steps >= MIN_LOCAL_STEPS:
        return line
    total = rounds * local_epochs
    r, e = spread_epochs(total, samples_per_site=per_site, batch_size=batch_size)
    if e <= local_epochs:  # too few epochs to spread over fewer, longer rounds
        return line
    return (f"{line}; fewer than {MIN_LOCAL_STEPS}: the same {total} epochs as --rounds {r} --local-epochs {e} "
            f"give {steps_per_epoch(per_site, batch_size=batch_size) * e} a round, which measured better "
            "(BENCHMARKS.md, 'Local steps a round')")
