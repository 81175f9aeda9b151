"""SCAFFOLD's control variates (Karimireddy et al. 2020, Option II), one formula for site and server.

A site trains with the corrected gradient ``g + c - c_i`` and then sets
``c_i+ = c_i - c + (x - y_i) / (K * eta)`` (global weights ``x``, its trained weights ``y_i``,
``K`` local steps of step size ``eta``). The server adds ``(1 / N) * sum_i (c_i+ - c_i)`` to
``c``; since ``c_i+ - c_i = (x - y_i) / (K * eta) - c`` it needs only what every site already
sends (its weights and its step count), so no control variate ever leaves a site.

``K * eta`` is the local path's length per unit of gradient. With SGD and momentum ``beta``,
whose buffer starts at zero every round, a constant gradient ``g`` moves the weights by
``lr * g * sum_{k=1..K} (1 - beta^k) / (1 - beta)``, not ``K * lr / (1 - beta)``: the momentum
warms up over its first ``1 / (1 - beta)`` steps, which is most of a short round (a site of 123
images trains 16 steps a round; 4 steps of a 6-image site move 0.9 lr, not 40 lr).
:func:`path_length` gives that sum, so ``c_i`` recovers the local gradient on sites of every size.
Control variates cover every floating-point state entry; a buffer (a BatchNorm statistic) gets
one too but no gradient uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TRAIN_STEPS", "SGD_MOMENTUM", "path_length", "site_control_update", "control_delta", "server_control_update"]

TRAIN_STEPS = "train-steps"
"""Fit metric: the optimizer steps a site took this round (``K``; a count, sent by every site)."""

SGD_MOMENTUM = 0.9
"""The momentum of :func:`medfed.shared.training.make_optimizer`'s SGD."""


def path_length(*, optimizer: str, learning_rate: float, steps: int) -> float:
    """``K * eta`` of Option II: how far ``steps`` local steps move the weights per unit of a constant gradient.

    For SGD with momentum ``beta`` (:data:`SGD_MOMENTUM`) and a buffer that starts at zero,
    ``learning_rate * sum_{k=1..K} (1 - beta^k) / (1 - beta)
    = learning_rate * (K - beta * (1 - beta^K) / (1 - beta)) / (1 - beta)``.

    Raises
    ------
    ValueError
        For Adam, whose steps are not proportional to the gradient (use SGD with SCAFFOLD).
    """
    if optimizer != "sgd":
        raise ValueError(f"strategy = 'scaffold' needs optimizer = 'sgd' (got {optimizer!r}): set optimizer = 'sgd'.")
    beta = SGD_MOMENTUM
    k = max(int(steps), 0)
    return learning_rate * (k - beta * (1.0 - beta**k) / (1.0 - beta)) / (1.0 - beta)


def control_delta(
    *, control: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], local_weights: Sequence[np.ndarray],
    length: float,
) -> list[np.ndarray]:
    """``c_i+ - c_i = (x - y_i) / (K * eta) - c`` per entry (zeros for integer entries).

    Parameters
    ----------
    control
        The server's control variate ``c`` the site trained with, shaped like the weights.
    global_weights, local_weights
        ``x`` (sent) and ``y_i`` (returned), in ``get_weights`` order.
    length
        ``K * eta``, the local path's length per unit of gradient (:func:`path_length`); a site
        that took no step (``length <= 0``) changes nothing.
    """
    if length <= 0:
        return [np.zeros_like(np.asarray(c, dtype=np.float32)) for c in control]
    out = []
    for c, x, y in zip(control, global_weights, local_weights, strict=True):
        if not np.issubdtype(np.asarray(x).dtype, np.floating):
            out.append(np.zeros(np.shape(x), dtype=np.float32))
            continue
        diff = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
        out.append((diff / length - np.asarray(c, dtype=np.float64)).astype(np.float32))
    return out


def site_control_update(
    *, site_control: Sequence[np.ndarray], control: Sequence[np.ndarray], global_weights: Sequence[np.ndarray],
    local_weights: Sequence[np.ndarray], length: float,
) -> list[np.ndarray]:
    """Option II: ``c_i+ = c_i - c + (x - y_i) / (K * eta)`` (arguments as :func:`control_delta`)."""
    delta = control_delta(control=control, global_weights=global_weights, local_weights=local_weights, length=length)
    return [(np.asarray(ci, dtype=np.float32) + d).astype(np.float32) for ci, d in zip(site_control, delta, strict=True)]


def server_control_update(
    *, control: Sequence[np.ndarray], deltas: Sequence[Sequence[np.ndarray]], num_sites: int
) -> list[np.ndarray]:
    """``c + (1 / N) * sum_i delta_i`` over the sites of the round (``N``: all sites)."""
    out = [np.asarray(c, dtype=np.float32).copy() for c in control]
    for delta in deltas:
        for acc, d in zip(out, delta, strict=True):
            acc += np.asarray(d, dtype=np.float32) / num_sites
    return out
