"""2D object detection: a small RetinaNet from MONAI (``monai.apps.detection``), its per-image loss
and its predictions.

The registry entry ``retinanet`` (:mod:`medfed.shared.models`) builds :class:`RetinaNetModel`. It
plugs into the same loops as the other tasks (:func:`medfed.shared.training.train_epochs`):

* ``model(images)`` maps ``(B, C, H, W)`` images to a :class:`dict` of head outputs and anchors
  (see :meth:`RetinaNetModel.forward`), the "logits" of detection;
* :class:`DetectionLoss` (``make_loss("detection")``) maps those outputs and the batch's boxes to
  the mean of **per-image** RetinaNet losses. MONAI's own ``RetinaNetDetector`` normalises its
  losses over the sampled anchors of the whole batch, so one image's gradient would depend on the
  other images' boxes; here each image's classification and box-regression losses are normalised
  by that image's own sampled anchors and the batch loss is their mean. That is what Opacus's
  per-sample clipping needs (``loss_reduction = "mean"`` over independent per-image terms), so
  DP-SGD applies per image.
* :func:`predict_boxes` decodes the outputs into boxes, scores and labels (MONAI's box coder and
  box selector: score threshold 0.05, NMS at IoU 0.5, at most 100 boxes per image).

Box convention
    Targets and predictions here are ``[xmin, ymin, xmax, ymax]`` in pixels, ``x`` along the
    image's last axis (width), as Pascal VOC and COCO write them. MONAI's detection utilities
    index boxes in array order ("ij": first coordinate along ``H``); the conversion happens
    inside this module only (:func:`to_monai_boxes`).

Architecture (``retinanet``)
    Backbone: MONAI ``ResNet`` with medfed's DP-safe basic block (one block per stage, widths
    32/64/128, the standard 7x7 stride-2 stem with max pool; ``norm`` as for every model, so
    ``norm = "group"`` makes it trainable by Opacus). FPN (MONAI ``BackboneWithFPN``, 64 channels)
    on stages 2 and 3 plus MONAI's extra max-pool level: feature maps at strides 8, 16 and 32.
    Heads: MONAI's RetinaNet classification and regression heads (4 conv + GroupNorm layers
    each). Anchors: two square shapes per location, ``s/16`` and ``1.5 s/16`` for an image side
    ``s``, doubled at each level (at 256 px: 16 to 96 px). Training samples: ATSS matching
    (MONAI ``ATSSMatcher``, 4 candidates per level) and MONAI's hard-negative sampler (256
    anchors per image, at most half positive), binary cross-entropy and smooth-L1 box losses.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from torch import nn

__all__ = [
    "DETECTION_DIVISOR",
    "RetinaNetModel",
    "DetectionLoss",
    "build_retinanet",
    "collate_detection",
    "predict_boxes",
    "to_monai_boxes",
]

DETECTION_DIVISOR: int = 32
"""Image sides must be multiples of this (the coarsest feature map has stride 32)."""

FPN_CHANNELS: int = 64
BACKBONE_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
RETURNED_LAYERS: tuple[int, ...] = (2, 3)
FEATURE_MAP_SCALES: tuple[int, ...] = (1, 2, 4)
ANCHOR_FRACTIONS: tuple[float, ...] = (1 / 16, 1.5 / 16)
"""Anchor sides at the finest level, as fractions of the image side."""

SAMPLES_PER_IMAGE: int = 256
POSITIVE_FRACTION: float = 0.5
SCORE_THRESHOLD: float = 0.05
NMS_IOU: float = 0.5
DETECTIONS_PER_IMAGE: int = 100

_XY_TO_IJ = [1, 0, 3, 2]


def to_monai_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``[xmin, ymin, xmax, ymax]`` (x along width) <-> MONAI's array-order boxes; its own inverse.

    Parameters
    ----------
    boxes
        ``(M, 4)``.
    """
    return boxes[:, _XY_TO_IJ]


class _HeadSpec(nn.Module):
    """The attributes MONAI's ``RetinaNetDetector`` reads from its network (no parameters): the
    detector object here only supplies its matcher, sampler, losses and box decoding."""

    def __init__(self, *, num_classes: int, num_anchors: int) -> None:
        super().__init__()
        self.spatial_dims = 2
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.size_divisible = DETECTION_DIVISOR
        self.cls_key = "classification"
        self.box_reg_key = "box_regression"


