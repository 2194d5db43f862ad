"""Exact matrix products: float32 operands split into int8 limbs under power-of-two row/column scales.

The function computed (the *definition*; every backend gives these bits):

    e_i  = smallest integer with |a[i, k]| < 2**e_i for all k   (row scale of A; over the reduction dim)
    f_j  = smallest integer with |b[k, j]| < 2**f_j for all k   (column scale of B)
    y    = a * 2**(27 - e_i)                                     (exact; |y| < 2**27)
    A_0  = rne(y / 2**21), A_1 = rne((y - A_0 2**21) / 2**14), A_2 = rne(rest / 2**7), A_3 = rne(rest)
                                                                 (rne: round half to even; each A_s in [-64, 64])
    V    = sum_k sum_{s + t <= 4} A_s[i, k] * B_t[k, j] * 2**(7*(4 - s - t))   (an exact integer)
    c_ij = round_to_nearest_even_f32(V * 2**(e_i + f_j - 40))                  (one rounding)

So each operand is quantised to a 28-bit fixed-point number relative to its row (column) maximum, and V is the
exact product of the quantised operands without the limb pairs s + t >= 5 (13 of the 16 pairs are kept; the
dropped ones weigh below 2**-33 of max|a_i.| * max|b_.j|, and are unbiased because the digits are balanced;
dropping s + t = 4 too made wide-dynamic-range products 4x less accurate than native float32, keeping it makes them
better). Integer sums do not depend on order: neither a permutation of the reduction dimension, the thread count,
the memory layout nor the kernel can change a bit. Digits bounded by 64 keep every int8 kernel clear of int16
saturation (u8*s8 pairs: 2 * 192 * 64 < 2**15).

Non-finite inputs follow IEEE: a NaN in row i of A or column j of B, an inf times a zero, or infinities of both
signs give NaN; otherwise any infinite term gives an infinity of its sign. Finite sums beyond float32 overflow to inf.

Backends: `exact_mm_reference` (float64 split, int64 GEMMs per limb pair, round-to-odd: plain), and the fast ones
beside it: "int8" (`torch._int_mm` per diagonal s + t = d, its limb pairs side by side along K, chunked so the
int32 accumulation can never wrap) and "float64" (one float64 GEMM on small integers, batched, for K <= 2**12 so
partial sums stay below 2**53). `tests/exact` holds every backend to the reference bit for bit.

Raises `UnsupportedOperator` for dtypes other than float32 and for reduction lengths of 2**21 or more.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch

from pol.errors import UnsupportedOperator
from pol.exact import native
from pol.exact._fixed import (
    FloatTensor,
    IntTensor,
    frexp_exponent_f32,
    pow2_f64,
    round_int64_scaled_to_f32,
    round_odd_int64_to_f64,
)

__all__ = [
    "Backend",
    "NUM_LIMBS",
    "exact_mm",
    "exact_mm_reference",
    "exact_bmm",
    "split_limbs",
    "split_limbs_reference",
    "int_mm_exact",
    "INT_MM_MAX_TERMS",
]

Backend = Literal["auto", "reference", "int8", "float64"]

NUM_LIMBS = 4
LIMB_BITS = 7
FIXED_BITS = 27  # |NA| <= 2**27
MAX_DIAG = NUM_LIMBS  # keep limb pairs with s + t <= 4
SCALE_OFFSET = 2 * FIXED_BITS - (2 * (NUM_LIMBS - 1) - MAX_DIAG) * LIMB_BITS  # 40: c = V * 2**(e + f - 40)
MAX_K = 1 << 21  # |V| < K * 2**40.01 stays below 2**62
DIGIT_BOUND = 64
"""|digit| bound: pre-VNNI int8 kernels (oneDNN's u8*s8 with vpmaddubsw) saturate pair sums at 2**15; with both
operands within +-64 a pair sums at most 2 * 192 * 64 < 2**15 (full-range int8 was measured WRONG under
ONEDNN_MAX_CPU_ISA=AVX2)."""
INT_MM_MAX_TERMS = ((2**31 - 1) // (DIGIT_BOUND * DIGIT_BOUND)) // 8 * 8
"""Largest K chunk whose int32 accumulation of products of +-64 operands can never wrap."""
PAIRS = tuple((s, t) for s in range(NUM_LIMBS) for t in range(NUM_LIMBS) if s + t <= MAX_DIAG)


def _verify_operands(name: str, a: FloatTensor, b: FloatTensor) -> None:
    """Raise UnsupportedOperator unless both are float32 and the reduction length is below 2**21."""
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise UnsupportedOperator(name, f"exact products take float32 operands, got {a.dtype} and {b.dtype}")
    if a.shape[-1] >= MAX_K:
        raise UnsupportedOperator(name, f"reduction length {a.shape[-1]} is 2**21 or more")


def _row_exponent(x: FloatTensor, dim: int) -> IntTensor:
    """Smallest e with |x| < 2**e along `dim` (kept, size 1); 0 for all-zero or empty slices."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        shape[dim] = 1
        return torch.zeros(shape, dtype=torch.int64, device=x.device)
    return frexp_exponent_f32(x.abs().amax(dim=dim, keepdim=True))


def split_limbs_reference(x: FloatTensor, dim: int) -> tuple[IntTensor, IntTensor]:
    """The plain split (float64, exact): returns (digits int64 (NUM_LIMBS, ...), e) as in the module docstring.

    Non-finite entries must be zeroed by the caller.
    """
    e = _row_exponent(x, dim)
    y = x.to(torch.float64) * pow2_f64(FIXED_BITS - e)
    digits = []
    for s in range(NUM_LIMBS - 1):
        unit = float(1 << (LIMB_BITS * (NUM_LIMBS - 1 - s)))
        d = torch.round(y / unit)
        y = y - d * unit
        digits.append(d)
    digits.append(torch.round(y))
    return torch.stack(digits).to(torch.int64), e


def _pow2_f32(e: IntTensor) -> FloatTensor:
    """2.0**e as float32 from its bit pattern; e in [-126, 127]."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def split_limbs(x: FloatTensor, dim: int) -> tuple[IntTensor, IntTensor]:
    """Same digits as `split_limbs_reference`, computed in float32: returns (int8 digits, e).

    x * 2**(27 - e) is applied as two power-of-two factors (each a normal float32); the result is exact wherever
    |y| >= 2**-126, and below that its digits are 0 either way. Every remainder y - d * 2**k is exact.
    """
    e = _row_exponent(x, dim)
    s = FIXED_BITS - e
    s1 = torch.div(s, 2, rounding_mode="floor")
    y = (x * _pow2_f32(s1)) * _pow2_f32(s - s1)
    digits = []
    for k in range(NUM_LIMBS - 1):
        shift = LIMB_BITS * (NUM_LIMBS - 1 - k)
        d = torch.round(y * (2.0**-shift))
        y = y - d * float(1 << shift)
        digits.append(d)
    digits.append(torch.round(y))
    return torch.stack(digits).to(torch.int8), e


def _nonfinite_mask(a: FloatTensor, b: FloatTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IEEE outcome of sum_k a[..., i, k] * b[..., k, j] where non-finite: (is_nan, is_pos_inf, is_neg_inf)."""

    def mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # counts of 0/1 indicators: exact in float64
        return torch.matmul(x.to(torch.float64), y.to(torch.float64))

    ones_b = torch.ones_like(b[..., :1, :], dtype=torch.float64)
    ones_a = torch.ones_like(a[..., :, :1], dtype=torch.float64)
    nan = (mm(torch.isnan(a).any(-1, keepdim=True), ones_b) > 0) | (mm(ones_a, torch.isnan(b).any(-2, keepdim=True)) > 0)
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    nan = nan | (mm(inf_a, b == 0) > 0) | (mm(a == 0, inf_b) > 0)
    pa, na, pb, nb = a > 0, a < 0, b > 0, b < 0
    pfa, nfa, pfb, nfb = pa & ~inf_a, na & ~inf_a, pb & ~inf_b, nb & ~inf_b
    pos = mm(pa, pb) - mm(pfa, pfb) + mm(na, nb) - mm(nfa, nfb)
    neg = mm(pa, nb) - mm(pfa, nfb) + mm(na, pb) - mm(nfa, pfb)
    nan = nan | ((pos > 0) & (neg > 0))
    return nan, (pos > 0) & ~nan, (neg > 0) & ~nan


def _apply_nonfinite(c: FloatTensor, a: FloatTensor, b: FloatTensor) -> FloatTensor:
    """Overwrite the entries of the finite-part result `c` that IEEE makes NaN or infinite."""
    if bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()):
        return c
    nan, pos, neg = _nonfinite_mask(a, b)
    c = torch.where(pos, torch.full_like(c, float("inf")), c)
    c = torch.where(neg, torch.full_like(c, float("-inf")), c)
    return torch.where(nan, torch.full_like(c, float("nan")), c)


