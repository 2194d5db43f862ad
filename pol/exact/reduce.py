"""Exact reductions: every float32 is an integer multiple of 2**-149, so sums are accumulated exactly in int64
fixed-point digits (16 bits each, one digit per exponent bin) and rounded ONCE to float32.

    x = v * 2**(16*b - 149)  with |v| < 2**39 and bin b in [0, 15]       (`split_f32_to_bins`)
    S[target, b] += v        (int64 index_add: order-free, so thread count, layout and device cannot matter)
    result = round_nearest_even_f32(sum_b S[target, b] * 2**(16*b - 149))   (`round_digits_to_f32`)

Up to 2**22 terms go into one pass; longer reductions are folded in passes with a carry step between them.
IEEE special values: any NaN, or infinities of both signs, give NaN; otherwise an infinity wins; a sum of only
negative zeros is -0; exact sums beyond the float32 range overflow to +-inf.

Raises `UnsupportedOperator` for dtypes other than float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pol.errors import UnsupportedOperator
from pol.exact import native
from pol.exact._fixed import (
    BIN_BITS,
    FloatTensor,
    IntTensor,
    _normalize_digits,
    frexp_exponent_f32,
    pow2_f64,
    round_digits_to_f32,
    split_f32_to_bins,
)

__all__ = [
    "accumulate_digits_dense",
    "sum_into_slots",
    "exact_sum",
    "exact_mean",
    "exact_index_add",
    "exact_scatter_add",
    "exact_cumsum",
    "accumulate_digits",
    "digits_to_f32",
    "Window",
    "compute_exponent_codes",
    "compute_block_codes",
    "get_element_codes",
    "compute_window_sums",
    "compute_window_rounding",
]

PASS_TERMS = 1 << 22
LSB_EXP = -149


def _verify_float32(name: str, *xs: torch.Tensor) -> None:
    for x in xs:
        if x.dtype != torch.float32:
            raise UnsupportedOperator(name, f"exact reductions take float32, got {x.dtype}")


def accumulate_digits(x: FloatTensor, target: IntTensor, num_targets: int) -> tuple[IntTensor, int]:
    """Exact fixed-point sums of finite 1-D float32 `x` into slots `target` (int64).

    Returns (digits, lo): digits (num_targets, n) int64, least significant first, digit j weighing
    2**(16*(lo + j) - 149). Only the bins that occur (plus 3 carry digits) are kept; the value does not depend on it.
    """
    v, b = split_f32_to_bins(x)
    lo = int(b.min()) if x.numel() else 0
    hi = int(b.max()) if x.numel() else 0
    n = hi - lo + 1 + 3  # 2**22 terms below 2**39 sum below 2**61: three carry digits suffice
    slot = target * n + (b - lo)
    acc = torch.zeros(num_targets * n, dtype=torch.int64, device=x.device)
    for i0 in range(0, x.numel(), PASS_TERMS):
        acc.index_add_(0, slot[i0 : i0 + PASS_TERMS], v[i0 : i0 + PASS_TERMS])
        if x.numel() > PASS_TERMS:
            acc = _normalize_digits(acc.view(num_targets, n), BIN_BITS).reshape(-1)
    return acc.view(num_targets, n), lo


DENSE_MIN_NUMEL = 1 << 16
"""From this size on, `exact_sum` uses the dense per-bin path (fewer passes over memory); below, the scatter path
(fewer operator launches). Both give the same digits, hence the same bits (tested)."""
DENSE_TERMS = 1 << 13
"""Terms per dense pass: bin-j values are multiples of 2**(16j - 149) below 2**(16j - 149 + 40), so 2**13 of them
sum exactly in float64 in any order (below 2**53 units)."""


def accumulate_digits_dense(x: FloatTensor) -> tuple[IntTensor, int]:
    """Exact row sums of finite 2-D float32 `x` (outer, R) as digits (outer, n), like `accumulate_digits`.

    Per exponent bin j that occurs: a float64 sum of the row's bin-j entries (exact, see DENSE_TERMS), scaled to an
    integer count of 2**(16j - 149). No scatter: every step is a dense, order-free exact operation.
    """
    bits = x.view(torch.int32)
    bins = (torch.clamp((bits >> 23) & 0xFF, min=1) - 1) // BIN_BITS
    lo = int(bins.min()) if x.numel() else 0
    hi = int(bins.max()) if x.numel() else 0
    x64 = x.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    cols = []
    for j in range(lo, hi + 1):
        in_bin = torch.where(bins == j, x64, zero)
        total = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        for r0 in range(0, max(x.shape[1], 1), DENSE_TERMS):
            part = in_bin[:, r0 : r0 + DENSE_TERMS].sum(dim=1)  # exact
            total += (part * 2.0 ** (-LSB_EXP - BIN_BITS * j)).to(torch.int64)  # exact integer below 2**53
        cols.append(total)
    pad = torch.zeros(x.shape[0], 3, dtype=torch.int64, device=x.device)
    return torch.cat([torch.stack(cols, dim=1), pad], dim=1), lo


def digits_to_f32(d: IntTensor, lo: int) -> FloatTensor:
    """Round exact accumulator digits (..., n) whose digit 0 weighs 2**(16*lo - 149) to float32, once."""
    return round_digits_to_f32(d, BIN_BITS, LSB_EXP + BIN_BITS * lo)


def _counts(mask: torch.Tensor, target: IntTensor, num_targets: int) -> IntTensor:
    return torch.zeros(num_targets, dtype=torch.int64, device=mask.device).index_add_(0, target, mask.to(torch.int64))


def _sum_by_target(x: FloatTensor, target: IntTensor, num_targets: int, init: FloatTensor | None) -> FloatTensor:
    """sum of x[i] into slot target[i] (plus `init[t]` when given), one rounding, IEEE special values."""
    if init is not None:
        x = torch.cat([init.reshape(-1), x])
        target = torch.cat([torch.arange(num_targets, device=x.device), target])
    fused = native.sum_slots(x, target, num_targets)  # the same bits from one C call, where the kernels are built
    if fused is not None:
        return fused
    finite = bool(torch.isfinite(x).all())
    digits, lo = accumulate_digits(x if finite else torch.where(torch.isfinite(x), x, torch.zeros_like(x)), target, num_targets)
    out = digits_to_f32(digits, lo)
    zero = out == 0
    if bool(zero.any()):  # IEEE: a sum of negative zeros only is -0
        negzero = _counts((x == 0) & torch.signbit(x), target, num_targets)
        terms = _counts(torch.ones_like(target, dtype=torch.bool), target, num_targets)
        out = torch.where(zero & (terms > 0) & (negzero == terms), torch.full_like(out, -0.0), out)
    if finite:
        return out
    nan = _counts(torch.isnan(x), target, num_targets)
    pinf = _counts(x == float("inf"), target, num_targets)
    ninf = _counts(x == float("-inf"), target, num_targets)
    out = torch.where(pinf > 0, torch.full_like(out, float("inf")), out)
    out = torch.where(ninf > 0, torch.full_like(out, float("-inf")), out)
    bad = (nan > 0) | ((pinf > 0) & (ninf > 0))
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def sum_into_slots(x: FloatTensor, target: IntTensor, num_targets: int) -> FloatTensor:
    """out[t] = exact sum of x[i] over target[i] == t, rounded once (1-D float32 `x`, int64 `target`).

    Raises UnsupportedOperator for non-float32 `x`.
    """
    _verify_float32("aten.index_put", x)
    return _sum_by_target(x, target, num_targets, None)


def _narrow_rowsum_f64(flat: FloatTensor) -> FloatTensor | None:
    """Exact float64 row sums of 2-D float32 `flat` when a plain float64 sum is provably exact, else None.

    An entry with biased exponent E (1 for subnormals) is a multiple of 2**(E - 150) below 2**(E - 126). If a row's
    nonzero entries span Emax - Emin <= 29 - ceil(log2(R)) binades, every partial sum is a multiple of the row's
    smallest unit below 2**53 of them: float64 adds it exactly in ANY order. Non-finite rows return None.
    """
    r = flat.shape[1]
    if r == 0 or flat.numel() == 0:
        return None
    biased = (flat.view(torch.int32) >> 23) & 0xFF
    if bool((biased == 0xFF).any()):
        return None
    e = torch.clamp(biased, min=1)
    nonzero = flat != 0
    emax = torch.where(nonzero, e, torch.zeros_like(e)).amax(dim=1)
    emin = torch.where(nonzero, e, torch.full_like(e, 255)).amin(dim=1)
    budget = 29 - (r - 1).bit_length()
    if not bool(((emax - emin) <= budget).all()):
        return None
    return flat.to(torch.float64).sum(dim=1)


def _narrow_sum_f64(flat: FloatTensor) -> FloatTensor | None:
    """Row sums of 2-D float32 `flat` by a plain float64 sum when that sum is provably exact (see
    `_narrow_rowsum_f64`), rounded once to float32; else None. The result equals the general path's bit for bit
    (both are the exact sum rounded once), so choosing a path never changes a result.
    """
    exact = _narrow_rowsum_f64(flat)
    return None if exact is None else exact.to(torch.float32)


def _two_level_sum_f64(flat: FloatTensor) -> FloatTensor | None:
    """Row sums of finite 2-D float32 `flat` from two exact float64 sums, or None when the second is not exact.

    Level one rounds each entry to a multiple of u = 2**(E - 53 + b), E the row's max exponent (|x| < 2**E) and
    R < 2**b the row length: those multiples are integers below 2**(53 - b) in units of u, so their sum is exact in
    float64. The remainders x - hi are exact (the float32 bits of x below u) and sum exactly whenever their binades
    are narrow enough (`_narrow_sum_f64`'s rule). The exact total H + L is rounded once: TwoSum gives s + e = H + L,
    round-to-odd folds e into s's last bit, and the float32 conversion is the one rounding. The result is the
    exact sum rounded once, the same bits as every other path; this one covers rows spanning some 60 binades with
    a few dozen operator launches instead of a digit accumulator's hundreds.
    """
    r = flat.shape[1]
    if r == 0 or flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        return None
    b = r.bit_length()
    x = flat.to(torch.float64)
    e = frexp_exponent_f32(flat.abs().amax(dim=1, keepdim=True))
    down = pow2_f64(53 - b - e)  # 1 / u, exact
    q = torch.round(x * down)  # integers, |q| <= 2**(53 - b)
    hi_units = q.sum(dim=1, keepdim=True)  # exact: |sum| <= R * 2**(53 - b) <= 2**53
    lo = x - q / down  # exact: the bits of x below u (a float32 value)
    low = _narrow_rowsum_f64(lo.to(torch.float32))
    if low is None:
        return None
    high = (hi_units / down).squeeze(1)
    s = high + low
    bb = s - high
    err = (high - (s - bb)) + (low - bb)  # s + err == high + low exactly (Knuth's TwoSum)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even, torch.nextafter(s, toward), s)  # round to odd: one rounding left
    return s.to(torch.float32)


def _negative_zero_rows(flat: FloatTensor, out: FloatTensor) -> FloatTensor:
    """IEEE: a row summing to zero whose terms are all -0 (and that has terms) sums to -0."""
    zero = out == 0
    if flat.shape[1] == 0 or not bool(zero.any()):
        return out
    all_negzero = ((flat == 0) & torch.signbit(flat)).all(dim=1)
    return torch.where(zero & all_negzero, torch.full_like(out, -0.0), out)


def _normalize_dims(x: torch.Tensor, dims: Sequence[int] | int | None) -> list[int]:
    if dims is None or (isinstance(dims, Sequence) and len(dims) == 0):
        return list(range(x.dim()))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % max(x.dim(), 1) for d in dims})


def _row_sums(flat: FloatTensor, outer: int) -> FloatTensor:
    """Exact row sums of 2-D float32 `flat`, each rounded once: the fused kernel where it is built, else the
    cheapest torch path that is exact for these rows. Every path gives the same bits (tested)."""
    fused = native.sum_rows(flat)
    if fused is not None:
        return fused
    narrow = _narrow_sum_f64(flat)
    if narrow is None:
        narrow = _two_level_sum_f64(flat)
    if narrow is not None:
        return _negative_zero_rows(flat, narrow)
    if flat.numel() >= DENSE_MIN_NUMEL and flat.shape[1] < PASS_TERMS and bool(torch.isfinite(flat).all()):
        return _negative_zero_rows(flat, digits_to_f32(*accumulate_digits_dense(flat)))
    target = torch.arange(outer, device=flat.device).unsqueeze(1).expand_as(flat).reshape(-1)
    return _sum_by_target(flat.reshape(-1), target, outer, None)


def exact_sum(x: FloatTensor, dims: Sequence[int] | int | None = None, keepdim: bool = False) -> FloatTensor:
    """Sum of float32 `x` over `dims` (all when None or empty), exact and rounded once.

    Raises UnsupportedOperator for non-float32 input.
    """
    _verify_float32("aten.sum", x)
    if x.dim() == 0:
        return _sum_by_target(x.reshape(1), torch.zeros(1, dtype=torch.int64, device=x.device), 1, None).reshape(())
    red = _normalize_dims(x, dims)
    keep = [d for d in range(x.dim()) if d not in red]
    moved = x.permute(*keep, *red)
    outer_shape = [x.shape[d] for d in keep]
    outer = 1
    for s in outer_shape:
        outer *= s
    flat = moved.reshape(outer, -1)
    out = _row_sums(flat, outer)
    out = out.reshape(outer_shape)
    if keepdim:
        for d in red:
            out = out.unsqueeze(d)
    return out


def exact_mean(x: FloatTensor, dims: Sequence[int] | int | None = None, keepdim: bool = False) -> FloatTensor:
    """exact_sum(x, dims) / count: the sum rounded once, then one IEEE division.

    Raises UnsupportedOperator for non-float32 input.
    """
    red = _normalize_dims(x, dims)
    count = 1
    for d in red:
        count *= x.shape[d] if x.dim() else 1
    return exact_sum(x, dims, keepdim) / count


def exact_index_add(base: FloatTensor, dim: int, index: IntTensor, src: FloatTensor) -> FloatTensor:
    """base.index_add(dim, index, src) with every output slot an exact sum rounded once (base value included).

    Raises UnsupportedOperator for non-float32 tensors.
    """
    _verify_float32("aten.index_add", base, src)
    dim = dim % max(base.dim(), 1)
    b = base.movedim(dim, 0)
    s = src.movedim(dim, 0)
    rest = b[0].numel() if b.shape[0] else int(torch.tensor(b.shape[1:]).prod().item())
    slots = index.to(torch.int64).unsqueeze(1) * rest + torch.arange(rest, device=base.device)
    out = _sum_by_target(s.reshape(-1), slots.reshape(-1), b.numel(), b.reshape(-1))
    return out.reshape(b.shape).movedim(0, dim).contiguous()


def exact_scatter_add(base: FloatTensor, dim: int, index: IntTensor, src: FloatTensor) -> FloatTensor:
    """base.scatter_add(dim, index, src), every output slot an exact sum rounded once (base value included).

    Raises UnsupportedOperator for non-float32 tensors.
    """
    _verify_float32("aten.scatter_add", base, src)
    dim = dim % max(base.dim(), 1)
    src = src[tuple(slice(0, n) for n in index.shape)]
    strides = torch.ones(base.dim(), dtype=torch.int64)
    for d in range(base.dim() - 2, -1, -1):
        strides[d] = strides[d + 1] * base.shape[d + 1]
    flat = torch.zeros(index.shape, dtype=torch.int64, device=base.device)
    for d in range(base.dim()):
        coord = index.to(torch.int64) if d == dim else torch.arange(index.shape[d], device=base.device)
        if d != dim:
            coord = coord.view([-1 if i == d else 1 for i in range(index.dim())])
        flat = flat + coord * int(strides[d])
    out = _sum_by_target(src.reshape(-1), flat.reshape(-1), base.numel(), base.reshape(-1))
    return out.reshape(base.shape)


CUMSUM_BLOCK = 1 << 22
"""Prefix-sum terms materialised at once by `exact_cumsum` (rows of prefixes are taken in blocks of this size)."""


def exact_cumsum(x: FloatTensor, dim: int) -> FloatTensor:
    """torch.cumsum(x, dim) with every prefix an exact sum rounded once (not a chain of roundings): prefix j is
    exact_sum of x[..., :j + 1], the rest of its row filled with -0 (which changes no sum, -0 included).

    Raises UnsupportedOperator for non-float32 input."""
    _verify_float32("aten.cumsum", x)
    if x.dim() == 0:
        return x.clone()
    dim = dim % x.dim()
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    if moved.numel() == 0:
        return x.clone()
    keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # (j, i): term i in prefix j
    step = max(1, CUMSUM_BLOCK // max(moved.numel(), 1))
    parts = [exact_sum(torch.where(keep[j0 : j0 + step], moved.unsqueeze(-2), -0.0), [-1]) for j0 in range(0, n, step)]
    return torch.cat(parts, -1).movedim(-1, dim).contiguous()


# -- a compact exact all-reduce: an exponent code, then one int64 per element ------------------------------------
#
# Sum M float32 terms per element, held by several processes, with two integer all-reduces whose results do not
# depend on the reduction order (MAX, then SUM), and round the sum once. The window sums are exact for most
# elements; the few they cannot round are flagged (identically on every process) for an exact path.

CODE_SPECIAL = 255
"""Exponent code of a non-finite term (and of a term with biased exponent 254): such a sum takes another path."""
WINDOW_BITS = 62
NEGATIVE_ZERO_BITS = -(1 << 31)  # -0.0's float32 bit pattern, as an int32
"""Bits of an int64 a window sum may use: |sum| < 2**62, one bit of headroom below int64's sign."""


@dataclass(frozen=True, slots=True)
class Window:
    """How M terms per element are cut into int64 units (`compute_window_sums`), h = bitlength(M).

    The int64's low bits count, per element, the terms cut inexactly (h bits: the bound on the sum's error) and,
    with `counts`, the terms that are not -0 (h bits: an exact zero sum is -0 only if none is): needed when one
    exponent code covers a block of elements (one code per element says it). The value part has `width` bits per
    term: |term| < 2**width units, so M terms sum below 2**(62 - low) units."""

    terms: int  # M: the terms per element over all processes (the step's micro-batches; spec-known)
    counts: bool

    @property
    def h(self) -> int:
        return self.terms.bit_length()

    @property
    def low(self) -> int:
        return 2 * self.h if self.counts else self.h

    @property
    def width(self) -> int:
        return WINDOW_BITS - self.h - self.low


def compute_exponent_codes(x: FloatTensor) -> torch.Tensor:
    """Per row of 2-D float32 `x` (elements, terms): the MAX over the row of a uint8 code, monotone in a term's
    scale: 0 for -0, 1 for +0, 1 + max(biased exponent, 1) for a nonzero finite term (subnormals share biased
    exponent 1's scale), `CODE_SPECIAL` for inf/NaN and biased exponent 254. MAX over any grouping of the terms
    (processes, micro-batches, a block of elements) is the code of the largest term."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.uint8, device=x.device)
    bits = x.view(torch.int32)
    largest = (bits & 0x7FFFFFFF).amax(dim=1)  # the largest magnitude's bits: the largest code (NaN's above inf's)
    biased = largest >> 23
    plus = (bits == 0).any(dim=1)
    code = torch.where(largest == 0, plus.to(torch.int32), torch.clamp(biased, min=1) + 1)
    return torch.clamp(code, max=CODE_SPECIAL).to(torch.uint8)


def compute_block_codes(codes: torch.Tensor, block: int) -> torch.Tensor:
    """MAX of uint8 `codes` over consecutive blocks of `block` elements (the last one short)."""
    pad = (-codes.numel()) % block
    padded = torch.cat([codes, torch.zeros(pad, dtype=codes.dtype, device=codes.device)])
    return padded.view(-1, block).amax(dim=1)


def get_element_codes(blocks: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    """Each element's code (int64) from its block's code."""
    return blocks.to(torch.int64).repeat_interleave(block)[:numel]


def _window_unit_exponent(code: IntTensor, window: Window) -> IntTensor:
    """k with the window's unit u = 2**k: the largest term is below 2**(emax - 126) = 2**width units."""
    return torch.clamp(code - 1, min=1) - 126 - window.width


def compute_window_sums(x: FloatTensor, code: IntTensor, window: Window) -> IntTensor:
    """Per row of finite 2-D float32 `x` (elements, terms): sum over the row of trunc(term / u), u = 2**k from the
    row's code (`code`: int64, at least the code of every term of the element on every process), shifted up by
    `window.low` bits that count the terms cut inexactly (and, with `window.counts`, the terms that are not -0).
    term / u is exact in float64 (a power-of-two scaling, below 2**width and far above float64's smallest normal),
    so trunc is exact. These int64 add as integers: any order."""
    scaled = x.to(torch.float64) * pow2_f64(-_window_unit_exponent(code, window)).unsqueeze(1)
    whole = torch.trunc(scaled)
    total = whole.to(torch.int64).sum(dim=1)
    low = (scaled != whole).sum(dim=1)  # terms whose bits below u were dropped
    if window.counts:
        low = (low << window.h) + (x.view(torch.int32) != NEGATIVE_ZERO_BITS).sum(dim=1)
    return total * (1 << window.low) + low


def _round_to_f32(n: IntTensor, k: IntTensor) -> FloatTensor:
    """float32 of n * 2**k (int64 |n| < 2**63 - 2**10, k in [-1022 + 63, 1023 - 63]) rounded once to nearest even:
    n to float64 rounded to odd (53 bits, the sticky bit kept), an exact power-of-two scaling, then the one
    rounding to float32 (53 >= 24 + 2 bits: rounding to odd first does not change it; subnormals and overflow
    included)."""
    r = n.to(torch.float64)
    inexact = (n - r.to(torch.int64)) != 0
    toward = torch.where(n > r.to(torch.int64), float("inf"), float("-inf")).to(torch.float64)
    r = torch.where(inexact & ((r.view(torch.int64) & 1) == 0), torch.nextafter(r, toward), r)
    return (r * pow2_f64(k)).to(torch.float32)


def compute_window_rounding(total: IntTensor, code: IntTensor, window: Window) -> tuple[FloatTensor, torch.Tensor]:
    """float32 of all-reduced `compute_window_sums` (int64, every process's terms) and a SAFE mask: where it is
    True, the value is the exact sum of the terms rounded once to nearest even (`exact_sum`'s bits, signed zeros
    and overflow included); where False, another exact path must sum that element.

    The window sum H (in units u = 2**k) misses the bits below u of the C terms cut inexactly, under one unit
    each: the exact sum S lies in ((H - C)*u, (H + C)*u). Rounding is monotone, so where both ends round to the
    same float32, S rounds to it too (C = 0: S = H*u). Unsafe: the ends round apart (a rounding tie or midpoint
    within C units, a cancellation among cut terms). A zero sum with nothing cut is -0 only if every term was -0.
    """
    h = window.h
    low = total & ((1 << window.low) - 1)
    hsum = total >> window.low
    if window.counts:
        cut, plus = low >> h, (low & ((1 << h) - 1)) > 0
    else:
        cut, plus = low, code >= 1
    k = _window_unit_exponent(code, window)
    below = _round_to_f32(hsum - cut, k)
    safe = torch.ones_like(cut, dtype=torch.bool)
    was_cut = torch.nonzero(cut).reshape(-1)  # few: a term is cut only some 30 binades below its block's largest
    if was_cut.numel():
        above = _round_to_f32(hsum[was_cut] + cut[was_cut], k[was_cut])
        safe = safe.index_put((was_cut,), below[was_cut].view(torch.int32) == above.view(torch.int32))
    zero = (hsum == 0) & (cut == 0)  # an exact zero sum: -0 only if every term was -0
    value = torch.where(zero, torch.where(plus, 0.0, -0.0), below)
    return value, safe | zero
