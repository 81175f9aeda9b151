"""Opacus 1.6.0 per-sample gradients: a fix for convolutions, a grad sampler for transposed ones.

Importing this module registers both with Opacus; ``medfed.shared.models`` has it imported whenever
Opacus loads (:mod:`medfed.shared.opacus_registration`).

Convolutions fed non-contiguous inputs
    Opacus computes a convolution's per-sample weight gradient from the layer's input unfolded
    by ``opacus.utils.tensor_utils.unfold2d`` / ``unfold3d``, which call ``as_strided`` with
    strides computed as if the (padded) input were in standard contiguous layout. A
    channel-permuted view (for example ``x.permute(0, 3, 1, 2)`` of a channels-last tensor, as
    MONAI's SwinUNETR feeds its decoder) has other strides, and ``F.pad`` keeps that layout, so
    the unfolded patches are wrong and so are the clipped, noised DP-SGD updates, with no error
    raised. ``.contiguous()`` is not enough: a tensor whose spatial sides are 1 counts as
    contiguous whatever its strides. :func:`conv_grad_sample` re-registers Opacus's own
    convolution grad sampler for ``Conv1d``/``Conv2d``/``Conv3d`` behind a step that copies such
    inputs to standard strides first. Inputs that already have standard strides are passed
    through untouched, so the result is bit-identical to Opacus's for every other model.

Transposed convolutions
    Opacus has no grad sampler for ``ConvTranspose2d``/``ConvTranspose3d`` (UNETR's and
    SwinUNETR's upsampling layers) and falls back to functorch, which recomputes the layer per
    sample. :func:`conv_transpose_grad_sample` computes the same gradients in closed form: the
    weight gradient of a transposed convolution pairs each input position with the output
    gradient's patch that position wrote to, i.e. the output gradient unfolded with the layer's
    kernel, stride, padding and dilation.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d, unfold3d
from torch import nn

__all__ = ["standard_strides", "conv_grad_sample", "conv_transpose_grad_sample"]


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


@register_grad_sampler([nn.ConvTranspose2d, nn.ConvTranspose3d])
def conv_transpose_grad_sample(
    layer: nn.ConvTranspose2d | nn.ConvTranspose3d,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a transposed convolution.

    Parameters
    ----------
    layer
        The transposed convolution (any stride, padding, output padding, dilation, groups).
    activations
        Its inputs; ``activations[0]`` is ``(B, C_in, *spatial_in)``.
    backprops
        Gradient of the loss with respect to its output, ``(B, C_out, *spatial_out)``.

    Returns
    -------
    dict
        ``{weight: (B, C_in, C_out / groups, *kernel), bias: (B, C_out)}`` (bias only if it is
        trainable).
    """
    x = activations[0].to(backprops.dtype)
    n, groups = x.shape[0], layer.groups
    unfold = unfold2d if isinstance(layer, nn.ConvTranspose2d) else unfold3d
    patches = unfold(
        standard_strides(backprops),
        kernel_size=layer.kernel_size,
        padding=layer.padding,
        stride=layer.stride,
        dilation=layer.dilation,
    )  # (B, C_out * K, L): the output gradient each input position wrote to
    positions = x[0, 0].numel()
    if patches.shape[-1] != positions:
        raise RuntimeError(f"transposed convolution: {patches.shape[-1]} output patches for {positions} input positions")
    kernel = int(torch.tensor(layer.kernel_size).prod())
    x = x.reshape(n, groups, layer.in_channels // groups, positions)
    patches = patches.reshape(n, groups, layer.out_channels // groups, kernel, positions)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        grad = torch.einsum("bgcl,bgokl->bgcok", x, patches)
        ret[layer.weight] = grad.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return ret
