"""Fixed-point helpers shared by the exact primitives: float32 bit fields, powers of two and the single rounding.

Every exact primitive ends the same way: an exact integer (or an exact multi-digit integer) times a power of two,
rounded ONCE to float32 with round-to-nearest-even. Converting int64 -> float64 -> float32 would round twice, so the
float64 step uses round-to-odd (sticky bit): rounding to odd at 53 bits and then to nearest at 24 bits equals one
rounding to nearest at 24 bits (the intermediate has at least 2 more bits than the target), also for subnormal and
overflowing float32 results.

Nothing here reads libm: powers of two are built from their bit patterns.
"""

from __future__ import annotations

import torch

__all__ = [
    "IntTensor",
    "FloatTensor",
    "pow2_f64",
    "frexp_exponent_f32",
    "round_odd_int64_to_f64",
    "round_int64_scaled_to_f32",
    "round_digits_to_f32",
    "split_f32_to_bins",
    "BIN_BITS",
    "NUM_BINS",
]

IntTensor = torch.Tensor
"""An int64 (or int8/int32 where said) tensor."""
FloatTensor = torch.Tensor
"""A float32 or float64 tensor."""

BIN_BITS = 16
"""Width of one fixed-point digit of the exact accumulator (bits)."""
NUM_BINS = 16
"""Digits that hold every finite float32 as a multiple of 2**-149 (16 * 16 = 256 >= 254 + 24 - 16)."""


def pow2_f64(e: IntTensor) -> FloatTensor:
    """2.0**e as float64, built from the bit pattern (exact). `e` must lie in [-1022, 1023] (normal float64)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def frexp_exponent_f32(x: FloatTensor) -> IntTensor:
    """For finite float32 `x`: the smallest int e with |x| < 2**e (0 for x == 0), from the bit pattern.

    Subnormals are handled (their exponent comes from the leading bit of the mantissa).
    """
    d = x.to(torch.float64).abs()  # exact; float64 keeps float32 subnormals normal
    bits = d.view(torch.int64)
    e = ((bits >> 52) & 0x7FF) - 1022
    return torch.where(d == 0, torch.zeros_like(e), e)


def round_odd_int64_to_f64(v: IntTensor) -> FloatTensor:
    """int64 -> float64 rounded to odd: exact when it fits, otherwise the neighbour whose last mantissa bit is 1."""
    f = v.to(torch.float64)  # round to nearest even
    back = f.to(torch.int64)
    # f can only equal 2**63 when v is near the int64 limit; callers keep |v| < 2**62.
    r = v - back
    mant_even = (f.view(torch.int64) & 1) == 0
    nudge = (r != 0) & mant_even
    toward = torch.where(r > 0, torch.full_like(f, float("inf")), torch.full_like(f, float("-inf")))
    return torch.where(nudge, torch.nextafter(f, toward), f)


def round_int64_scaled_to_f32(v: IntTensor, exp: IntTensor) -> FloatTensor:
    """float32 nearest-even of v * 2**exp, one rounding. |v| < 2**62, exp within [-1000, 900] so float64 is exact."""
    f = round_odd_int64_to_f64(v) * pow2_f64(exp)
    return f.to(torch.float32)


def split_f32_to_bins(x: FloatTensor) -> tuple[IntTensor, IntTensor]:
    """Write finite float32 `x` exactly as v * 2**(BIN_BITS*b - 149) with int64 v (|v| < 2**39) and bin b.

    Returns (v, b). A float32 is +-m * 2**(k - 149) with a 24-bit integer m and k in [0, 253]; b = k // BIN_BITS
    and v = +-(m << (k % BIN_BITS)). Non-finite inputs must be masked out by the caller.
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    biased = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    mant = torch.where(biased > 0, mant | (1 << 23), mant)
    k = torch.clamp(biased, min=1) - 1
    v = mant << (k % BIN_BITS)
    v = torch.where(bits < 0, -v, v)
    return v, k // BIN_BITS


def _normalize_digits(d: IntTensor, base_bits: int) -> IntTensor:
    """Carry-propagate digits (last dim, least significant first) so all but the top lie in [0, 2**base_bits)."""
    cols = list(d.unbind(-1))
    mask = (1 << base_bits) - 1
    for i in range(len(cols) - 1):
        carry = cols[i] >> base_bits  # floor division, also for negatives
        cols[i] = cols[i] & mask
        cols[i + 1] = cols[i + 1] + carry
    return torch.stack(cols, dim=-1)


def round_digits_to_f32(d: IntTensor, base_bits: int, lsb_exp: int) -> FloatTensor:
    """float32 nearest-even of sum_i d[..., i] * 2**(base_bits*i + lsb_exp), one rounding.

    `d` is int64 with digits least significant first; each |d| must leave room for carries (< 2**61), and the top
    digit must be zero-padded enough to absorb the carries. 3 * base_bits must be at most 48 and 2 * base_bits at
    least 26, so three digits hold between 26 and 48 significant bits.
    """
    assert 26 <= 2 * base_bits and 3 * base_bits <= 48, "digit width outside the supported range"
    d = _normalize_digits(d, base_bits)
    negative = d[..., -1] < 0
    d = torch.where(negative.unsqueeze(-1), -d, d)
    d = _normalize_digits(d, base_bits)  # magnitude: every digit in [0, 2**base_bits)
    n = d.shape[-1]
    nonzero = d != 0
    idx = torch.arange(n, device=d.device)
    top = torch.where(nonzero, idx, torch.full_like(idx, -1)).amax(dim=-1).clamp(min=0)  # (...)
    padded = torch.cat([torch.zeros_like(d[..., :3]), d], dim=-1)  # digit i sits at i + 3
    t = top.unsqueeze(-1) + 3
    hi = (padded.gather(-1, t) << (2 * base_bits)) + (padded.gather(-1, t - 1) << base_bits) + padded.gather(-1, t - 2)
    below = torch.cumsum(nonzero.to(torch.int64), dim=-1)  # count of nonzero digits at or below i
    below_p = torch.cat([torch.zeros_like(below[..., :3]), below], dim=-1)
    sticky = (below_p.gather(-1, t - 3) > 0).to(torch.int64)
    v = (hi.squeeze(-1) << 1) | sticky.squeeze(-1)  # exact below, or odd in between: round-to-odd on 2*hi
    exp = (top - 2) * base_bits + lsb_exp - 1
    f = round_int64_scaled_to_f32(v, exp)
    return torch.where(negative, -f, f)