def _finite(x: FloatTensor) -> FloatTensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _limb_products_reference(da: IntTensor, db: IntTensor) -> IntTensor:
    """V = sum_{s+t<=4} A_s @ B_t * 2**(7*(4-s-t)) with int64 GEMMs (plain reference)."""
    v = None
    for s, t in PAIRS:
        p = torch.matmul(da[s].to(torch.int64), db[t].to(torch.int64)) << (LIMB_BITS * (MAX_DIAG - s - t))
        v = p if v is None else v + p
    assert v is not None
    return v


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor to at least `rows` rows and to `cols`-multiple columns... (exact sizes given)."""
    if x.shape == (rows, cols):
        return x.contiguous()
    out = torch.zeros((rows, cols), dtype=x.dtype, device=x.device)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def int_mm_exact(a: IntTensor, b: IntTensor) -> IntTensor:
    """Exact int64 product of int8 matrices (M, K) @ (K, N) with entries in [-64, 64], via `torch._int_mm`.

    `_int_mm` wants M > 16 and K, N multiples of 8 (on CUDA; padded here everywhere) and accumulates in int32, which
    wraps silently: K is cut into chunks of at most INT_MM_MAX_TERMS terms, each chunk's int32 result widened to
    int64 before the chunks are added. Raises UnsupportedOperator for entries beyond +-64 (see DIGIT_BOUND).
    """
    for x in (a, b):
        if x.numel() and int(x.to(torch.int16).abs().amax()) > DIGIT_BOUND:  # int8 abs(-128) wraps: widen first
            raise UnsupportedOperator("aten._int_mm", "int8 entries beyond +-64 can saturate pre-VNNI int8 kernels")
    m, k = a.shape
    n = b.shape[1]
    mp, np_ = max(m, 17), _round_up(max(n, 8), 8)
    out = torch.zeros((m, n), dtype=torch.int64, device=a.device)
    for k0 in range(0, k, INT_MM_MAX_TERMS):
        k1 = min(k, k0 + INT_MM_MAX_TERMS)
        kp = _round_up(max(k1 - k0, 8), 8)
        r = torch._int_mm(_pad_to(a[:, k0:k1], mp, kp), _pad_to(b[k0:k1], kp, np_))
        out += r[:m, :n].to(torch.int64)
    return out


DIAG_CHUNK = 1 << 15
"""K chunk of the int8 backend: a diagonal sums at most 4 pairs of |digit products| <= 2**12 over 4 * 2**15 terms,
which stays below 2**31 (no int32 wrap)."""
F64_MAX_K = 1 << 12
"""Up to this K, |V| < K * 2**40.01 < 2**53: the float64 backend's GEMM and the float64 combine are exact."""


