"""Tests for the DP-safe transformer blocks: same outputs as MONAI's, per-image batching."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets.swin_unetr import WindowAttention

from medfed.shared.transformer_blocks import (
    DPUnetResBlock,
    DPWindowAttention,
    make_out_of_place,
)


@pytest.mark.parametrize("window", [(3, 3), (2, 3, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_dp_window_attention_matches_monai(window: tuple[int, ...], masked: bool) -> None:
    torch.manual_seed(0)
    source = WindowAttention(dim=8, num_heads=2, window_size=window, qkv_bias=True)
    with torch.no_grad():
        source.relative_position_bias_table.normal_()  # MONAI starts it near zero
    attention = DPWindowAttention(source)
    batch, windows, n = 2, 4, int(torch.tensor(window).prod())
    x = torch.randn(batch * windows, n, 8)
    mask = torch.randn(windows, n, n) if masked else None
    attention.batch_size = batch
    torch.testing.assert_close(attention(x, mask), source(x, mask))
    assert isinstance(attention.relative_position_bias, torch.nn.Embedding)
    assert torch.equal(attention.relative_position_bias.weight, source.relative_position_bias_table)


def test_dp_window_attention_rejects_a_wrong_batch_size() -> None:
    attention = DPWindowAttention(WindowAttention(dim=8, num_heads=2, window_size=(2, 2)))
    attention.batch_size = 3
    with pytest.raises(RuntimeError, match="3 images"):
        attention(torch.randn(4, 4, 8), None)


def test_out_of_place_res_block_matches_monai() -> None:
    torch.manual_seed(0)
    block = UnetResBlock(2, 4, 6, kernel_size=3, stride=1, norm_name="instance")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = block(x.clone())
    make_out_of_place(block)
    assert type(block) is DPUnetResBlock
    assert not block.lrelu.inplace
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)
