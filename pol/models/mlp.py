"""A multi-layer perceptron for the `synthetic` classification data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MLPConfig", "MLP"]


@dataclass(frozen=True)
class MLPConfig:
    d_in: int = 32  # input features (the `synthetic` data's default)
    hidden: int = 256  # width of each hidden layer
    depth: int = 2  # number of hidden layers
    classes: int = 10  # output logits


class MLP(nn.Module):
    def __init__(self, **kwargs: int) -> None:
        super().__init__()
        cfg = MLPConfig(**kwargs)
        self.cfg = cfg
        widths = [cfg.d_in] + [cfg.hidden] * cfg.depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Linear(widths[-1], cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2 and x.shape[1] == self.cfg.d_in, f"expected (B, {self.cfg.d_in}), got {tuple(x.shape)}"
        for layer in self.hidden:
            x = torch.relu(layer(x))  # (B, hidden)
        return self.head(x)  # (B, classes)
