"""medfed's registry model behind a class FLARE can build from ``{"class_path", "args"}``."""

from __future__ import annotations

import torch
from torch import nn

from medfed.shared.models import build_model

__all__ = ["PeerNet"]


class PeerNet(nn.Module):
    """``build_model(model, ...)`` for 2D inputs ``(B, in_channels, image_size, image_size)`` -> logits ``(B, num_classes)``.

    The seed makes the initial weights identical wherever FLARE builds it.
    """

    def __init__(self, model: str = "simplecnn", in_channels: int = 1, num_classes: int = 2, image_size: int = 28,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = build_model(model, spatial_dims=2, in_channels=in_channels, out_channels=num_classes, norm="batch",
                               image_size=image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
