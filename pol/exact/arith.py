"""Exact handlers of the arithmetic operators: products, sums and means, moments (var/std), scatter-additions, and the
split of multi-rounding operators (add/sub with alpha, addcmul, addcdiv, lerp) into single IEEE roundings in a
fixed order. Each takes an aten operator's arguments and calls the exact primitives (the mode is off inside).

Raises `UnsupportedOperator` for a dtype change in sum/mean and for index_put accumulation other than one integer
index tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pol.errors import UnsupportedOperator
from pol.exact import elementwise, matmul, reduce

__all__ = [
    "cumsum",
    "mm",
    "bmm",
    "addmm",
    "sum_dims",
    "mean_dims",
    "add",
    "sub",
    "addcmul",
    "addcdiv",
    "lerp",
    "pow_scalar",
    "index_add",
    "scatter_add",
    "index_put",
    "moments",
    "sqrt_out",
    "unary",
    "embedding_dense_backward",
]

aten = torch.ops.aten
Handler = Callable[..., Any]


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul.exact_mm(a, b)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul.exact_bmm(a, b)


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1) -> torch.Tensor:
    prod = matmul.exact_mm(a, b)
    if alpha != 1:
        prod = prod * alpha
    if beta == 0:
        return prod
    return prod + (bias if beta == 1 else bias * beta)


def sum_dims(x: torch.Tensor, dim: Sequence[int] | None = None, keepdim: bool = False, *, dtype: torch.dtype | None = None):
    if dtype is not None and dtype != x.dtype:
        raise UnsupportedOperator("aten.sum", f"dtype change to {dtype}")
    return reduce.exact_sum(x, dim, keepdim)


def mean_dims(x: torch.Tensor, dim: Sequence[int] | None = None, keepdim: bool = False, *, dtype: torch.dtype | None = None):
    if dtype is not None and dtype != x.dtype:
        raise UnsupportedOperator("aten.mean", f"dtype change to {dtype}")
    return reduce.exact_mean(x, dim, keepdim)


def add(a: Any, b: Any, *, alpha: float = 1) -> torch.Tensor:
    return torch.add(a, b if alpha == 1 else b * alpha)


def sub(a: Any, b: Any, *, alpha: float = 1) -> torch.Tensor:
    return torch.sub(a, b if alpha == 1 else b * alpha)


def addcmul(x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, *, value: float = 1) -> torch.Tensor:
    """x + (t1 * t2) * value: one rounding per operation, in this order (torch's own kernel may fuse them)."""
    prod = t1 * t2
    return x + (prod if value == 1 else prod * value)


def addcdiv(x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, *, value: float = 1) -> torch.Tensor:
    """x + (t1 / t2) * value, one rounding per operation."""
    quot = t1 / t2
    return x + (quot if value == 1 else quot * value)


def lerp(start: torch.Tensor, end: torch.Tensor, weight: Any) -> torch.Tensor:
    """start + weight * (end - start) where |weight| < 0.5, else end - (end - start) * (1 - weight): torch's own
    formula (exact at both ends), one rounding per operation."""
    diff = end - start
    if isinstance(weight, torch.Tensor):
        return torch.where(weight.abs() < 0.5, start + weight * diff, end - diff * (1 - weight))
    return start + diff * weight if abs(weight) < 0.5 else end - diff * (1 - weight)


def pow_scalar(x: torch.Tensor, p: float) -> torch.Tensor:
    return elementwise.exact_pow_scalar(x, float(p))


def index_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor, *, alpha: float = 1):
    return reduce.exact_index_add(x, dim, index, src if alpha == 1 else src * alpha)


def scatter_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return reduce.exact_scatter_add(x, dim, index, src)


def index_put(x: torch.Tensor, indices: Sequence[torch.Tensor | None], values: torch.Tensor, accumulate: bool = False):
    if not accumulate:
        return aten.index_put.default(x, indices, values, False)
    if len(indices) != 1 or indices[0] is None or indices[0].dtype == torch.bool:
        raise UnsupportedOperator("aten.index_put", "accumulate=True is exact only for one integer index tensor")
    idx = indices[0].reshape(-1)
    src = values.expand(*indices[0].shape, *x.shape[1:]).reshape(idx.numel(), *x.shape[1:])
    return reduce.exact_index_add(x, 0, idx, src)


def _var_params(overload: str, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, float, bool]:
    """(dim, correction, keepdim) of var/std/var_mean/std_mean for their .default, .dim and .correction forms."""
    rest = list(args)
    if overload == "default":
        unbiased = rest[0] if rest else kwargs.get("unbiased", True)
        return None, 1.0 if unbiased else 0.0, False
    if overload == "dim":
        dim = rest[0] if rest else kwargs.get("dim")
        unbiased = rest[1] if len(rest) > 1 else kwargs.get("unbiased", True)
        keepdim = rest[2] if len(rest) > 2 else kwargs.get("keepdim", False)
        return dim, 1.0 if unbiased else 0.0, keepdim
    dim = rest[0] if rest else kwargs.get("dim")
    correction = kwargs.get("correction")
    return dim, 1.0 if correction is None else float(correction), kwargs.get("keepdim", False)


def moments(packet: str, overload: str) -> Handler:
    """var/std (and their _mean forms): mean exactly, squared deviations one rounding each, their exact sum,
    one division by (count - correction), then sqrt for std."""

    def handler(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dim, correction, keepdim = _var_params(overload, args, kwargs)
        mean = reduce.exact_mean(x, dim, keepdim=True)
        dev = x - mean
        count = x.numel() // max(mean.numel(), 1)
        var = reduce.exact_sum(dev * dev, dim, keepdim) / max(count - correction, 0.0)
        out = elementwise.exact_sqrt(var) if packet.startswith("std") else var
        if packet.endswith("_mean"):
            return out, mean if keepdim else mean.reshape(out.shape)
        return out

    return handler


def embedding_dense_backward(
    grad: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int, scale_grad_by_freq: bool
) -> torch.Tensor:
    """aten.embedding_dense_backward as torch's decomposition computes it: the rows of `grad` added into a zero
    table at their indices (out-of-range and padding indices skipped), each slot one exact sum rounded once; with
    scale_grad_by_freq each row first divided by its index's count."""
    idx = indices.to(torch.int64)
    valid = (idx >= 0) & (idx < num_weights)
    if scale_grad_by_freq:
        counts = torch.bincount(idx[valid], minlength=num_weights)
        grad = grad / torch.where(valid, counts[idx.clamp(0, max(num_weights - 1, 0))], 1).unsqueeze(-1)
    keep = (valid & (idx != padding_idx)).reshape(-1)
    row_shape = tuple(grad.shape[idx.dim() :])
    rows = grad.reshape(idx.numel(), *row_shape)
    flat = idx.reshape(-1)
    if not bool(keep.all()):
        rows, flat = rows[keep], flat[keep]
    return reduce.exact_index_add(grad.new_zeros((num_weights, *row_shape)), 0, flat, rows)


def sqrt_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(elementwise.exact_sqrt(x))


def unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Handler:
    """A handler taking one tensor, for an exact elementwise function."""
    return lambda x: fn(x)


def cumsum(x: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is not None and dtype != x.dtype:
        raise UnsupportedOperator("aten.cumsum", f"dtype change to {dtype}")
    return reduce.exact_cumsum(x, dim)
