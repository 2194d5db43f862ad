"""Exact numerics: bitwise-identical training results on any machine, thread count, layout or device.

`with exact_mode(): ...` routes every aten operator of a training step (forward, autograd backward, a hand-written
optimizer step) to an exact implementation, or raises `pol.errors.UnsupportedOperator` naming the operator:

- matrix products and convolutions: int8 limbs under power-of-two row/column scales, exact integer GEMMs, one
  rounding (`exact_mm`, `exact_bmm`; `exact_mm_reference` is the plain definition the fast path is held to);
- reductions and scatter-additions: exact fixed-point accumulation, one rounding (`exact_sum`, `exact_index_add`...);
- transcendentals from IEEE basic operations in a fixed order (`exact_exp`, `exact_log`, `exact_erf`, `exact_sin`...);
- layers: norms (layer, batch, group), attention (pol/exact/attention.py), grouped and transposed convolution,
  pooling and upsampling backwards (pol/exact/resample.py), cumulative sums;
- single-rounding IEEE ops pass through; multi-rounding ops are split; random draws are refused.

Errors (from `pol.errors`): NumericsError -> UnsupportedOperator(op, why).
"""

from __future__ import annotations

from pol.exact.conv import exact_avg_pool2d, exact_convolution, exact_convolution_backward
from pol.exact.elementwise import (
    exact_cos,
    exact_erf,
    exact_exp,
    exact_expm1,
    exact_log,
    exact_log1p,
    exact_pow_scalar,
    exact_rsqrt,
    exact_sigmoid,
    exact_sin,
    exact_sqrt,
    exact_tanh,
)
from pol.exact.matmul import exact_bmm, exact_mm, exact_mm_reference, int_mm_exact
from pol.exact.mode import ExactMode, exact_mode, is_supported, route_operator, supported_operators
from pol.exact.reduce import exact_index_add, exact_mean, exact_scatter_add, exact_sum

__all__ = [
    "ExactMode",
    "exact_mode",
    "is_supported",
    "route_operator",
    "supported_operators",
    "exact_mm",
    "exact_mm_reference",
    "exact_bmm",
    "int_mm_exact",
    "exact_sum",
    "exact_mean",
    "exact_index_add",
    "exact_scatter_add",
    "exact_convolution",
    "exact_convolution_backward",
    "exact_avg_pool2d",
    "exact_exp",
    "exact_expm1",
    "exact_log",
    "exact_log1p",
    "exact_tanh",
    "exact_sigmoid",
    "exact_erf",
    "exact_rsqrt",
    "exact_sqrt",
    "exact_pow_scalar",
    "exact_sin",
    "exact_cos",
]
