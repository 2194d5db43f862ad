"""Exact loss handlers: NLL loss forward and backward as torch's decompositions compute them, every sum exact."""

from __future__ import annotations

import torch

from pol.exact import reduce

__all__ = ["MEAN", "SUM", "nll_loss_forward", "nll_loss_backward"]

MEAN, SUM = 1, 2  # torch's Reduction enum (NONE is 0)


def nll_loss_forward(
    x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """aten.nll_loss_forward as torch's decomposition computes it, its sums exact: -x[target] (0 where ignored),
    summed (or averaged over the total weight, itself an exact sum)."""
    channel_dim = 1 if x.dim() >= 2 else 0
    w = None
    if weight is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = weight.shape[0]
        w = weight.view(shape) if x.dim() > 1 else weight
        x = x * w
    keep = target != ignore_index
    safe = torch.where(keep, target, 0).unsqueeze(channel_dim)
    result = torch.where(keep, -torch.gather(x, channel_dim, safe).squeeze(channel_dim), 0)
    if reduction not in (MEAN, SUM) and x.dim() > 1:
        return result, x.new_full((), 0.0)
    if w is not None:
        picked = torch.gather(w.expand(x.shape), channel_dim, safe).squeeze(channel_dim)
        total = reduce.exact_sum(torch.where(keep, picked, 0), None)
    else:
        total = keep.sum().to(x)
    if reduction == SUM:
        result = reduce.exact_sum(result, None)
    elif reduction == MEAN:
        result = reduce.exact_sum(result, None) / total
    return result, total


def nll_loss_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: int,
    ignore_index: int,
    total_weight: torch.Tensor,
) -> torch.Tensor:
    """aten.nll_loss_backward as torch's decomposition computes it (single roundings only): -1 at the target,
    times the incoming gradient (divided by the total weight for a mean, times the class weight)."""
    channel_dim = 0 if x.dim() < 2 else 1
    if reduction == MEAN:
        grad_output = grad_output / total_weight
    if x.dim() == 1 and target.dim() > 0:
        target = target[0]
    target = target.unsqueeze(channel_dim)
    keep = target != ignore_index
    grad_input = torch.zeros_like(x).scatter(channel_dim, torch.where(keep, target, 0), -1.0)
    if grad_input.dim() > grad_output.dim() > 0:
        grad_output = grad_output.unsqueeze(channel_dim)
    if weight is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = weight.shape[0]
        grad_output = grad_output * weight.reshape(shape)
    return grad_input * torch.where(keep, grad_output, 0)
