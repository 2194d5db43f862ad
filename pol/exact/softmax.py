"""Exact softmax and log-softmax (forward and backward), written out from torch's decompositions: the maximum
and the exact transcendentals, each denominator an exact sum rounded once; one fused kernel per row where built.

Raises `UnsupportedOperator` for half_to_float and IndexError (as torch) for a dimension out of range.
"""

from __future__ import annotations

import torch

from pol.errors import UnsupportedOperator
from pol.exact import elementwise, native, reduce

__all__ = ["wrap_dim", "softmax_backward", "softmax", "safe_softmax", "log_softmax_backward", "log_softmax"]


def wrap_dim(dim: int, ndim: int) -> int:
    """dim in [-ndim, ndim) (a 0-d tensor counts as 1-d), as a non-negative index; IndexError as torch's otherwise."""
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")
    return dim % n


def softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """aten._softmax as torch's decomposition computes it: m = amax, e = exp(x - m), e / S(e) (S exact)."""
    if half_to_float:
        raise UnsupportedOperator("aten._softmax", "half_to_float")
    x = x.contiguous()
    dim = wrap_dim(dim, x.dim())
    if x.dim() and dim == x.dim() - 1:
        fused = native.softmax(x)
        if fused is not None:
            return fused
    if x.numel() == 0:
        return torch.empty_like(x)
    x_max = torch.amax(x, dim, keepdim=True)
    unnormalized = elementwise.exact_exp(x - x_max)
    return unnormalized / reduce.exact_sum(unnormalized, [dim], keepdim=True)


def safe_softmax(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """aten._safe_softmax (SDPA's math path) as torch's decomposition computes it: the softmax, with the rows whose
    every entry is -inf set to 0."""
    if dtype is not None and dtype != x.dtype:
        raise UnsupportedOperator("aten._safe_softmax", f"dtype change to {dtype}")
    out = softmax(x, dim, False)
    masked_rows = torch.all(x.eq(float("-inf")), dim=dim, keepdim=True)
    return torch.where(masked_rows, torch.zeros_like(out), out)


def softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    """aten._softmax_backward_data as torch's decomposition computes it: p = g * o, p - o * S(p)."""
    dim = wrap_dim(dim, out.dim())
    if out.dim() and dim == out.dim() - 1:
        fused = native.softmax_backward(grad.contiguous(), out.contiguous())
        if fused is not None:
            return fused
    new_grad = grad * out
    return (new_grad - out * reduce.exact_sum(new_grad, [dim], keepdim=True)).contiguous()


def log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """aten._log_softmax as torch's decomposition computes it: d = x - amax(x), d - log(S(exp(d))) (S exact)."""
    if half_to_float:
        raise UnsupportedOperator("aten._log_softmax", "half_to_float")
    if x.dim() == 0:
        return log_softmax(x.reshape(1), 0, False).reshape(())
    x = x.contiguous()
    dim = wrap_dim(dim, x.dim())
    if dim == x.dim() - 1:
        fused = native.log_softmax(x)
        if fused is not None:
            return fused
    if x.numel() == 0:
        return torch.empty_like(x)
    shifted = x - torch.amax(x, dim, keepdim=True)
    return shifted - elementwise.exact_log(reduce.exact_sum(elementwise.exact_exp(shifted), [dim], keepdim=True))


def log_softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    """aten._log_softmax_backward_data as torch's decomposition computes it: g - exp(o) * S(g)."""
    if input_dtype != torch.float32:
        raise UnsupportedOperator("aten._log_softmax_backward_data", f"input dtype {input_dtype}")
    dim = wrap_dim(dim, out.dim())
    if out.dim() and dim == out.dim() - 1 and grad.shape == out.shape:
        fused = native.log_softmax_backward(grad.contiguous(), out.contiguous())
        if fused is not None:
            return fused
    return grad - elementwise.exact_exp(out) * reduce.exact_sum(grad, [dim] if out.dim() else None, keepdim=out.dim() > 0)
