"""DP-safe transformer building blocks: MONAI ViT, UNETR and SwinUNETR made trainable by Opacus.

Opacus computes per-sample gradients layer by layer and assumes that the first dimension of every
layer's input is the batch. MONAI 1.6.1's transformers break Opacus 1.6.0 in five ways, each fixed
here; the Swin, decoder and convolution fixes compute exactly what MONAI computes (tested), the
ViT one changes the architecture slightly (fixed positions, pooled head):

* **Loose parameters.** A parameter owned directly by a module that has children (MONAI ViT's
  ``cls_token``, ``PatchEmbeddingBlock.position_embeddings``) makes Opacus hand the *whole*
  module to functorch. :class:`ViTClassifier` therefore uses fixed sin-cos position embeddings
  (not trainable) and global average pooling over the tokens instead of a class token, so every
  trainable parameter belongs to a ``Conv``, ``Linear`` or ``LayerNorm`` that Opacus supports
  (the model registry gives UNETR's ViT sin-cos embeddings the same way).
* **Windows in the batch dimension.** Swin's window attention folds the windows into the batch
  (``(B * nW, N, C)``), so Opacus would clip per *window* and scale the mean-reduced loss by
  ``B * nW``: wrong gradients and a wrong privacy guarantee. :class:`DPWindowAttention` computes
  the same attention with every ``Linear`` applied to ``(B, nW * N, C)``, and holds the relative
  position bias table as an ``nn.Embedding`` indexed per sample (MONAI keeps it as a loose
  parameter beside a buffer, which Opacus rejects outright).
* **Unused parameters.** MONAI's ``TransformerBlock`` always builds a ``norm_cross_attn``
  LayerNorm (for checkpoint compatibility) that it only calls with cross-attention; it never
  gets a gradient, which Opacus's optimizer rejects. :func:`freeze_unused_cross_attention`
  freezes it (the state dict is unchanged).
* **Non-contiguous convolution inputs.** SwinUNETR feeds its decoder convolutions
  channel-permuted views, for which Opacus 1.6.0's convolution per-sample gradients come out
  wrong without an error; :mod:`medfed.shared.opacus_fixes` (registered by the model registry)
  fixes that for every model.
* **In-place operations.** MONAI's UNETR blocks use in-place LeakyReLU and ``out += residual``;
  Opacus's backward hooks fail on a layer output that is later modified in place.
  :func:`make_out_of_place` switches every residual block to :class:`DPUnetResBlock` and every
  activation to ``inplace=False``.

Attention itself (``einsum``/``matmul`` and softmax) has no parameters, so Opacus needs nothing
for it; MONAI's ``SABlock`` runs its einsum path (``use_flash_attention=False``, the default).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT
from monai.networks.nets.swin_unetr import SwinTransformerBlock, WindowAttention
from torch import nn

__all__ = [
    "ViTClassifier",
    "quiet_meshgrid",
    "DPUnetResBlock",
    "DPWindowAttention",
    "DPSwinTransformerBlock",
    "make_out_of_place",
    "freeze_unused_cross_attention",
    "make_swin_dp_safe",
]


@contextlib.contextmanager
def quiet_meshgrid() -> Iterator[None]:
    """Silence torch's ``meshgrid`` indexing warning, raised by MONAI 1.6.1's sin-cos position
    embeddings (``pos_embed_utils``) at build time; it says nothing about the user's run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")
        yield


class ViTClassifier(nn.Module):
    """MONAI ``ViT`` encoder with a mean-pooled linear head (no class token).

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels, out_channels
        Input channels ``C`` and number of classes ``K``.
    image_size
        Input sides, one per spatial dimension; each must be divisible by the matching
        ``patch_size`` side.
    patch_size
        Patch sides, one per spatial dimension.
    hidden_size, mlp_dim, num_layers, num_heads
        Transformer width, MLP width, depth and attention heads (``hidden_size % num_heads == 0``).

    Notes
    -----
    ``forward`` maps ``(B, C, *image_size)`` to logits ``(B, K)``: patches are embedded by a
    strided convolution, summed with fixed sin-cos position embeddings, passed through
    ``num_layers`` pre-norm transformer blocks and a final ``LayerNorm``, averaged over the tokens
    and projected by a linear head.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        image_size: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
    ) -> None:
        super().__init__()
        with quiet_meshgrid():
            self.vit = ViT(
                in_channels=in_channels,
                img_size=tuple(image_size),
                patch_size=tuple(patch_size),
                hidden_size=hidden_size,
                mlp_dim=mlp_dim,
                num_layers=num_layers,
                num_heads=num_heads,
                pos_embed_type="sincos",
                classification=False,
                spatial_dims=spatial_dims,
                qkv_bias=True,
            )
        freeze_unused_cross_attention(self.vit)
        self.head = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` for images ``(B, C, *spatial)``."""
        tokens, _ = self.vit(x)  # (B, T, hidden_size), already layer-normed
        return self.head(tokens.mean(dim=1))


