"""Shared helpers for the exact-numerics tests: correctly rounded references and ulp distances."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch


def round_fraction_to_f32(value: Fraction) -> float:
    """The float32 nearest to `value` (ties to even), with subnormals and overflow to inf: the one true rounding."""
    if value == 0:
        return 0.0
    sign = -1.0 if value < 0 else 1.0
    mag = abs(value)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()  # 2**(e-1) < mag < 2**(e+1)
    while Fraction(2) ** e > mag:
        e -= 1
    while Fraction(2) ** (e + 1) <= mag:
        e += 1
    lsb = max(e - 23, -149)  # 2**e <= mag < 2**(e+1), 24 significant bits, subnormal floor
    n = round(mag / Fraction(2) ** lsb)  # Fraction rounds half to even
    out = Fraction(n) * Fraction(2) ** lsb
    if out >= Fraction(2) ** 128:
        return sign * float("inf")
    return sign * float(out)


def exact_sum_reference(values: list[float]) -> float:
    return round_fraction_to_f32(sum((Fraction(v) for v in values), Fraction(0)))


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def wide_rows(rng: np.random.Generator, shape: tuple[int, int], spread: float = 20.0) -> np.ndarray:
    """Normal draws times 2**u with u uniform in [-spread, spread]: rows with a wide dynamic range."""
    return rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, shape))


def ulps(y: torch.Tensor, ref64: torch.Tensor) -> torch.Tensor:
    """|y - ref| in units of the float32 spacing at ref (finite entries)."""
    r32 = ref64.to(torch.float32).abs()
    spacing = (torch.nextafter(r32, torch.tensor(float("inf"))) - r32).to(torch.float64)
    return ((y.to(torch.float64) - ref64).abs() / spacing).nan_to_num(0.0)
