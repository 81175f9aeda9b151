"""Server-side evaluation of the global model on a held-out split (simulation and pooled runs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.common import NDArrays, Scalar
from torch import nn

from medfed.shared.data.base import ImageSet
from medfed.shared.training import evaluate_at_validation_threshold, reestimate_bn, select_device
from medfed.shared.weights import set_weights

__all__ = ["make_evaluate_fn"]


def make_evaluate_fn(
    model: nn.Module,
    data: ImageSet,
    *,
    val: ImageSet | None = None,
    device: str = "auto",
    bn_data: ImageSet | None = None,
    roi_size: int = 0,
    dtype: torch.dtype | None = None,
    threshold_rule: str = "youden",
) -> Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]]]:
    """A Flower ``evaluate_fn`` that scores the global weights on ``data`` (the test split).

    Parameters
    ----------
    val
        Held-out validation data on which each round's decision threshold is chosen
        (:func:`medfed.shared.training.evaluate_at_validation_threshold`), never the test split.
        In simulation the server passes the dataset's validation split: the union of the
        simulated sites' validation splits, scored centrally with the same global model (in
        deployment the server holds no data and each site scores its own validation split).
        ``None``: a 0.5 threshold.
    threshold_rule
        How that threshold is chosen (the run's ``decision-threshold``:
        :data:`medfed.shared.metrics.THRESHOLD_RULES`).
    bn_data
        Re-estimate the global model's BatchNorm statistics on these images before scoring
        (``bn-mode`` ``"local-stats"`` / ``"fedbn"``, whose sites keep their statistics; in
        simulation the pooled training split: the statistics a federated pass over the sites,
        averaged by example count, would give). ``None``: score the weights as they are.
    roi_size
        Segmentation: score whole images by sliding-window inference with this window (the
        run's ``patch-size``); 0: one forward pass per image.
    dtype
        Autocast dtype of the BatchNorm pass and the evaluation (``None``: fp32; the run's
        ``eval-precision``: :func:`medfed.shared.precision.eval_dtype`).

    Returns
    -------
    callable
        ``(server_round, weights, config) -> (loss, metrics)`` with ``accuracy`` / ``auc``,
        ``balanced-accuracy``, ``sensitivity``, ``specificity``, ``threshold``,
        ``majority-rate``, ``predicted-classes``, ``single-class`` or ``dice``, and
        ``num_examples``.
    """
    torch_device = select_device(device)

    def evaluate_fn(
        server_round: int, weights: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        set_weights(model, weights)
        if bn_data is not None:
            reestimate_bn(model, bn_data, device=torch_device, dtype=dtype)
        metrics = evaluate_at_validation_threshold(
            model, data, val=val, device=torch_device, roi_size=roi_size, dtype=dtype, threshold_rule=threshold_rule
        )
        loss = float(metrics.pop("loss"))
        return loss, dict(metrics)

    return evaluate_fn
