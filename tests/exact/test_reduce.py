"""Exact reductions: correctly rounded sums (checked against rational arithmetic), order and layout independence,
IEEE special values, scatter/index additions, and accuracy no worse than native float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pol.errors import UnsupportedOperator
from pol.exact import exact_index_add, exact_mean, exact_scatter_add, exact_sum
from tests.exact.helpers import exact_sum_reference, f32, wide_rows

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and the torch path alike

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(finite_f32, min_size=1, max_size=40))
def test_sum_is_the_correctly_rounded_exact_sum(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    expected = exact_sum_reference([float(v) for v in x.tolist()])
    got = float(exact_sum(x))
    assert got == expected or (got == 0 and expected == 0)


def test_sum_over_dims_matches_reference_per_row() -> None:
    rng = np.random.default_rng(0)
    x = f32(wide_rows(rng, (6, 300), spread=40.0))
    out = exact_sum(x, [1])
    for i in range(6):
        assert float(out[i]) == exact_sum_reference([float(v) for v in x[i].tolist()])
    assert exact_sum(torch.zeros(3, 4, 5), [0, 2], keepdim=True).shape == (1, 4, 1)
    assert exact_sum(torch.tensor(2.5)).item() == 2.5


def test_sum_permutation_layout_and_threads_change_no_bit() -> None:
    rng = np.random.default_rng(1)
    x = f32(wide_rows(rng, (64, 1000)))
    base = exact_sum(x, [1])
    p = torch.from_numpy(rng.permutation(1000))
    assert torch.equal(exact_sum(x[:, p], [1]), base)
    assert torch.equal(exact_sum(x.t().contiguous().t(), [1]), base)
    assert torch.equal(exact_sum(x.t().contiguous(), [0]), base)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = exact_sum(x, [1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, base)


def test_sum_accuracy_no_worse_than_native() -> None:
    rng = np.random.default_rng(2)
    for x in (f32(rng.standard_normal((32, 4096))), f32(wide_rows(rng, (32, 4096)))):
        ref = x.double().sum(1)
        assert float((exact_sum(x, [1]).double() - ref).abs().max()) <= float((x.sum(1).double() - ref).abs().max())
        refm = x.double().mean(1)
        assert float((exact_mean(x, [1]).double() - refm).abs().max()) <= float((x.mean(1).double() - refm).abs().max())


def test_cancellation_is_exact() -> None:
    x = torch.tensor([1e30, 1.0, -1e30, 2.0**-60], dtype=torch.float32)
    assert float(exact_sum(x)) == 1.0  # 1 + 2**-60 rounds to 1
    assert float(exact_sum(torch.tensor([2.0**24, 1.0, 2.0**-40]))) == 2.0**24 + 2  # ties broken by the tail


def test_special_values() -> None:
    inf, nan = float("inf"), float("nan")
    assert float(exact_sum(torch.tensor([1.0, inf]))) == inf
    assert float(exact_sum(torch.tensor([1.0, -inf]))) == -inf
    assert np.isnan(float(exact_sum(torch.tensor([inf, -inf]))))
    assert np.isnan(float(exact_sum(torch.tensor([1.0, nan]))))
    z = exact_sum(torch.tensor([-0.0, -0.0]))
    assert float(z) == 0 and torch.signbit(z)
    assert not torch.signbit(exact_sum(torch.tensor([-0.0, 0.0])))
    assert float(exact_sum(torch.tensor([3e38, 3e38]))) == inf  # exact sum overflows float32
    sub = torch.tensor([1e-45] * 3)  # subnormals, no flush to zero
    assert float(exact_sum(sub)) == pytest.approx(4.2e-45, rel=0.01)


def test_index_add_and_scatter_add_are_exact_per_slot() -> None:
    rng = np.random.default_rng(3)
    base = f32(rng.standard_normal((5, 3)))
    src = f32(wide_rows(rng, (40, 3)))
    idx = torch.from_numpy(rng.integers(0, 5, 40))
    out = exact_index_add(base, 0, idx, src)
    for r in range(5):
        for c in range(3):
            terms = [float(base[r, c])] + [float(src[i, c]) for i in range(40) if int(idx[i]) == r]
            assert float(out[r, c]) == exact_sum_reference(terms)
    sidx = idx.view(40, 1).expand(40, 3)
    assert torch.equal(exact_scatter_add(base, 0, sidx, src), out)
    p = torch.from_numpy(rng.permutation(40))
    assert torch.equal(exact_index_add(base, 0, idx[p], src[p]), out)


def test_non_float32_is_refused_with_the_operator_name() -> None:
    with pytest.raises(UnsupportedOperator, match="aten.sum"):
        exact_sum(torch.ones(3, dtype=torch.float64))


def test_dense_and_scatter_accumulation_give_the_same_bits() -> None:
    from pol.exact.reduce import _sum_by_target, accumulate_digits_dense, digits_to_f32

    rng = np.random.default_rng(4)
    for shape, spread in (((64, 1000), 20.0), ((5, 20000), 60.0), ((300, 3), 5.0), ((4, 70000), 1.0)):
        x = f32(wide_rows(rng, shape, spread))
        target = torch.arange(shape[0]).unsqueeze(1).expand(shape).reshape(-1)
        dense = digits_to_f32(*accumulate_digits_dense(x))
        assert torch.equal(dense, _sum_by_target(x.reshape(-1), target, shape[0], None))
        assert torch.equal(dense, exact_sum(x, [1]))


def test_narrow_float64_path_equals_the_digit_path() -> None:
    from pol.exact.reduce import _narrow_sum_f64, _sum_by_target

    rng = np.random.default_rng(5)
    for spread in (0.5, 3.0, 6.0):
        x = f32(wide_rows(rng, (50, 64), spread))
        narrow = _narrow_sum_f64(x)
        assert narrow is not None
        target = torch.arange(50).unsqueeze(1).expand(50, 64).reshape(-1)
        assert torch.equal(narrow, _sum_by_target(x.reshape(-1), target, 50, None))
    assert _narrow_sum_f64(f32(wide_rows(rng, (4, 64), 40.0))) is None  # too wide: the digit path takes it
    edge = torch.tensor([[2.0**23, 1.0, 2.0**-4, 2.0**-4]])  # at the budget edge: 27 binades for R = 4
    assert _narrow_sum_f64(edge) is not None and float(exact_sum(edge, [1])) == exact_sum_reference(edge[0].tolist())


def test_two_level_float64_path_equals_the_digit_path() -> None:
    """Rows too wide for one float64 sum: hi parts and remainders, each summed exactly, then one rounding."""
    from pol.exact.reduce import _narrow_sum_f64, _sum_by_target, _two_level_sum_f64

    rng = np.random.default_rng(6)
    taken = 0
    for shape, spread in (((40, 64), 13.0), ((40, 512), 12.0), ((8, 3000), 11.0), ((30, 7), 15.0), ((16, 512), 14.0)):
        x = f32(wide_rows(rng, shape, spread))  # some 30 binades per row: too wide for one float64 sum
        x[0, : shape[1] // 2] = -x[0, shape[1] // 2 : 2 * (shape[1] // 2)]  # cancellation down to a few terms
        x[1] = torch.tensor(np.float32(1e-45)) * torch.arange(shape[1])  # subnormals only
        x[2] *= 2.0**100  # near the float32 limit
        x[3] *= 2.0**-120  # partly subnormal
        assert _narrow_sum_f64(x) is None
        two = _two_level_sum_f64(x)
        if two is None:
            continue
        taken += 1
        target = torch.arange(shape[0]).unsqueeze(1).expand(shape).reshape(-1)
        assert torch.equal(two, _sum_by_target(x.reshape(-1), target, shape[0], None))
        for i in (0, 2, 3, 4):
            assert float(two[i]) == exact_sum_reference(x[i].tolist())
    assert taken >= 4  # the path is exercised, not skipped
    very_wide = f32(wide_rows(rng, (4, 64), 0.0))
    very_wide[:, 1] = 1e-30
    very_wide[:, 2] = 3e-20  # remainders spanning 30+ binades: refused, the digit path takes the row
    assert _two_level_sum_f64(very_wide) is None


@settings(max_examples=100, deadline=None)
@given(st.lists(finite_f32, min_size=2, max_size=60), st.integers(0, 2**32 - 1))
def test_two_level_path_is_the_correctly_rounded_sum(values: list[float], seed: int) -> None:
    from pol.exact.reduce import _two_level_sum_f64

    x = torch.tensor(values, dtype=torch.float32).unsqueeze(0)
    x = x[:, torch.from_numpy(np.random.default_rng(seed).permutation(x.shape[1]))]
    got = _two_level_sum_f64(x)
    if got is not None:
        expected = exact_sum_reference(x[0].tolist())
        assert float(got[0]) == expected or (float(got[0]) == 0 and expected == 0)
