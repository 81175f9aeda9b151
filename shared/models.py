"""Model registry: MONAI networks (and one small CNN) built so that Opacus DP-SGD can train them.

Every network is built by name through :func:`build_model`; :data:`MODELS` lists the names.
Classification models return logits of shape ``(B, out_channels)``; segmentation models return
logits of shape ``(B, out_channels, *spatial)``. Inputs are ``(B, in_channels, *spatial)`` with
``spatial`` of length ``spatial_dims`` (2 or 3).

Normalisation (``norm``)
    ``"batch"`` keeps BatchNorm (trains best without differential privacy, but Opacus rejects
    it: BatchNorm mixes samples, so per-sample gradients do not exist). ``"group"``
    (:data:`DP_NORM`, the DP default for every model) uses ``GroupNorm`` with the largest group
    count ``<= 8`` that divides each layer's channel count. ``"instance"`` uses *affine*
    ``InstanceNorm`` (so the layers keep learnable parameters); Opacus accepts it as well.

Decisions worth knowing
    * ``densenet121`` pools its input by 32. Any input side below 64 (2D) or 32 (3D) is
      bilinearly / trilinearly upsampled to that size inside the model (no parameters, so Opacus
      is unaffected), so MedMNIST's 28x28 and 28^3 images work. 3D uses 32 rather than 64
      because a 64^3 DenseNet-121 step is about 5x slower on CPU; with ``norm="instance"`` the
      minimum is 64 in 3D too (instance norm needs more than one voxel in the last block).
    * ``resnet18`` / ``resnet34`` are MONAI ``ResNet`` with a DP-safe basic block: the block's
      norm follows ``norm`` (MONAI 1.6.1 only passes ``norm`` to the stem, so its blocks and
      shortcut projections would stay BatchNorm), the residual is added out of place and ReLU
      is not in place (in-place ops break Opacus's backward hooks). Inputs of at most 64 per side
      get the MedMNIST-style stem (3x3 convolution, stride 1, no max pool); larger or unknown
      sizes get the standard ImageNet stem (7x7, stride 2, max pool).
    * ``unet`` downsamples four times by 2, so every side must be divisible by 16.
    * ``vit``, ``unetr`` and ``swinunetr`` are MONAI transformers made DP-safe in
      :mod:`medfed.shared.transformer_blocks` (fixed sin-cos position embeddings, mean-pooled
      head instead of a class token, Swin window attention computed per image, no in-place
      ops); their per-sample gradients are tested to equal single-image gradients. ``vit``
      has LayerNorm only, so ``norm`` changes nothing; in ``unetr`` / ``swinunetr`` it selects
      the convolutional decoder's norm. ``vit`` and ``unetr`` need the image size (position
      embeddings); ``vit`` picks the patch size from it (:func:`vit_patch_size`); ``unetr``
      needs sides divisible by 16 and ``swinunetr`` by 32. docs/models.md has the choices.
    * Importing this module registers :mod:`medfed.shared.opacus_fixes`: correct convolution
      per-sample gradients for non-contiguous inputs and a closed-form grad sampler for
      transposed convolutions (Opacus 1.6.0 falls back to slow functorch for them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import UNETR, SwinUNETR, UNet
from monai.networks.nets.densenet import DenseNet121
from monai.networks.nets.resnet import ResNet, ResNetBlock
from torch import nn

from medfed.shared.config import NORMS, Task
from medfed.shared.opacus_registration import register_fixes_when_opacus_loads
from medfed.shared.transformer_blocks import (
    ViTClassifier,
    freeze_unused_cross_attention,
    make_out_of_place,
    make_swin_dp_safe,
    quiet_meshgrid,
)

__all__ = [
    "MODELS",
    "NORMS",
    "check_model_name",
    "DP_NORM",
    "ModelSpec",
    "build_model",
    "model_task",
    "validate_for_dp",
    "count_parameters",
    "vit_patch_size",
]

logger = logging.getLogger(__name__)

# Opacus computes the per-sample gradients of medfed's models with medfed's fixed grad samplers
# whenever it is used on them: registered now if Opacus is loaded, else as soon as it loads.
register_fixes_when_opacus_loads()


DP_NORM: str = "group"
"""The normalisation to use with DP-SGD (Opacus); valid for every registered model."""

MAX_GROUPS: int = 8
"""Upper bound on the number of groups of each ``GroupNorm`` layer."""

ImageSize = tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Parameters
    ----------
    name
        Registry key.
    task
        ``"classification"`` (logits ``(B, out_channels)``) or ``"segmentation"`` (logits
        ``(B, out_channels, *spatial)``).
    builder
        ``builder(*, spatial_dims, in_channels, out_channels, norm, image_size) -> nn.Module``;
        ``image_size`` arrives normalised to a tuple of ``spatial_dims`` ints, or ``None`` when
        unknown. Arguments are already validated by :func:`build_model`.
    description
        One line for listings and error messages.
    notes
        Measured facts for ``medfed models`` (parameters, CPU speed, DP-SGD), or empty. Speeds
        come from ``python -m medfed.simulations.bench.model_speed`` (CPU time, one thread).
    head, last_block
        Module names (prefixes of parameter names, as ``"fc"`` covers ``fc.weight``) of the
        model's head (the classifier) and of its last feature block, for the ``trainable``
        fine-tuning modes (:mod:`medfed.shared.trainable`); empty: not defined for this model.
        ``head[-1]`` is the final ``nn.Linear`` over the pooled features (pretraining's
        backbone output is its input, :func:`medfed.shared.pretrain.backbone_features`).
    """

    name: str
    task: Task
    builder: Callable[..., nn.Module]
    description: str
    notes: str = ""
    head: tuple[str, ...] = ()
    last_block: tuple[str, ...] = ()