@functools.lru_cache(maxsize=8)
def _helper(num_classes: int, num_anchors: int) -> RetinaNetDetector:
    """A configured MONAI ``RetinaNetDetector`` (no parameters) for its losses and decoding."""
    generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=FEATURE_MAP_SCALES, base_anchor_shapes=[(1, 1)] * num_anchors
    )
    detector = RetinaNetDetector(_HeadSpec(num_classes=num_classes, num_anchors=num_anchors), generator)
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(
        batch_size_per_image=SAMPLES_PER_IMAGE, positive_fraction=POSITIVE_FRACTION, pool_size=20, min_neg=16
    )
    detector.set_box_selector_parameters(
        score_thresh=SCORE_THRESHOLD,
        topk_candidates_per_level=1000,
        nms_thresh=NMS_IOU,
        detections_per_img=DETECTIONS_PER_IMAGE,
    )
    return detector


class _ResNetFPN(nn.Module):
    """ResNet stages 1..max(RETURNED_LAYERS) and MONAI's FPN on the returned ones.

    (MONAI's ``BackboneWithFPN`` does the same with torchvision's ``IntermediateLayerGetter``;
    torchvision is not a dependency here.) ``forward`` maps ``(B, C, H, W)`` to an ordered dict of
    ``FPN_CHANNELS``-channel maps, finest first.
    """

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act, self.maxpool = backbone.conv1, backbone.bn1, backbone.act, backbone.maxpool
        self.layers = nn.ModuleList(getattr(backbone, f"layer{k}") for k in range(1, max(RETURNED_LAYERS) + 1))
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=2,
            in_channels_list=[BACKBONE_WIDTHS[k - 1] for k in RETURNED_LAYERS],
            out_channels=FPN_CHANNELS,
            extra_blocks=LastLevelMaxPool(2),
        )
        self.out_channels = FPN_CHANNELS

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        features: dict[str, torch.Tensor] = {}
        for k, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if k in RETURNED_LAYERS:
                features[str(len(features))] = x
        return self.fpn(features)


class RetinaNetModel(nn.Module):
    """MONAI ``RetinaNet`` (ResNet-FPN backbone) plus its anchor generator.

    The state dict is the network's (``network.*``); the anchor generator has no parameters.

    Parameters
    ----------
    in_channels
        Image channels ``C``.
    num_classes
        Object classes ``K`` (no background).
    norm
        ``"batch"``, ``"group"`` (DP-SGD) or ``"instance"`` for the backbone (the heads always use
        MONAI's GroupNorm).
    image_side
        The (smaller) image side the anchors are sized for.
    """

    def __init__(self, *, in_channels: int, num_classes: int, norm: str, image_side: int) -> None:
        super().__init__()
        from medfed.shared.models import _RELU, DPResNetBlock, _monai_norm

        backbone = ResNet(
            block=DPResNetBlock.with_norm(norm),
            layers=[1, 1, 1, 1],
            block_inplanes=list(BACKBONE_WIDTHS),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=False,
            num_classes=1,
            bias_downsample=False,
            act=_RELU,
            norm=_monai_norm(norm, BACKBONE_WIDTHS[0]),
        )
        extractor = _ResNetFPN(backbone)
        shapes = [(round(f * image_side),) * 2 for f in ANCHOR_FRACTIONS]
        self.anchor_generator = AnchorGeneratorWithAnchorShape(
            feature_map_scales=FEATURE_MAP_SCALES, base_anchor_shapes=shapes
        )
        self.num_anchors = len(shapes)
        self.num_classes = num_classes
        self.network = RetinaNet(
            spatial_dims=2,
            num_classes=num_classes,
            num_anchors=self.num_anchors,
            feature_extractor=extractor,
            size_divisible=DETECTION_DIVISOR,
        )

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """Head outputs and anchors for a batch.

        Parameters
        ----------
        images
            ``(B, C, H, W)``, ``H`` and ``W`` multiples of :data:`DETECTION_DIVISOR`.

        Returns
        -------
        dict
            ``classification`` ``(B, N, K)`` logits and ``box_regression`` ``(B, N, 4)`` for the
            ``N`` anchors, ``anchors`` ``(N, 4)`` (MONAI order), ``locs_per_level`` (feature-map
            positions per level), ``num_anchors`` (anchors per position), ``image_size`` ``(H, W)``.
        """
        if any(s % DETECTION_DIVISOR for s in images.shape[2:]):
            raise ValueError(
                f"retinanet needs image sides that are multiples of {DETECTION_DIVISOR}; got {tuple(images.shape[2:])}."
            )
        head = self.network(images)
        helper = _helper(self.num_classes, self.num_anchors)
        cls_maps, box_maps = head["classification"], head["box_regression"]
        anchors = self.anchor_generator(images[:1], cls_maps)[0]
        return {
            "classification": helper._reshape_maps(cls_maps),
            "box_regression": helper._reshape_maps(box_maps),
            "anchors": anchors,
            "locs_per_level": [int(x.shape[2:].numel()) for x in cls_maps],
            "num_anchors": self.num_anchors,
            "image_size": [int(s) for s in images.shape[2:]],
        }


