"""Opacus's convolution per-sample gradients with channel-permuted (non-contiguous) inputs."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from medfed.shared.opacus_fixes import conv_grad_sample, conv_transpose_grad_sample, standard_strides


def _permuted(shape: tuple[int, ...]) -> torch.Tensor:
    """A ``(B, C, *spatial)`` view of a channels-last tensor (as SwinUNETR's hidden states)."""
    b, c, *spatial = shape
    dims = len(spatial)
    return torch.rand(b, *spatial, c).permute(0, dims + 1, *range(1, dims + 1))


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(4, 3, 3, padding=1), (3, 4, 6, 5)),
        (nn.Conv2d(4, 3, 3, padding=1), (3, 4, 1, 1)),  # counts as contiguous, strides still odd
        (nn.Conv3d(4, 3, 3, padding=1), (3, 4, 4, 3, 5)),
        (nn.Conv2d(4, 6, 2, stride=2, groups=2), (3, 4, 6, 6)),
    ],
)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_conv_per_sample_gradients_of_permuted_inputs(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = _permuted(shape)
    assert x.stride() != standard_strides(x).stride()
    wrapped = GradSampleModule(conv, loss_reduction="sum")
    assert wrapped.GRAD_SAMPLERS[type(conv)] is conv_grad_sample
    wrapped(x).square().sum().backward()
    per_sample = conv.weight.grad_sample.detach().clone()
    wrapped._close()
    for i in range(shape[0]):
        conv.zero_grad()
        conv(x[i : i + 1]).square().sum().backward()
        torch.testing.assert_close(per_sample[i], conv.weight.grad)


def test_opacus_alone_gets_permuted_inputs_wrong() -> None:
    """Why the fix exists: Opacus 1.6.0's own sampler, fed the permuted view, is wrong."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    x = _permuted((2, 4, 6, 5))
    backprops = torch.rand(2, 3, 6, 5)
    fixed = compute_conv_grad_sample(conv, [x.contiguous()], backprops)[conv.weight]
    assert torch.allclose(conv_grad_sample(conv, [x], backprops)[conv.weight], fixed)
    assert not torch.allclose(compute_conv_grad_sample(conv, [x], backprops)[conv.weight], fixed)


def test_standard_strides_passes_standard_tensors_through() -> None:
    x = torch.rand(2, 3, 4)
    assert standard_strides(x) is x
    y = x.transpose(1, 2)
    assert standard_strides(y).stride() == (12, 3, 1)
    assert torch.equal(standard_strides(y), y)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.ConvTranspose2d(4, 3, 2, stride=2), (3, 4, 3, 5)),  # UNETR / SwinUNETR upsampling
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 4, 3)),
        (nn.ConvTranspose2d(4, 3, 3, stride=1, padding=2, dilation=2, bias=False), (3, 4, 5, 5)),
        (nn.ConvTranspose3d(4, 3, 2, stride=2), (3, 4, 2, 3, 2)),
        (nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1), (3, 2, 3, 2, 3)),
    ],
)
def test_conv_transpose_per_sample_gradients(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.rand(shape)
    wrapped = GradSampleModule(conv, loss_reduction="sum")
    assert wrapped.GRAD_SAMPLERS[type(conv)] is conv_transpose_grad_sample
    wrapped(x).square().sum().backward()
    params = [p for p in conv.parameters()]
    per_sample = [p.grad_sample.detach().clone() for p in params]
    wrapped._close()
    for i in range(shape[0]):
        conv.zero_grad()
        conv(x[i : i + 1]).square().sum().backward()
        for p, sample in zip(params, per_sample, strict=True):
            assert sample.shape == (shape[0], *p.shape)
            torch.testing.assert_close(sample[i], p.grad)