def freeze_unused_cross_attention(model: nn.Module) -> nn.Module:
    """Freeze (in place) the ``norm_cross_attn`` of every MONAI ``TransformerBlock`` of ``model``
    built without cross-attention (the block never calls it); return ``model``."""
    for module in model.modules():
        if isinstance(module, TransformerBlock) and not module.with_cross_attention:
            module.norm_cross_attn.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- in-place ops
class DPUnetResBlock(UnetResBlock):
    """MONAI ``UnetResBlock`` whose residual is added out of place.

    Notes
    -----
    ``forward`` maps ``(B, C_in, *spatial)`` to ``(B, C_out, *spatial / stride)``, as MONAI's.
    """

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """Two convolutions with norm and LeakyReLU, plus the (projected) input."""
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.norm2(self.conv2(out))
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        return self.lrelu(out + residual)


def make_out_of_place(model: nn.Module) -> nn.Module:
    """Remove in-place operations from ``model`` (in place) and return it.

    Every ``UnetResBlock`` becomes a :class:`DPUnetResBlock` (same parameters and state dict)
    and every module with an ``inplace`` flag (activations, dropout) gets ``inplace=False``.
    """
    for module in model.modules():
        if type(module) is UnetResBlock:
            module.__class__ = DPUnetResBlock
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


# --------------------------------------------------------------------------- Swin
class DPWindowAttention(nn.Module):
    """Swin window attention with relative position bias, computed batch-first for Opacus.

    Same computation as MONAI's ``WindowAttention`` (``use_flash_attention=False`` path), but
    ``qkv`` and ``proj`` see ``(B, nW * N, C)`` and the bias table is an ``nn.Embedding`` looked
    up with a ``(B, N * N)`` index, so Opacus's per-sample gradients are per image.

    Parameters
    ----------
    source
        The MONAI module whose weights (and relative position index) are copied.

    Notes
    -----
    ``forward(x, mask)`` maps windows ``(B * nW, N, C)`` to ``(B * nW, N, C)``; the number of
    images ``B`` is set by the owning :class:`DPSwinTransformerBlock` in ``batch_size`` before
    each call; ``mask`` is ``(nW, N, N)`` (shifted windows) or ``None``.
    """

    def __init__(self, source: WindowAttention) -> None:
        super().__init__()
        self.dim = source.dim
        self.window_size = source.window_size
        self.num_heads = source.num_heads
        self.scale = source.scale
        table = source.relative_position_bias_table.detach()
        self.relative_position_bias = nn.Embedding(table.shape[0], table.shape[1])
        with torch.no_grad():
            self.relative_position_bias.weight.copy_(table)
        self.register_buffer("relative_position_index", source.relative_position_index.clone())
        self.qkv = source.qkv
        self.attn_drop = source.attn_drop
        self.proj = source.proj
        self.proj_drop = source.proj_drop
        self.batch_size = 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention within each window; see the class notes for shapes."""
        bw, n, c = x.shape
        b = self.batch_size
        if bw % b:
            raise RuntimeError(f"{bw} windows cannot come from a batch of {b} images.")
        nw, h = bw // b, self.num_heads
        qkv = self.qkv(x.reshape(b, nw * n, c))  # (B, nW * N, 3C)
        qkv = qkv.reshape(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # (B, nW, h, N, d)
        attn = q @ k.transpose(-2, -1)  # (B, nW, h, N, N)
        index = self.relative_position_index[:n, :n].reshape(1, n * n).expand(b, n * n)
        bias = self.relative_position_bias(index)  # (B, N * N, h)
        attn = attn + bias.permute(0, 2, 1).reshape(b, 1, h, n, n)
        if mask is not None:
            attn = attn + mask.to(attn.dtype).reshape(1, nw, 1, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1)).to(v.dtype)
        out = (attn @ v).permute(0, 1, 3, 2, 4).reshape(b, nw * n, c)
        return self.proj_drop(self.proj(out)).reshape(bw, n, c)


class DPSwinTransformerBlock(SwinTransformerBlock):
    """MONAI ``SwinTransformerBlock`` that tells its :class:`DPWindowAttention` the batch size.

    Notes
    -----
    ``forward(x, mask_matrix)`` maps ``(B, *spatial, C)`` to the same shape, as MONAI's.
    """

    def forward(self, x: torch.Tensor, mask_matrix: torch.Tensor | None) -> torch.Tensor:
        """MONAI's block, after recording ``B = x.shape[0]`` for the window attention."""
        self.attn.batch_size = x.shape[0]
        return super().forward(x, mask_matrix)


def make_swin_dp_safe(model: nn.Module) -> nn.Module:
    """Switch every Swin block of ``model`` (in place) to :class:`DPSwinTransformerBlock` with
    :class:`DPWindowAttention`; return ``model``."""
    for module in list(model.modules()):
        if type(module) is SwinTransformerBlock:
            if module.use_checkpoint:
                raise ValueError("Gradient checkpointing is not supported with the DP-safe Swin block.")
            module.__class__ = DPSwinTransformerBlock
            module.attn = DPWindowAttention(module.attn)
    return model