def build_retinanet(
    *, spatial_dims: int, in_channels: int, out_channels: int, norm: str, image_size: tuple[int, ...] | None
) -> nn.Module:
    """The registry builder of ``retinanet``: ``out_channels`` is the number of object classes."""
    if spatial_dims != 2:
        raise ValueError("retinanet is a 2D detector: use 2D images (spatial_dims = 2).")
    if image_size is None:
        raise ValueError("retinanet sizes its anchors from the image size: set image-size (e.g. --image-size 256).")
    if any(s % DETECTION_DIVISOR for s in image_size):
        fixed = -(-max(image_size) // DETECTION_DIVISOR) * DETECTION_DIVISOR
        raise ValueError(
            f"retinanet needs image sides that are multiples of {DETECTION_DIVISOR}; the images are "
            f"{image_size}. Set --image-size {fixed}."
        )
    return RetinaNetModel(in_channels=in_channels, num_classes=out_channels, norm=norm, image_side=min(image_size))


def _targets(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """One image's ``(M, 5)`` ``[xmin, ymin, xmax, ymax, label]`` as MONAI's target dict."""
    return {"boxes": to_monai_boxes(boxes[:, :4].float()), "labels": boxes[:, 4].long()}


def _match(
    helper: RetinaNetDetector, anchors: torch.Tensor, boxes: torch.Tensor, locs: Sequence[int], num_anchors: int
) -> torch.Tensor:
    """ATSS matching of one image: ``(N,)`` matched box index per anchor, negative for none.

    (MONAI's ``compute_anchor_matched_idxs`` first tests for torchvision's matcher class, which
    fails without torchvision; this calls MONAI's ATSS matcher directly, as it does.)
    """
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    _, matched = helper.proposal_matcher(boxes.to(anchors.device), anchors, locs, num_anchors)
    return matched


class DetectionLoss(nn.Module):
    """Mean over the batch of per-image RetinaNet losses (classification BCE on the image's
    sampled anchors + smooth-L1 on its positive anchors).

    Call as ``loss(outputs, targets)`` with ``outputs`` from :meth:`RetinaNetModel.forward` and
    ``targets`` a list of ``B`` tensors ``(M_i, 5)`` (:func:`collate_detection`).
    """

    def forward(self, outputs: dict[str, Any], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        cls_logits, box_regression = outputs["classification"], outputs["box_regression"]
        helper = _helper(cls_logits.shape[-1], int(outputs["num_anchors"]))
        anchors, locs = outputs["anchors"], outputs["locs_per_level"]
        losses = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No anchor is matched")
            for i, boxes in enumerate(targets):
                target = [_targets(boxes.to(anchors.device))]
                matched = [_match(helper, anchors, target[0]["boxes"], locs, int(outputs["num_anchors"]))]
                cls_loss = helper.compute_cls_loss(cls_logits[i : i + 1], target, matched)
                box_loss = helper.compute_box_loss(box_regression[i : i + 1], target, [anchors], matched)
                losses.append(cls_loss + box_loss.to(cls_loss.device))
        return torch.stack(losses).mean()


def collate_detection(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack images ``(B, C, H, W)``; keep the per-image box tensors ``(M_i, 5)`` as a list."""
    if not batch:
        return torch.zeros(0), []
    images = torch.stack([item[0] for item in batch])
    return images, [item[1] for item in batch]


@torch.no_grad()
def predict_boxes(outputs: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """Decode a batch's outputs into per-image detections.

    Returns
    -------
    list
        Per image ``{"boxes": (P, 4) [xmin, ymin, xmax, ymax], "scores": (P,), "labels": (P,)}``
        (numpy; at most :data:`DETECTIONS_PER_IMAGE`, after NMS).
    """
    cls_logits, box_regression = outputs["classification"], outputs["box_regression"]
    helper = _helper(cls_logits.shape[-1], int(outputs["num_anchors"]))
    batch = cls_logits.shape[0]
    detections = helper.postprocess_detections(
        {"classification": cls_logits.float(), "box_regression": box_regression.float()},
        [outputs["anchors"]] * batch,
        [list(outputs["image_size"])] * batch,
        outputs["locs_per_level"],
    )
    return [
        {
            "boxes": to_monai_boxes(d["boxes"].float()).cpu().numpy().reshape(-1, 4),
            "scores": d["labels_scores"].float().cpu().numpy(),
            "labels": d["labels"].long().cpu().numpy(),
        }
        for d in detections
    ]
