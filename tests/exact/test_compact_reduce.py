"""The window all-reduce (pol.exact.reduce: exponent codes by MAX, int64 window sums by SUM, one rounding) against
`exact_sum`: bit for bit wherever it calls an element safe, and bit for bit everywhere once the unsafe elements
take the exact path, whatever the split of the terms among (simulated) processes and the order of the integer
sums."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pol.exact.reduce import (
    CODE_SPECIAL,
    Window,
    compute_block_codes,
    compute_exponent_codes,
    compute_window_rounding,
    compute_window_sums,
    exact_sum,
    get_element_codes,
)

BLOCKS = [1, 4, 32]


def _bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.int32).tolist()


def simulate_all_reduce(x: torch.Tensor, ranks: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `pol.distributed.DataParallelGroup.reduce_exact` computes for terms `x` (elements, M), term i held by
    process i % ranks: codes MAXed and int64 sums added in a random order. Returns (values with unsafe elements
    summed by exact_sum, safe mask)."""
    n, m = x.shape
    parts = [x[:, r::ranks] for r in range(ranks)]
    codes = torch.stack([compute_block_codes(compute_exponent_codes(p), block) for p in parts]).amax(dim=0)
    element = get_element_codes(codes, block, n)
    window = Window(m, counts=block > 1)
    sums = [compute_window_sums(p, element, window) for p in parts]
    random.Random(seed).shuffle(sums)
    total = torch.zeros(n, dtype=torch.int64)
    for s in sums:
        total = total + s
    values, safe = compute_window_rounding(total, element, window)
    unsafe = torch.nonzero(~safe).reshape(-1)
    if unsafe.numel():
        values = values.index_put((unsafe,), exact_sum(x[unsafe], 1))
    return values, safe


def _check(x: torch.Tensor, ranks: int, block: int, seed: int) -> torch.Tensor:
    if bool((compute_exponent_codes(x) == CODE_SPECIAL).any()):  # inf/NaN take the gathered path (tested with gloo)
        return torch.ones(x.shape[0], dtype=torch.bool)
    reference = exact_sum(x, 1)
    values, safe = simulate_all_reduce(x, ranks, block, seed)
    assert _bits(values) == _bits(reference)
    return safe


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def stacks(draw: st.DrawFn) -> torch.Tensor:
    """(elements, M) float32: any finite values (subnormals, signed zeros, exponents 2**-149 to 2**127), or rows of
    one scale (gradient-like) with cancelling pairs, exact ties and zero columns mixed in."""
    m = draw(st.integers(1, 70))
    n = draw(st.integers(1, 8))
    if draw(st.booleans()):
        x = torch.tensor(draw(st.lists(finite32, min_size=n * m, max_size=n * m)), dtype=torch.float32).view(n, m)
    else:
        scale = draw(st.integers(-140, 120))
        mant = draw(st.lists(st.integers(-(1 << 24) + 1, (1 << 24) - 1), min_size=n * m, max_size=n * m))
        shift = draw(st.lists(st.integers(-30, 0), min_size=n * m, max_size=n * m))
        x = torch.tensor([math.ldexp(v, scale + s - 24) for v, s in zip(mant, shift, strict=True)], dtype=torch.float32)
        x = x.view(n, m)
    if m > 1 and draw(st.booleans()):
        x[:, 1] = -x[:, 0]  # cancellation
    if draw(st.booleans()):
        x[:, draw(st.integers(0, m - 1))] = draw(st.sampled_from([0.0, -0.0]))
    if draw(st.booleans()):
        x = torch.where(x == 0, -0.0, x)
    return x


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=stacks(), ranks=st.integers(1, 5), block=st.sampled_from(BLOCKS), seed=st.integers(0, 1 << 30))
def test_window_all_reduce_equals_exact_sum(x, ranks, block, seed):
    _check(x, min(ranks, x.shape[1]), block, seed)


