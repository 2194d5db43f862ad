"""The polynomial tables of the exact transcendentals: degrees, Taylor coefficients and erf's centres.

Both implementations of each transcendental read these: the torch path (pol/exact/elementwise.py) and the compiled
kernels (pol/exact/native.py passes them to `_kernels.c`, which checks the degrees). The coefficients are computed
here with `decimal` (software arithmetic, the same on every machine) and rounded once to float64.
"""

from __future__ import annotations

import decimal
from functools import cache

__all__ = [
    "EXP_DEGREE", "LOG_TERMS", "EXPM1_DEGREE", "ERF_DEGREE", "ERF_STEP", "ERF_CENTRES", "ERF_ONE",
    "inv_factorials", "erf_table", "log_coefficients", "SIN_TERMS", "COS_TERMS", "sin_coefficients", "cos_coefficients",
]  # fmt: skip

EXP_DEGREE = 10
LOG_TERMS = 8
EXPM1_DEGREE = 12
ERF_DEGREE = 12
ERF_STEP = 0.5  # centres at 0, 0.5, ..., 4.0; |h| <= 0.25
ERF_CENTRES = 9
ERF_ONE = 4.0  # float32(erf(x)) == 1 for x >= 4


def inv_factorials(n: int) -> list[float]:
    """1/i! for i = 0..n, each correctly rounded to float64."""
    out, f = [], 1
    for i in range(n + 1):
        f = f * i if i else 1
        out.append(float(decimal.Decimal(1) / decimal.Decimal(f)))  # correctly rounded
    return out


def log_coefficients() -> list[float]:
    """1/(2i+1) for i < LOG_TERMS: the series of 2*atanh(s) / (2s) in s**2."""
    return [1.0 / (2 * i + 1) for i in range(LOG_TERMS)]


@cache
def erf_table() -> tuple[tuple[float, ...], ...]:
    """Taylor coefficients of erf around each centre c = j * ERF_STEP: erf(c + h) = sum_n a_n h**n (60 digits)."""
    ctx = decimal.Context(prec=60)
    two_over_sqrt_pi = ctx.divide(2, ctx.sqrt(ctx.create_decimal("3.14159265358979323846264338327950288419716939937510")))
    rows = []
    for j in range(ERF_CENTRES):
        c = decimal.Decimal(j) * decimal.Decimal(str(ERF_STEP))
        # erf(c) by its Maclaurin series, in 60-digit decimal
        total, term, n = decimal.Decimal(0), c, 0
        while True:
            add = ctx.divide(term, 2 * n + 1)
            total = ctx.add(total, add)
            if abs(add) < decimal.Decimal("1e-45"):
                break
            n += 1
            term = ctx.multiply(term, ctx.divide(-c * c, n))
        coeffs = [total * two_over_sqrt_pi]
        g = ctx.multiply(two_over_sqrt_pi, ctx.exp(-c * c))
        h_prev, h = decimal.Decimal(0), decimal.Decimal(1)  # H_{-1} (unused), H_0
        fact = decimal.Decimal(1)
        for k in range(1, ERF_DEGREE + 1):  # a_k = g * (-1)**(k-1) * H_{k-1}(c) / k!
            fact *= k
            coeffs.append(ctx.divide(g * (-1) ** (k - 1) * h, fact))
            h_prev, h = h, 2 * c * h - 2 * (k - 1) * h_prev
        rows.append(tuple(float(a) for a in coeffs))
    return tuple(rows)


SIN_TERMS = 9  # sin(r) = r * sum_k (-1)**k r**2k / (2k+1)!, k < SIN_TERMS: below 1e-16 relative for |r| <= pi/4
COS_TERMS = 10  # cos(r) = sum_k (-1)**k r**2k / (2k)!, k < COS_TERMS


def sin_coefficients() -> list[float]:
    """(-1)**k / (2k+1)! for k < SIN_TERMS, each correctly rounded to float64."""
    inv = inv_factorials(2 * SIN_TERMS)
    return [(-1) ** k * inv[2 * k + 1] for k in range(SIN_TERMS)]


def cos_coefficients() -> list[float]:
    """(-1)**k / (2k)! for k < COS_TERMS, each correctly rounded to float64."""
    inv = inv_factorials(2 * COS_TERMS)
    return [(-1) ** k * inv[2 * k] for k in range(COS_TERMS)]
