"""A small convolutional network for the `images` data (1 x 16 x 16 greyscale, 10 classes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CNNConfig", "CNN"]


@dataclass(frozen=True)
class CNNConfig:
    channels: int = 1  # input channels
    size: int = 16  # input height and width (divisible by 4)
    width: int = 16  # channels of the first convolution; the second has twice as many
    classes: int = 10


class CNN(nn.Module):
    def __init__(self, **kwargs: int) -> None:
        super().__init__()
        cfg = CNNConfig(**kwargs)
        assert cfg.size % 4 == 0, f"image size {cfg.size} must be divisible by 4"
        self.cfg = cfg
        self.conv1 = nn.Conv2d(cfg.channels, cfg.width, 3, padding=1)
        self.conv2 = nn.Conv2d(cfg.width, 2 * cfg.width, 3, padding=1)
        self.head = nn.Linear(2 * cfg.width * (cfg.size // 4) ** 2, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.cfg.channels, self.cfg.size
        assert x.dim() == 4 and tuple(x.shape[1:]) == (c, s, s), f"expected (B, {c}, {s}, {s}), got {tuple(x.shape)}"
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, width, s/2, s/2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 2 width, s/4, s/4)
        return self.head(x.flatten(1))  # (B, classes)