def _diagonal_int8(da: IntTensor, db: IntTensor, d: int, k0: int, k1: int) -> torch.Tensor:
    """sum_{s+t=d} A_s @ B_t over K range [k0, k1) as ONE `_int_mm` (pairs side by side along K), int32 result."""
    m, n = da.shape[1], db.shape[2]
    ss = range(max(0, d - NUM_LIMBS + 1), min(d, NUM_LIMBS - 1) + 1)
    left = torch.cat([da[s][:, k0:k1] for s in ss], dim=1)
    right = torch.cat([db[d - s][k0:k1] for s in ss], dim=0)
    kk = left.shape[1]
    mp, kp, np_ = max(m, 17), _round_up(max(kk, 8), 8), _round_up(max(n, 8), 8)
    return torch._int_mm(_pad_to(left, mp, kp), _pad_to(right, kp, np_))[:m, :n]


def _limb_products_int8(da: IntTensor, db: IntTensor) -> torch.Tensor:
    """Same V as the reference (2-D): Horner over the 5 diagonals, each one int8 GEMM per K chunk.

    Returns V as an exact float64 when K <= F64_MAX_K (|V| < 2**53: every step is an exact integer operation),
    else as int64.
    """
    k = da.shape[-1]
    wide = k > F64_MAX_K
    v: torch.Tensor | None = None
    for k0 in range(0, max(k, 1), DIAG_CHUNK):
        k1 = min(k, k0 + DIAG_CHUNK)
        part = _diagonal_int8(da, db, 0, k0, k1).to(torch.int64 if wide else torch.float64)
        for d in range(1, MAX_DIAG + 1):
            part.mul_(1 << LIMB_BITS).add_(_diagonal_int8(da, db, d, k0, k1))
        v = part if v is None else v.add_(part)
    assert v is not None
    return v


def _limb_products_f64(da: IntTensor, db: IntTensor) -> FloatTensor:
    """Same V as the reference (batched allowed, K <= F64_MAX_K), as an exact float64 from ONE float64 GEMM:
    V = [A_0 .. A_3] @ [C_0; ..; C_3] along K, with C_s = sum_{t <= min(3, 4-s)} B_t * 2**(7*(4-s-t)).
    Every partial sum is an integer below 2**53, so the GEMM is exact whatever its order or FMA use.
    """
    bl = [db[t].to(torch.float64) for t in range(NUM_LIMBS)]
    cs = []
    for s in range(NUM_LIMBS):
        c = torch.zeros_like(bl[0])
        for t in range(min(NUM_LIMBS - 1, MAX_DIAG - s) + 1):
            c = c + bl[t] * float(1 << (LIMB_BITS * (MAX_DIAG - s - t)))
        cs.append(c)
    left = torch.cat([da[s].to(torch.float64) for s in range(NUM_LIMBS)], dim=-1)
    right = torch.cat(cs, dim=-2)
    return torch.matmul(left, right)