# --------------------------------------------------------------------------- norm helpers
def _num_groups(channels: int) -> int:
    """Largest group count ``<= MAX_GROUPS`` dividing ``channels``."""
    return next(g for g in range(min(MAX_GROUPS, channels), 0, -1) if channels % g == 0)


def _monai_norm(norm: str, channels: int) -> str | tuple[str, dict[str, Any]]:
    """MONAI norm argument for a layer with ``channels`` channels."""
    if norm == "batch":
        return "batch"
    if norm == "group":
        return ("group", {"num_groups": _num_groups(channels)})
    return ("instance", {"affine": True})


def _make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer for ``(B, channels, *spatial)`` tensors."""
    return get_norm_layer(
        name=_monai_norm(norm, channels), spatial_dims=spatial_dims, channels=channels
    )


def _instance_to_group(module: nn.Module) -> nn.Module:
    """Replace every ``InstanceNorm{1,2,3}d`` in ``module`` (in place) with an affine ``GroupNorm``.

    Used for networks (MONAI ``UNet``) that take one norm argument for all layers, where a fixed
    group count cannot divide every channel count (the last layer has ``out_channels``).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm):
            channels = child.num_features
            setattr(module, name, nn.GroupNorm(_num_groups(channels), channels, eps=child.eps))
        else:
            _instance_to_group(child)
    return module


_RELU: tuple[str, dict[str, Any]] = ("relu", {"inplace": False})


# --------------------------------------------------------------------------- simplecnn
class SimpleCNN(nn.Module):
    """Three convolution blocks, global average pooling and a linear head.

    Small and fast (about 24k parameters for one input channel); meant for tests, quick demos
    and membership-inference experiments. Works for any input side ``>= 1``.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels, out_channels
        Input channels ``C`` and number of classes ``K``.
    norm
        ``"batch"``, ``"group"`` or ``"instance"``.
    width
        Channels of the first block (doubled in each later block).

    Notes
    -----
    ``forward`` maps ``(B, C, *spatial)`` to logits ``(B, K)``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str = "batch",
        width: int = 16,
    ) -> None:
        super().__init__()
        conv: type[nn.Module] = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool: type[nn.Module] = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        avg: type[nn.Module] = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        previous = in_channels
        for i, channels in enumerate(widths):
            layers += [
                conv(previous, channels, kernel_size=3, padding=1, bias=False),
                _make_norm(norm, spatial_dims, channels),
                nn.ReLU(inplace=False),
            ]
            if i < len(widths) - 1:
                layers.append(pool(kernel_size=2, ceil_mode=True))
            previous = channels
        layers += [avg(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, *spatial)`` to logits ``(B, K)``."""
        return self.head(self.features(x))


def _build_simplecnn(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    image_size: ImageSize | None,
) -> nn.Module:
    return SimpleCNN(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, norm=norm
    )


