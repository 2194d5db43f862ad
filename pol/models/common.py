"""Pieces shared by the built-in models: seeded dropout and seeded initialisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["SeededDropout", "MaskSource"]

MaskSource = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> float mask of 0 and 1/(1-p)


class SeededDropout(nn.Module):
    """Dropout whose mask comes from the trainer's hardware-independent generator, keyed by (seed, step, layer).

    The trainer binds a mask source before each step (`pol.train.bind_randomness`); outside training (eval mode or
    p == 0) it is the identity. Used in training without a bound source, it refuses rather than draw from torch's
    global generator, whose values differ between machines.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        assert 0.0 <= p < 1.0, f"dropout probability {p} must be in [0, 1)"
        self.p = p
        self.mask_source: MaskSource | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask_source is None:
            raise RuntimeError("SeededDropout in training mode needs a mask source bound by pol's trainer")
        return x * self.mask_source(tuple(x.shape)).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
