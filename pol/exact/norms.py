"""Exact normalisation handlers, written out from torch's decompositions so that they do not depend on torch's
version: every mean and variance is an exact sum rounded once, every other step one IEEE rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pol.exact import elementwise, native, reduce

__all__ = ["layer_norm_backward", "layer_norm"]


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
