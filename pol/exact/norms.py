"""Exact normalisation handlers, written out from torch's decompositions so that they do not depend on torch's
version: every mean and variance is an exact sum rounded once, every other step one IEEE rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pol.exact import arith, elementwise, native, reduce

__all__ = ["layer_norm_backward", "layer_norm", "batch_norm", "batch_norm_backward"]


def layer_norm(
    x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """native_layer_norm as torch's decomposition computes it (this is that arithmetic, written out so that it does
    not depend on torch's version): mean = S(x) / n, var = S((x - mean)^2) / n with S the exact sum, rstd =
    rsqrt(var + eps), out = ((x - mean) * rstd) * weight + bias; mean and rstd keep the reduced dims as size 1."""
    x = x.contiguous()
    axis = x.dim() - len(normalized_shape)
    dims = list(range(axis, x.dim()))
    n = 1
    for d in normalized_shape:
        n *= d
    stat_shape = (*x.shape[:axis], *([1] * len(normalized_shape)))
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    fused = native.layer_norm(x, w, b, eps, n) if n > 0 else None
    if fused is not None:
        out, mean, rstd = fused
        return out, mean.view(stat_shape), rstd.view(stat_shape)
    mean = reduce.exact_sum(x, dims, keepdim=True) / n
    dev = x - mean
    var = reduce.exact_sum(dev * dev, dims, keepdim=True) / float(n)
    rstd = elementwise.exact_rsqrt(var + eps)
    out = (x - mean) * rstd
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out, mean, rstd


def layer_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """native_layer_norm_backward as torch's decomposition computes it: x_hat = (x - mean) * rstd, g = grad * weight,
    dx = (rstd / n) * ((g * n - S(g)) - x_hat * S(g * x_hat)), dweight = S_rows(grad * x_hat), dbias = S_rows(grad),
    every S an exact sum rounded once."""
    go, x = grad_out.contiguous(), x.contiguous()
    w = weight.contiguous() if weight is not None else None
    axis = x.dim() - len(normalized_shape)
    inner, outer = list(range(axis, x.dim())), list(range(axis))
    n, rows = 1, 1
    for d in x.shape[axis:]:
        n *= d
    for d in x.shape[:axis]:
        rows *= d
    want_dx, want_dw, want_db = output_mask[0], output_mask[1] and w is not None, output_mask[2] and bias is not None
    if n == 0 or rows == 0:
        zeros = (x.new_zeros(x.shape), x.new_zeros(x.shape[axis:]), x.new_zeros(x.shape[axis:]))
        return tuple(z if want else None for z, want in zip(zeros, (output_mask[0], output_mask[1], output_mask[2]), strict=True))  # type: ignore[return-value]
    while mean.dim() < x.dim():
        mean, rstd = mean.unsqueeze(-1), rstd.unsqueeze(-1)
    fused = native.layer_norm_backward(go, x, mean.contiguous(), rstd.contiguous(), w, n, want_dx, want_dw and bool(outer))
    if fused is not None:
        d_input, goxhat = fused
    else:
        x_hat = (x - mean) * rstd
        g = go * w if w is not None else go
        a = g * n
        b = reduce.exact_sum(g, inner, True)
        c2 = reduce.exact_sum(g * x_hat, inner, True)
        c3 = x_hat * c2
        d_input = (rstd / n) * (a - b - c3) if want_dx else None
        goxhat = go * x_hat if want_dw else None
    d_weight = d_bias = None
    if want_dw:
        if goxhat is None:  # the kernel skips it when there is no row to sum over
            goxhat = go * ((x - mean) * rstd)
        d_weight = reduce.exact_sum(goxhat, outer, False) if outer else goxhat
    if want_db:
        d_bias = reduce.exact_sum(go, outer, False) if outer else go.clone()
    return (d_input if want_dx else None), d_weight, d_bias


def _unsqueeze_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    while x.dim() < dim:
        x = x.unsqueeze(-1)
    return x


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """native_batch_norm as torch's decomposition computes it (written out, as `layer_norm`, so that it does not
    depend on torch's version, and runs without a dispatch per step): training: var, mean = var_mean(x) over every
    dim but 1 (pol's exact moments), rstd = rsqrt(var + eps), out = (x - mean) * rstd; the running statistics
    become momentum * mean + (1 - momentum) * running_mean and momentum * (var * (n / (n - 1))) + (1 - momentum) *
    running_var, in place. Eval: out = (x - running_mean) * (1 / sqrt(running_var + eps)). Then * weight, + bias.
    Every step one IEEE rounding or an exact primitive, in the decomposition's order (the same bits)."""
    dims = [0, *range(2, x.dim())]
    if training:
        var, mean = arith.moments("var_mean", "correction")(x, dims, correction=0, keepdim=True)
        rstd = elementwise.exact_rsqrt(var + eps)
        out = (x - mean) * rstd
        save_mean, save_rstd = torch.squeeze(mean, dims), torch.squeeze(rstd, dims)
        if running_mean is not None:
            running_mean.copy_(momentum * save_mean + (1 - momentum) * running_mean)
        if running_var is not None:
            n = x.numel() / x.shape[1]
            unbiased = torch.squeeze(var, dims) * (n / (n - 1))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("native_batch_norm: running_mean and running_var must not be None in eval mode")
        invstd = 1 / elementwise.exact_sqrt(running_var + eps)
        save_mean, save_rstd = x.new_zeros((0,)), x.new_zeros((0,))
        out = (x - _unsqueeze_to(running_mean.clone(), x.dim() - 1)) * _unsqueeze_to(invstd, x.dim() - 1)
    if weight is not None:
        out = out * _unsqueeze_to(weight.flatten(), x.dim() - 1)
    if bias is not None:
        out = out + _unsqueeze_to(bias.flatten(), x.dim() - 1)
    return out, save_mean, save_rstd


def batch_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor | None,
    save_invstd: torch.Tensor | None,
    train: bool,
    eps: float,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """native_batch_norm_backward as torch's decomposition computes it, with S the exact sum over every dim but 1
    and n the count it sums: dbias = S(g), dot = S(g * (x - mean)), proj_scale = (dot * (1/n)) * (invstd * invstd),
    dx = ((g - (x - mean) * proj_scale) - S(g) * (1/n)) * (invstd * weight) in training, g * (invstd * weight) in
    eval (invstd = rsqrt(running_var + eps)); dweight = dot * invstd. The same steps in the same order."""
    if x.dim() < 2:
        raise ValueError(f"native_batch_norm_backward: rank of the input must be at least 2, got {x.dim()}")
    if train:
        if save_mean is None or save_invstd is None:
            raise ValueError("native_batch_norm_backward: mean and invstd must not be None in training mode")
        mean, invstd = save_mean, save_invstd
    else:
        if running_mean is None or running_var is None:
            raise ValueError("native_batch_norm_backward: running_mean and running_var must not be None in eval mode")
        mean, invstd = running_mean, elementwise.exact_rsqrt(running_var + eps)
    shape = [1] * x.dim()
    shape[1] = x.shape[1]

    def broadcast(t: torch.Tensor) -> torch.Tensor:  # torch's _broadcast_batch_norm_backward
        for axis, size in enumerate(shape):
            if size == 1 and not (axis < t.dim() and t.shape[axis] == size):
                t = t.unsqueeze(axis)
        return t

    dims = [i for i in range(x.dim()) if i != 1]
    norm = 1.0 / (x.numel() / x.shape[1])
    mean = broadcast(mean)
    grad_sum = reduce.exact_sum(grad_out, dims)
    dot = reduce.exact_sum(grad_out * (x - mean), dims)
    grad_mean = broadcast(grad_sum * norm)
    proj_scale = broadcast(torch.mul(dot * norm, invstd * invstd))
    grad_scale = broadcast(invstd) * 1.0 if weight is None else broadcast(invstd * weight)
    if train:
        d_input = ((grad_out - (x - mean) * proj_scale) - grad_mean) * grad_scale
    else:
        d_input = grad_out * grad_scale
    return d_input, (dot * invstd if output_mask[1] else None), (grad_sum if output_mask[2] else None)
