"""A user's own model and dataset, brought in by import path (`tests.userpkg:...`)."""

import torch
from torch import nn


def make_model(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))


def make_data(n: int = 128) -> dict[str, torch.Tensor]:
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) / (n * 4)
    return {"x": x, "y": x.sum(dim=1, keepdim=True) * 0.5}


def not_a_model() -> str:
    return "nope"


def bad_data() -> int:
    return 3


def shape_mismatch_model(width: int = 8) -> nn.Module:
    """A model whose first layer expects 5 features: on the 4-feature data its forward raises."""
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 1))


def nan_data(n: int = 64) -> dict[str, torch.Tensor]:
    """Data whose inputs are NaN: the loss of the very first step is not finite."""
    x = torch.full((n, 4), float("nan"))
    return {"x": x, "y": torch.zeros(n, 1)}