# --------------------------------------------------------------------------- densenet121
DENSENET_MIN_SIDE: dict[int, int] = {2: 64, 3: 32}
"""Sides below this are upsampled before DenseNet-121 (it pools by 32).

3D uses 32 (the last dense block then sees 1 voxel) because 64^3 costs about 5x more per step on
CPU (measured: 0.2 s vs 1.0 s non-private, 0.8 s vs 3.4 s DP-SGD, batch 4, 2 cores).
"""

DENSENET_MIN_SIDE_INSTANCE: int = 64
"""Minimum side with ``norm="instance"`` in 2D and 3D: instance norm needs more than one
spatial element, so the last dense block must see at least 2 per side."""


class MinSizeDenseNet121(DenseNet121):
    """MONAI ``DenseNet121`` that first upsamples inputs smaller than ``min_side`` per side.

    The state dict is identical to MONAI's ``DenseNet121`` (no wrapper prefix). Upsampling is
    bilinear (2D) or trilinear (3D) and has no parameters, so Opacus is unaffected.

    Notes
    -----
    ``forward`` maps ``(B, C, *spatial)`` to logits ``(B, K)``; each side ``s`` is resized to
    ``max(s, min_side)`` first.
    """

    def __init__(self, *, min_side: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_side = min_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` for images ``(B, C, *spatial)``."""
        spatial = tuple(x.shape[2:])
        if min(spatial) < self.min_side:
            size = tuple(max(s, self.min_side) for s in spatial)
            mode = "bilinear" if len(spatial) == 2 else "trilinear"
            x = F.interpolate(x, size=size, mode=mode, align_corners=False)
        return super().forward(x)


def _build_densenet121(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    image_size: ImageSize | None,
) -> nn.Module:
    min_side = DENSENET_MIN_SIDE_INSTANCE if norm == "instance" else DENSENET_MIN_SIDE[spatial_dims]
    if image_size is not None and min(image_size) < min_side:
        logger.info(
            "densenet121: inputs of size %s are upsampled to at least %d per side in the model.",
            image_size,
            min_side,
        )
    # Every DenseNet-121 norm layer has a multiple of 32 channels, so one group count fits all.
    return MinSizeDenseNet121(
        min_side=min_side,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        act=_RELU,
        norm=_monai_norm(norm, 32),
    )


# --------------------------------------------------------------------------- resnet
class DPResNetBlock(ResNetBlock):
    """MONAI ``ResNetBlock`` that Opacus can train.

    Differences from MONAI's block: the normalisation comes from the class attribute ``norm``
    (MONAI's ``ResNet`` always passes ``"batch"`` to its blocks and shortcut projections; both
    are replaced here), ReLU is not in place, and the residual is added out of place. Use
    :meth:`with_norm` to get a subclass for one normalisation.

    Notes
    -----
    ``forward`` maps ``(B, in_planes, *spatial)`` to ``(B, planes, *spatial / stride)``.
    """

    norm: str = "batch"

    @staticmethod
    def with_norm(norm: str) -> type[DPResNetBlock]:
        """The subclass whose layers use ``norm`` (``"batch"``, ``"group"`` or ``"instance"``)."""
        return _RESNET_BLOCKS[norm]

    def __init__(
        self,
        in_planes: int,
        planes: int,
        spatial_dims: int = 3,
        stride: int = 1,
        downsample: nn.Module | Callable[..., torch.Tensor] | None = None,
        act: str | tuple = _RELU,
        norm: str | tuple = "batch",
    ) -> None:
        del act, norm  # ignored: MONAI's ResNet passes its own (BatchNorm, in-place ReLU)
        if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
            channels = downsample[0].out_channels
            downsample[1] = _make_norm(type(self).norm, spatial_dims, channels)
        super().__init__(
            in_planes=in_planes,
            planes=planes,
            spatial_dims=spatial_dims,
            stride=stride,
            downsample=downsample,
            act=_RELU,
            norm=_monai_norm(type(self).norm, planes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block without in-place operations."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.act(out + residual)


class DPResNetBlockBatch(DPResNetBlock):
    """:class:`DPResNetBlock` with BatchNorm."""

    norm = "batch"


class DPResNetBlockGroup(DPResNetBlock):
    """:class:`DPResNetBlock` with GroupNorm."""

    norm = "group"


class DPResNetBlockInstance(DPResNetBlock):
    """:class:`DPResNetBlock` with affine InstanceNorm."""

    norm = "instance"


# Module-level classes (not ``type(...)`` at build time) so that whole models can be pickled.
_RESNET_BLOCKS: dict[str, type[DPResNetBlock]] = {
    "batch": DPResNetBlockBatch,
    "group": DPResNetBlockGroup,
    "instance": DPResNetBlockInstance,
}


RESNET_SMALL_STEM_MAX_SIDE: int = 64
"""Inputs with every side ``<=`` this get the 3x3, stride-1, no-max-pool stem."""


def _resnet_builder(layers: Sequence[int]) -> Callable[..., nn.Module]:
    def build(
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str,
        image_size: ImageSize | None,
    ) -> nn.Module:
        small = image_size is not None and max(image_size) <= RESNET_SMALL_STEM_MAX_SIDE
        if image_size is None:
            logger.info("resnet: image_size unknown; using the standard 7x7 stride-2 stem.")
        return ResNet(
            block=DPResNetBlock.with_norm(norm),
            layers=list(layers),
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=3 if small else 7,
            conv1_t_stride=1 if small else 2,
            no_max_pool=small,
            num_classes=out_channels,
            bias_downsample=False,
            act=_RELU,
            norm=_monai_norm(norm, 64),
        )

    return build


# --------------------------------------------------------------------------- unet
UNET_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)
UNET_STRIDES: tuple[int, ...] = (2, 2, 2, 2)
UNET_DIVISOR: int = 16


def _build_unet(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    image_size: ImageSize | None,
) -> nn.Module:
    if image_size is not None and any(s % UNET_DIVISOR for s in image_size):
        raise ValueError(
            f"unet downsamples {len(UNET_STRIDES)} times by 2, so every image side must be "
            f"divisible by {UNET_DIVISOR}; the images are {image_size}. Set image-size to a multiple of "
            f"{UNET_DIVISOR} (--image-size {-(-max(image_size) // UNET_DIVISOR) * UNET_DIVISOR}), or resize or pad the "
            f"images (for example to {tuple(-(-s // UNET_DIVISOR) * UNET_DIVISOR for s in image_size)})."
        )
    # MONAI's UNet takes one norm for all layers, and its last layer has out_channels channels,
    # which a fixed group count may not divide: build with affine instance norm and swap.
    model = UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=UNET_CHANNELS,
        strides=UNET_STRIDES,
        num_res_units=2,
        norm=_monai_norm("instance", 1) if norm == "group" else _monai_norm(norm, 1),
    )
    return _instance_to_group(model) if norm == "group" else model


# --------------------------------------------------------------------------- transformers
VIT_HIDDEN_SIZE: int = 192
VIT_MLP_DIM: int = 768
VIT_NUM_LAYERS: int = 6
VIT_NUM_HEADS: int = 3
VIT_MAX_GRID: dict[int, int] = {2: 8, 3: 4}
"""Most patches per side: at most 64 tokens in 2D (8 x 8) and in 3D (4 x 4 x 4)."""


def _needs_image_size(name: str, image_size: ImageSize | None, example: int) -> ImageSize:
    if image_size is None:
        raise ValueError(
            f"{name} needs the image size to build its position embeddings, but it is unknown. "
            f"Set image-size (--image-size {example}, or --set image-size={example}) or pass "
            f"build_model(..., image_size={example})."
        )
    return image_size


def vit_patch_size(image_size: ImageSize) -> ImageSize:
    """Patch sides for :func:`build_model` ``("vit", ...)``: per side, the smallest divisor ``p``
    with ``side / p <= VIT_MAX_GRID[spatial_dims]`` (28 -> 4 in 2D, 7 in 3D; 64 -> 8 / 16).

    Raises
    ------
    ValueError
        A side (a prime such as 29) that only a single patch divides evenly.
    """
    grid = VIT_MAX_GRID[len(image_size)]
    patches = tuple(next(p for p in range(1, side + 1) if side % p == 0 and side // p <= grid) for side in image_size)
    bad = [side for side, p in zip(image_size, patches) if side > grid and side == p]
    if bad:
        good = tuple(max(grid, side - side % grid) for side in image_size)
        raise ValueError(
            f"vit cuts each image side into 2-{grid} patches of equal size, but side(s) {bad} of the "
            f"images {image_size} have no such divisor. Set image-size to a multiple of {grid} "
            f"(--image-size {good[0]}), or resize the images (for example to {good})."
        )
    return patches


def _build_vit(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    image_size: ImageSize | None,
) -> nn.Module:
    # ``norm`` does not apply: the ViT has LayerNorm only (no BatchNorm), which Opacus supports.
    sizes = _needs_image_size("vit", image_size, 28)
    return ViTClassifier(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        image_size=sizes,
        patch_size=vit_patch_size(sizes),
        hidden_size=VIT_HIDDEN_SIZE,
        mlp_dim=VIT_MLP_DIM,
        num_layers=VIT_NUM_LAYERS,
        num_heads=VIT_NUM_HEADS,
    )


UNETR_DIVISOR: int = 16
"""UNETR's patch side (fixed by MONAI); every image side must be a multiple."""
UNETR_FEATURE_SIZE: int = 16
UNETR_HIDDEN_SIZE: int = 192
UNETR_MLP_DIM: int = 768
UNETR_NUM_HEADS: int = 3


def _check_divisible(name: str, image_size: ImageSize, divisor: int, why: str) -> None:
    if any(s % divisor for s in image_size):
        rounded = tuple(-(-s // divisor) * divisor for s in image_size)
        raise ValueError(
            f"{name} {why}, so every image side must be divisible by {divisor}; the images are "
            f"{image_size}. Set image-size to a multiple of {divisor} (--image-size {max(rounded)}), "
            f"or resize or pad the images (for example to {rounded})."
        )


def _build_unetr(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    image_size: ImageSize | None,
) -> nn.Module:
    sizes = _needs_image_size("unetr", image_size, 32)
    _check_divisible("unetr", sizes, UNETR_DIVISOR, f"cuts the images into {UNETR_DIVISOR}-pixel patches")
    model = UNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=sizes,
        feature_size=UNETR_FEATURE_SIZE,
        hidden_size=UNETR_HIDDEN_SIZE,
        mlp_dim=UNETR_MLP_DIM,
        num_heads=UNETR_NUM_HEADS,
        norm_name=_monai_norm(norm, UNETR_FEATURE_SIZE),  # decoder channels: multiples of 16
        res_block=True,
        spatial_dims=spatial_dims,
        qkv_bias=True,
    )
    # Learnable position embeddings are a loose parameter Opacus cannot handle; use sin-cos.
    embedding = model.vit.patch_embedding
    grid = [s // UNETR_DIVISOR for s in sizes]
    with quiet_meshgrid():
        embedding.position_embeddings = build_sincos_position_embedding(grid, UNETR_HIDDEN_SIZE, spatial_dims)
    return make_out_of_place(freeze_unused_cross_attention(model))


SWINUNETR_DIVISOR: int = 32
"""SwinUNETR halves the resolution five times (patch 2, then 4 patch mergings)."""
SWINUNETR_FEATURE_SIZE: int = 12
SWINUNETR_NUM_HEADS: tuple[int, ...] = (1, 2, 4, 8)
SWINUNETR_WINDOW: int = 4
SWINUNETR_MIN_SIDE_INSTANCE: int = 64
"""Minimum side with ``norm="instance"``: the 1/32 bottleneck needs more than one pixel."""


def _build_swinunetr(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    image_size: ImageSize | None,
) -> nn.Module:
    if image_size is not None:
        _check_divisible("swinunetr", image_size, SWINUNETR_DIVISOR, "halves the resolution 5 times")
        if norm == "instance" and min(image_size) < SWINUNETR_MIN_SIDE_INSTANCE:
            raise ValueError(
                f"swinunetr with norm = 'instance' needs every image side >= {SWINUNETR_MIN_SIDE_INSTANCE} "
                f"(instance norm needs more than one pixel at the 1/32 bottleneck); the images are "
                f"{image_size}. Use --norm group (--set norm=group), or --image-size {SWINUNETR_MIN_SIDE_INSTANCE}."
            )
    model = SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=SWINUNETR_FEATURE_SIZE,
        depths=(2, 2, 2, 2),
        num_heads=SWINUNETR_NUM_HEADS,
        window_size=SWINUNETR_WINDOW,
        norm_name=_monai_norm(norm, SWINUNETR_FEATURE_SIZE),  # decoder channels: multiples of 12
        spatial_dims=spatial_dims,
    )
    return make_swin_dp_safe(make_out_of_place(model))


# --------------------------------------------------------------------------- registry
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "simplecnn",
            "classification",
            _build_simplecnn,
            "3-block CNN (16/32/64 channels), ~24k parameters; fast, for tests and demos.",
            head=("head",),
            last_block=("features.8", "features.9"),  # the third convolution and its norm
        ),
        ModelSpec(
            "densenet121",
            "classification",
            _build_densenet121,
            "MONAI DenseNet-121; upsamples sides < 64 (2D) / < 32 (3D).",
            head=("class_layers.out",),
            last_block=("features.denseblock4", "features.norm5"),
        ),
        ModelSpec(
            "resnet18",
            "classification",
            _resnet_builder((2, 2, 2, 2)),
            "MONAI ResNet-18 with a DP-safe block; small-image stem for sides <= 64.",
            head=("fc",),
            last_block=("layer4",),
        ),
        ModelSpec(
            "resnet34",
            "classification",
            _resnet_builder((3, 4, 6, 3)),
            "MONAI ResNet-34 with a DP-safe block; small-image stem for sides <= 64.",
            head=("fc",),
            last_block=("layer4",),
        ),
        ModelSpec(
            "unet",
            "segmentation",
            _build_unet,
            "MONAI UNet, channels 16-256, 2 residual units; sides must be divisible by 16.",
        ),
        ModelSpec(
            "vit",
            "classification",
            _build_vit,
            "MONAI ViT, 6 layers, hidden 192, 3 heads, sin-cos positions, mean-pooled head; "
            "<= 8 patches per side (2D), <= 4 (3D).",
            "2.7M params. Per CPU core, batch 16: 2D 28 px 84 img/s (DP-SGD 34); 3D 28^3 67 img/s "
            "(DP-SGD 30). DP-SGD: yes (LayerNorm only).",
            head=("head",),
            last_block=(f"vit.blocks.{VIT_NUM_LAYERS - 1}", "vit.norm"),
        ),
        ModelSpec(
            "unetr",
            "segmentation",
            _build_unetr,
            "MONAI UNETR, 12 layers, hidden 192, 16-pixel patches, decoder features 16; "
            "sides divisible by 16.",
            "6.5M params (2D), 9.0M (3D). Per CPU core, batch 16: 2D 32 px 100 img/s (DP-SGD 22); "
            "3D 32^3 5.2 img/s (DP-SGD 1.4). DP-SGD: yes, --norm group or instance.",
        ),
        ModelSpec(
            "swinunetr",
            "segmentation",
            _build_swinunetr,
            "MONAI SwinUNETR (v1), features 12, window 4, DP-safe window attention; "
            "sides divisible by 32.",
            "1.6M params (2D), 3.9M (3D). Per CPU core, batch 16: 2D 32 px 155 img/s (DP-SGD 56); "
            "3D 32^3 6.6 img/s (DP-SGD 2.1). DP-SGD: yes, --norm group (instance: sides >= 64).",
        ),
        ModelSpec(
            "retinanet",
            "detection",
            lambda **kw: __import__("medfed.shared.detection", fromlist=["build_retinanet"]).build_retinanet(**kw),
            "MONAI RetinaNet, 2D: small ResNet-FPN (strides 8-32), per-image loss; sides multiples of 32.",
        ),
    )
}
"""Registered models by name."""


def check_model_name(name: str) -> None:
    """Fail fast on a ``model`` run-config value that is not registered.

    Raises
    ------
    shared.config.ConfigError
        Naming the key ``model``, the closest registered names and all of them.
    """
    from medfed.shared.config import ConfigError, close_matches

    if name not in MODELS:
        valid = ", ".join(repr(n) for n in MODELS)
        raise ConfigError(
            f"model = {name!r} is invalid.{close_matches(name, list(MODELS))} Valid choices: {valid} "
            "(`medfed models` describes them)."
        )


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(MODELS))
        raise ValueError(f"Unknown model {name!r}. Valid models: {valid}.") from None


def _normalise_image_size(
    image_size: int | tuple[int, ...] | None, spatial_dims: int
) -> ImageSize | None:
    """``None`` (or ``0``, the config's "native size") -> ``None``; an int -> a tuple."""
    if image_size is None or (isinstance(image_size, int) and image_size == 0):
        return None
    sizes = (image_size,) * spatial_dims if isinstance(image_size, int) else tuple(image_size)
    if len(sizes) != spatial_dims or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(
            f"image_size={image_size!r} is invalid: give one positive int or a tuple of "
            f"{spatial_dims} positive ints (spatial_dims={spatial_dims})."
        )
    return sizes


def build_model(
    name: str,
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str = "batch",
    image_size: int | tuple[int, ...] | None = None,
) -> nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name
        A key of :data:`MODELS`.
    spatial_dims
        2 (inputs ``(B, C, H, W)``) or 3 (inputs ``(B, C, D, H, W)``).
    in_channels
        Input channels ``C``.
    out_channels
        Classification: number of classes ``K`` (logits ``(B, K)``). Segmentation: number of
        classes including background (logits ``(B, K, *spatial)``).
    norm
        ``"batch"`` (best without DP; rejected by Opacus), ``"group"`` (:data:`DP_NORM`) or
        ``"instance"`` (affine).
    image_size
        Side length (int) or per-axis sizes of the inputs, or ``None`` / ``0`` when unknown.
        Selects the ResNet stem and lets ``unet`` reject sizes not divisible by 16 early.

    Returns
    -------
    nn.Module
        The model, in training mode, on the CPU.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the valid names), ``norm`` not in :data:`NORMS`,
        ``spatial_dims`` not 2 or 3, non-positive channel counts, or an ``image_size`` the model
        cannot take.
    """
    spec = _spec(name)
    if norm not in NORMS:
        raise ValueError(f"norm = {norm!r} is invalid. Valid norms: {', '.join(NORMS)} (--norm group).")
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims={spatial_dims!r} is invalid: it must be 2 or 3.")
    for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r} is invalid: it must be an int >= 1.")
    sizes = _normalise_image_size(image_size, spatial_dims)
    model = spec.builder(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        norm=norm,
        image_size=sizes,
    )
    logger.debug(
        "Built %s (%dD, %d->%d channels, norm=%s): %d parameters.",
        name,
        spatial_dims,
        in_channels,
        out_channels,
        norm,
        count_parameters(model),
    )
    return model


def model_task(name: str) -> str:
    """``"classification"`` or ``"segmentation"`` for a registered model name.

    Raises
    ------
    ValueError
        Unknown ``name``; the message lists the valid names.
    """
    return _spec(name).task


def validate_for_dp(model: nn.Module) -> None:
    """Check that Opacus can compute per-sample gradients for ``model``.

    Runs ``opacus.validators.ModuleValidator.validate(model, strict=False)`` and turns its
    findings into one readable error. Opacus also requires training mode, so call this on a
    model in ``model.train()`` mode (as :func:`build_model` returns it).

    Parameters
    ----------
    model
        Any module (typically from :func:`build_model`).

    Raises
    ------
    ValueError
        Naming every offending module (for example each BatchNorm layer), the distinct
        problems Opacus reported, and the fix.
    """
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return
    # Opacus's errors do not name the module; find the offenders with its own validators.
    offenders = [
        f"{name or '<root>'} ({type(module).__name__})"
        for name, module in trainable_modules(model)
        if type(module) in ModuleValidator.VALIDATORS
        and ModuleValidator.VALIDATORS[type(module)](module)
    ]
    problems = list(dict.fromkeys(str(err).split(". ")[0].rstrip(".") + "." for err in errors))
    fixes = []
    if offenders or any("BatchNorm" in problem for problem in problems):
        fixes.append(
            "use norm = 'group' or 'instance' instead of 'batch' (--norm group, or --set norm=group; "
            f"in Python build_model(..., norm={DP_NORM!r}))"
        )
    if not model.training:
        fixes.append("call model.train() before making it private")
    if not fixes:
        fixes.append("replace the modules Opacus rejects (see opacus.validators)")
    shown = ", ".join(offenders[:_MAX_LISTED])
    if len(offenders) > _MAX_LISTED:
        shown += f", ... ({len(offenders) - _MAX_LISTED} more)"
    raise ValueError(
        f"The model cannot be trained with DP-SGD (Opacus): {len(errors)} problem(s).\n"
        + "".join(f"  - {problem}\n" for problem in problems)
        + (f"Offending modules ({len(offenders)}): {shown}.\n" if offenders else "")
        + "Fix: "
        + "; ".join(fixes)
        + "."
    )


_MAX_LISTED: int = 12
"""Offending module names quoted by :func:`validate_for_dp` before it abbreviates."""


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