@cache
def _fast_int8_gemm() -> bool:
    """Whether `torch._int_mm` has a fast CPU kernel here: with AVX-512 (VNNI) yes; on an AVX2 CPU it was measured
    at 1 thread 60x slower than one float64 GEMM on the same limbs (63 against 1.1 ms at 256x256x64). Speed only."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _choose_backend(m: int, k: int, n: int, batched: bool) -> Backend:
    """Fewest operator launches for small products, int8 GEMMs for large ones (measured on CPU): one float64 GEMM
    for small batched products and for 2-D products with a short reduction, else int8 GEMMs where they are fast,
    else one float64 GEMM wherever it is exact (K <= 2**12)."""
    if batched and m * n * k < (1 << 21) and k <= F64_MAX_K:
        return "float64"
    if k <= 64 and m * n * k < (1 << 20):
        return "float64"
    return "int8" if _fast_int8_gemm() or k > F64_MAX_K else "float64"


def _all_finite(*xs: FloatTensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def _product_reference(a: FloatTensor, b: FloatTensor) -> FloatTensor:
    """The definition, plainly: float64 split, int64 limb GEMMs, round-to-odd, IEEE special values."""
    da, ea = split_limbs_reference(_finite(a), dim=-1)
    db, eb = split_limbs_reference(_finite(b), dim=-2)
    v = _limb_products_reference(da, db)
    c = round_int64_scaled_to_f32(v, ea + eb - SCALE_OFFSET)
    return _apply_nonfinite(c, a, b)


def _product_fast(a: FloatTensor, b: FloatTensor, backend: Backend) -> FloatTensor:
    """The definition with a fast backend (float64 needs K <= F64_MAX_K; int8 loops over batch entries)."""
    if backend == "auto":
        fused = native.product(a, b)  # the same bits from C splits, one float64 GEMM and a C combine
        if fused is not None:
            return fused
    finite = _all_finite(a, b)
    k = a.shape[-1]
    da, ea = split_limbs(a if finite else _finite(a), dim=-1)
    db, eb = split_limbs(b if finite else _finite(b), dim=-2)
    batched = a.dim() > 2
    if backend == "auto":
        backend = _choose_backend(a.shape[-2], k, b.shape[-1], batched)
    if backend == "float64" and k > F64_MAX_K:
        backend = "int8"
    if backend == "float64":
        v64 = _limb_products_f64(da, db) + 0.0  # exact integers below 2**53; + 0.0 makes a zero +0 as V's is
    else:
        if batched:
            v = torch.stack([_limb_products_int8(da[:, i], db[:, i]) for i in range(a.shape[0])])
        else:
            v = _limb_products_int8(da, db)
        v64 = v if v.dtype == torch.float64 else round_odd_int64_to_f64(v)
    c = ((v64 * pow2_f64(ea - SCALE_OFFSET)) * pow2_f64(eb)).to(torch.float32)  # exact scalings, one rounding
    return c if finite else _apply_nonfinite(c, a, b)


def _exact_product(a: FloatTensor, b: FloatTensor, backend: Backend) -> FloatTensor:
    """The defined product over the last two dims (batch dims must match); see the module docstring."""
    if backend == "reference":
        return _product_reference(a, b)
    return _product_fast(a, b, backend)


def exact_mm_reference(a: FloatTensor, b: FloatTensor) -> FloatTensor:
    """(M, K) @ (K, N) float32, the plain reference of the defined exact product (int64 GEMMs).

    Raises UnsupportedOperator for non-float32 operands or K >= 2**21.
    """
    _verify_operands("aten.mm", a, b)
    return _exact_product(a, b, "reference")


def exact_mm(a: FloatTensor, b: FloatTensor, backend: Backend = "auto") -> FloatTensor:
    """(M, K) @ (K, N) float32 exactly as defined in the module docstring, with a fast backend.

    Raises UnsupportedOperator for non-float32 operands, non-2-D shapes or K >= 2**21.
    """
    _verify_operands("aten.mm", a, b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise UnsupportedOperator("aten.mm", f"shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    return _exact_product(a, b, backend)


def exact_bmm(a: FloatTensor, b: FloatTensor, backend: Backend = "auto") -> FloatTensor:
    """(B, M, K) @ (B, K, N) float32, each batch entry exactly as `exact_mm`.

    Raises UnsupportedOperator for non-float32 operands, non-3-D shapes or K >= 2**21.
    """
    _verify_operands("aten.bmm", a, b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise UnsupportedOperator("aten.bmm", f"shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    return _exact_product(a, b, backend)
