"""Fix for Opacus 1.6.0's per-sample gradients of convolutions fed non-contiguous inputs.

Opacus computes a convolution's per-sample weight gradient from the layer's input unfolded by
``opacus.utils.tensor_utils.unfold2d`` / ``unfold3d``, which call ``as_strided`` with strides
computed as if the (padded) input were in standard contiguous layout. A channel-permuted view
(for example ``x.permute(0, 3, 1, 2)`` of a channels-last tensor, as MONAI's SwinUNETR feeds its
decoder) has other strides, and ``F.pad`` keeps that layout, so the unfolded patches are wrong
and so are the clipped, noised DP-SGD updates, with no error raised. ``.contiguous()`` is not
enough: a tensor whose spatial sides are 1 counts as contiguous whatever its strides.

Importing this module (``medfed.shared.models`` does) re-registers Opacus's own convolution grad
sampler for ``Conv1d``/``Conv2d``/``Conv3d`` behind a step that copies such inputs to standard
strides first. Inputs that already have standard strides are passed through untouched, so the
result is bit-identical to Opacus's for every other model.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn

__all__ = ["standard_strides", "conv_grad_sample"]


def standard_strides(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if its strides are the row-major ones for its shape, else a row-major copy."""
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) == tensor.stride():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def conv_grad_sample(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus's ``compute_conv_grad_sample`` on inputs copied to standard strides.

    Parameters
    ----------
    layer
        The convolution.
    activations
        Its inputs; ``activations[0]`` is ``(B, C_in, *spatial)``.
    backprops
        Gradient of the loss with respect to its output, ``(B, C_out, *spatial_out)``.

    Returns
    -------
    dict
        ``{weight: (B, *weight.shape), bias: (B, C_out)}`` (bias only if it is trainable).
    """
    return compute_conv_grad_sample(layer, [standard_strides(a) for a in activations], backprops)