def _window_sum_reference(row: list[float], code: int, window: Window) -> int:
    """compute_window_sums of one element in Python integers: trunc(term / u) summed, then the low-bit counts."""
    u = Fraction(2) ** (max(code - 1, 1) - 126 - window.width)
    value = sum(int(Fraction(v) / u) for v in row)  # int() truncates toward zero
    cut = sum(1 for v in row if Fraction(v) / u != int(Fraction(v) / u))
    low = cut
    if window.counts:
        not_negative_zero = sum(1 for v in row if not (v == 0 and math.copysign(1.0, v) < 0))
        low = (cut << window.h) + not_negative_zero
    return (value << window.low) + low


@settings(max_examples=200, deadline=None)
@given(x=stacks(), counts=st.booleans())
def test_window_sums_are_the_integer_definition_and_fit_int64(x, counts):
    codes = compute_exponent_codes(x).to(torch.int64)
    if bool((codes == CODE_SPECIAL).any()):
        return
    window = Window(x.shape[1], counts=counts)
    got = compute_window_sums(x, codes, window).tolist()
    for i, row in enumerate(x.tolist()):
        want = _window_sum_reference(row, int(codes[i]), window)
        assert got[i] == want
        assert abs(want) < 1 << 63


def test_the_largest_terms_do_not_overflow():
    for m in (1, 2, 3, 7, 64, 127):
        x = torch.full((2, m), 1.7e38)  # biased exponent 253: the largest code below CODE_SPECIAL
        x[1] = -1.7e38
        assert int(compute_exponent_codes(x).max()) == CODE_SPECIAL - 1
        for block in (1, 32):
            safe = _check(x, min(3, m), block, 0)
            if m > 2:
                assert _bits(exact_sum(x, 1)) == [0x7F800000, -0x800000]  # +-inf: the sum overflows, exactly
                assert safe.all()  # the overflow is the rounding's own: no exact path needed


@pytest.mark.parametrize("block", BLOCKS)
def test_ties_cancellations_signed_zeros_and_subnormals(block):
    tiny = 2.0**-149
    rows = [
        [1.0, 2.0**-24],  # a tie: rounds to even (1.0)
        [1.0 + 2.0**-23, 2.0**-24],  # a tie: rounds to even (up)
        [1.0, 2.0**-24, 2.0**-100],  # just above a tie, by a term the window cuts: up
        [1.0, 2.0**-24, -(2.0**-100)],  # just below: down
        [1.0, -1.0, 0.0],  # exact cancellation: +0
        [-0.0, -0.0, -0.0],  # -0
        [-0.0, 0.0, -0.0],  # +0
        [1.7e38, -1.7e38, 1e-30],  # cancellation down to a term far below the window
        [tiny, tiny, -tiny],  # subnormal sum
        [2.0**-126, -tiny, 0.0],  # a normal minus a subnormal: subnormal result
        [2.0**100, 2.0**-149, -(2.0**100)],
        [1.5, 2.0**-30, 2.0**-31],
    ]
    x = torch.tensor([r + [-0.0] * (3 - len(r)) for r in rows], dtype=torch.float32)  # -0 changes no sum
    for ranks in (1, 2, 3):
        for seed in range(3):
            _check(x, ranks, block, seed)
    assert _bits(exact_sum(x, 1))[5] == -(1 << 31)  # -0


@pytest.mark.parametrize("block", BLOCKS)
def test_gradient_like_sums_are_all_safe(block):
    """The window is wide enough that ordinary gradients (terms of one scale per element) rarely need the exact
    path: with one code per element (M up to 64) never; with a code per block (M up to 15, as pol.distributed
    uses it; elements up to 16 binades apart) under 1 in 1000."""
    torch.manual_seed(0)
    for m in (2, 4, 8, 15) if block > 1 else (2, 4, 8, 32, 64):
        x = torch.randn(20000, m) * torch.exp2(torch.randint(-16, 0, (20000, 1)).float()) * 1e-3
        x[::7] = 0.0
        safe = _check(x, 3, block, m)
        assert int((~safe).sum()) <= (0 if block == 1 else len(x) // 1000), (m, int((~safe).sum()))


def test_many_micro_batches_and_huge_exponent_spreads():
    torch.manual_seed(1)
    x = torch.randn(500, 100) * torch.exp2(torch.randint(-150, 126, (500, 100)).float())
    x[:, 60:100] = -x[:, :40]  # most terms cancel in pairs
    for block in BLOCKS:
        _check(x, 4, block, 7)
