"""Tiny models that draw torch random numbers in every way a step may: for the disputes over served draws."""

from __future__ import annotations

import torch
from torch import nn


class NoisyNet(nn.Module):
    """Draws three ways per forward: `torch.native_dropout` (the fused dropout a GPU takes: a bool mask, and its own
    backward), `torch.randn_like` noise, and `nn.Dropout` (on the CPU: `bernoulli_` on a float tensor); and makes a
    literal tensor (`torch.tensor`, as transformers' cache does) that the step reads."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, 1)
        self.drop = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h, _ = torch.native_dropout(h, 0.5, self.training)
        h = h + torch.tensor([0.05]) * torch.randn_like(h)
        return self.b(self.drop(h))


def noisy_net(width: int = 8) -> nn.Module:
    return NoisyNet(width)
