"""Exact activation handlers: GELU (erf and tanh forms), SiLU and their backwards, and tanh's backward, as torch's
decompositions compute them (written out: no dispatch per step, and no dependence on torch's version), with the
exact erf, exp, tanh and sigmoid; every other step one IEEE rounding, in the decomposition's order.

Raises `UnsupportedOperator` for an approximation other than 'none' and 'tanh'.
"""

from __future__ import annotations

import torch

from pol.errors import UnsupportedOperator
from pol.exact import elementwise, native

__all__ = ["gelu_backward", "gelu", "silu", "silu_backward", "tanh_backward"]

M_SQRT2 = 1.41421356237309504880  # torch's decompositions' constants (Python floats, rounded to float32 in use)
M_SQRT1_2 = 0.70710678118654752440
M_2_SQRTPI = 1.12837916709551257390


def gelu(a: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """aten.gelu as torch's decomposition computes it, with the exact erf and tanh."""
    if approximate == "tanh":
        k_beta = M_SQRT2 * M_2_SQRTPI * 0.5
        inner = (a + (a * a * a) * 0.044715) * k_beta
        return (a * 0.5) * (1 + elementwise.exact_tanh(inner))
    if approximate != "none":
        raise UnsupportedOperator("aten.gelu", f"approximate={approximate!r}")
    fused = native.gelu(a.contiguous(), M_SQRT1_2)
    if fused is not None:
        return fused.view(a.shape)
    return (a * 0.5) * (1 + elementwise.exact_erf(a * M_SQRT1_2))


def gelu_backward(grad: torch.Tensor, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """aten.gelu_backward as torch's decomposition computes it, with the exact erf, exp and tanh."""
    if approximate == "tanh":
        k_beta = M_SQRT2 * M_2_SQRTPI * 0.5
        k_kappa = 0.044715
        x_sq = x * x
        inner = (x + (x_sq * x) * k_kappa) * k_beta
        tanh_inner = elementwise.exact_tanh(inner)
        left = x * 0.5
        right = 1 + tanh_inner
        left_derivative = right * 0.5
        tanh_derivative = 1 - tanh_inner * tanh_inner
        inner_derivative = (1 + x_sq * (3 * k_kappa)) * k_beta
        right_derivative = (left * tanh_derivative) * inner_derivative
        return grad * (left_derivative + right_derivative)
    if approximate != "none":
        raise UnsupportedOperator("aten.gelu_backward", f"approximate={approximate!r}")
    k_beta = M_2_SQRTPI * M_SQRT1_2 * 0.5
    if grad.shape == x.shape:
        fused = native.gelu_backward(grad.contiguous(), x.contiguous(), M_SQRT1_2, k_beta)
        if fused is not None:
            return fused
    cdf = (1 + elementwise.exact_erf(x * M_SQRT1_2)) * 0.5
    pdf = elementwise.exact_exp((x * x) * -0.5) * k_beta
    return grad * (cdf + x * pdf)


def silu(x: torch.Tensor) -> torch.Tensor:
    """aten.silu as torch's decomposition computes it: x * sigmoid(x)."""
    return x * elementwise.exact_sigmoid(x)


def silu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """aten.silu_backward as torch's decomposition computes it: s = sigmoid(x), grad * s * (1 + x * (1 - s))."""
    sigmoid = elementwise.exact_sigmoid(x)
    return grad * sigmoid * (1 + x * (1 - sigmoid))


def tanh_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """aten.tanh_backward as torch's decomposition computes it: grad * (1 - y * y)."""
    return grad * (1 - y * y)
