"""Exact matrix products: backends held to the reference bit for bit, accuracy, order/layout/thread independence,
IEEE special values, and int32 accumulation that never wraps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pol.errors import UnsupportedOperator
from pol.exact import exact_bmm, exact_mm, exact_mm_reference, int_mm_exact
from pol.exact.matmul import INT_MM_MAX_TERMS, split_limbs, split_limbs_reference
from tests.exact.helpers import f32, wide_rows

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and the torch path alike

SHAPES = [(1, 1, 1), (3, 5, 2), (16, 7, 9), (17, 8, 8), (40, 300, 24), (65, 129, 33)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("backend", ["int8", "float64"])
def test_fast_backends_match_reference_bit_for_bit(m: int, k: int, n: int, backend: str) -> None:
    rng = np.random.default_rng(m * 1000 + k)
    for a, b in ((rng.standard_normal((m, k)), rng.standard_normal((k, n))), (wide_rows(rng, (m, k)), wide_rows(rng, (k, n)))):
        ref = exact_mm_reference(f32(a), f32(b))
        assert torch.equal(exact_mm(f32(a), f32(b), backend), ref)  # type: ignore[arg-type]


def test_split_fast_equals_split_reference_including_subnormals() -> None:
    rng = np.random.default_rng(1)
    x = f32(wide_rows(rng, (20, 64), spread=60.0))
    x[3] = torch.tensor(np.float32(1e-45)) * torch.arange(64)  # subnormal row
    x[4, :5] = torch.tensor([3e38, -3e38, 1e-40, 0.0, -0.0])
    fast, e_fast = split_limbs(x, -1)
    ref, e_ref = split_limbs_reference(x, -1)
    assert torch.equal(fast.to(torch.int64), ref) and torch.equal(e_fast, e_ref)
    assert int(ref.abs().max()) <= 64


@pytest.mark.parametrize("backend", ["int8", "float64"])
def test_extreme_rows_match_reference_bit_for_bit(backend: str) -> None:
    """Subnormal rows, rows at the float32 limit, zero rows and mixed binades: the fast splits (the float64
    backend's rounded shifts, the int8 backend's sequential digits) give the reference's digits."""
    rng = np.random.default_rng(7)
    a = f32(wide_rows(rng, (6, 24), spread=60.0))
    a[0] = torch.tensor(np.float32(1e-45)) * torch.arange(24)  # subnormal
    a[1, :4] = torch.tensor([3e38, -3e38, 1e-40, -0.0])
    a[2] = 0.0
    a[3, ::2] = 0.5  # ties for round-half-even in the digits
    b = f32(wide_rows(rng, (24, 5), spread=60.0))
    b[:, 0] = torch.tensor(np.float32(1e-44)) * torch.arange(24)
    b[:3, 1] = torch.tensor([2e38, -1e-41, 1.5])
    for x, y in ((a, b), (a * 2.0**-100, b), (a, b * 2.0**-60)):
        assert torch.equal(exact_mm(x, y, backend), exact_mm_reference(x, y))  # type: ignore[arg-type]
    batched_a, batched_b = torch.stack([a, a.flip(0)]), torch.stack([b, b.flip(1)])
    out = exact_bmm(batched_a, batched_b, backend)  # type: ignore[arg-type]
    for i in range(2):
        assert torch.equal(out[i], exact_mm_reference(batched_a[i], batched_b[i]))


def test_bmm_matches_per_batch_mm() -> None:
    rng = np.random.default_rng(2)
    a, b = f32(rng.standard_normal((5, 12, 40))), f32(rng.standard_normal((5, 40, 7)))
    out = exact_bmm(a, b)
    assert torch.equal(out, exact_bmm(a, b, "int8"))
    for i in range(5):
        assert torch.equal(out[i], exact_mm_reference(a[i], b[i]))


def _max_err(c: torch.Tensor, a: np.ndarray, b: np.ndarray) -> float:
    ref = torch.from_numpy(a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64))
    return float(((c.double() - ref).abs() / (ref.abs() + 1e-300)).median())


@pytest.mark.parametrize("kind", ["normal", "wide"])
def test_accuracy_no_worse_than_native_float32(kind: str) -> None:
    rng = np.random.default_rng(3)
    shape_a, shape_b = (64, 512), (512, 64)
    a = rng.standard_normal(shape_a) if kind == "normal" else wide_rows(rng, shape_a)
    b = rng.standard_normal(shape_b) if kind == "normal" else wide_rows(rng, shape_b)
    ta, tb = f32(a), f32(b)
    ref = ta.double() @ tb.double()
    exact_err = (exact_mm(ta, tb).double() - ref).abs()
    native_err = ((ta @ tb).double() - ref).abs()
    assert float(exact_err.mean()) <= float(native_err.mean())
    assert float(exact_err.max()) <= float(native_err.max())


def test_permuting_the_reduction_dimension_changes_no_bit() -> None:
    rng = np.random.default_rng(4)
    a, b = f32(wide_rows(rng, (33, 257))), f32(wide_rows(rng, (257, 19)))
    base = exact_mm(a, b)
    for seed in range(3):
        p = torch.from_numpy(np.random.default_rng(seed).permutation(257))
        assert torch.equal(exact_mm(a[:, p], b[p]), base)
        assert torch.equal(exact_mm(a[:, p], b[p], "float64"), base)


def test_transposed_layouts_are_bit_identical() -> None:
    rng = np.random.default_rng(5)
    a, b = f32(rng.standard_normal((48, 96))), f32(rng.standard_normal((96, 40)))
    base = exact_mm(a, b)
    assert torch.equal(exact_mm(a.t().contiguous().t(), b), base)
    assert torch.equal(exact_mm(a, b.t().contiguous().t()), base)
    assert torch.equal(exact_mm(a.t().contiguous().t(), b.t().contiguous().t()), base)


def test_thread_count_does_not_change_bits() -> None:
    rng = np.random.default_rng(6)
    a, b = f32(wide_rows(rng, (256, 384))), f32(wide_rows(rng, (384, 128)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = exact_mm(a, b)
        torch.set_num_threads(2)
        two = exact_mm(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_nonfinite_inputs_follow_ieee() -> None:
    a = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [float("inf"), 1.0], [float("inf"), 1.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0, -1.0], [1.0, 1.0, float("-inf")]])
    c = exact_mm(a, b)
    native = a @ b
    assert torch.equal(torch.isnan(c), torch.isnan(native))
    assert torch.equal(torch.isinf(c), torch.isinf(native))
    finite = torch.isfinite(native)
    assert torch.equal(c[finite], native[finite])
    assert torch.equal(torch.sign(c[torch.isinf(c)]), torch.sign(native[torch.isinf(native)]))


def test_overflow_to_inf_and_subnormal_results() -> None:
    big = torch.full((2, 4), 3e38)
    assert torch.isinf(exact_mm(big, torch.ones(4, 1))).all()
    tiny = torch.full((1, 4), 1e-45)
    out = exact_mm(tiny, torch.full((4, 1), 0.5))
    assert float(out) == pytest.approx(1.4e-45, rel=0.01)  # 4 * 2**-150 = 2**-148 is a subnormal float32
    assert float(exact_mm(torch.full((1, 1), 2.0**-100), torch.full((1, 1), 2.0**-40))) == 2.0**-140


def test_int_mm_exact_never_wraps() -> None:
    k = INT_MM_MAX_TERMS + 4096  # 64 * 64 * k > 2**31: one int32 accumulation would wrap
    a = torch.full((17, k), 64, dtype=torch.int8)
    b = torch.full((k, 8), -64, dtype=torch.int8)
    assert 64 * 64 * k > 2**31
    out = int_mm_exact(a, b)
    assert torch.equal(out, torch.full((17, 8), -64 * 64 * k, dtype=torch.int64))


def test_int_mm_exact_refuses_digits_that_can_saturate() -> None:
    with pytest.raises(UnsupportedOperator, match="_int_mm"):
        int_mm_exact(torch.full((17, 8), -128, dtype=torch.int8), torch.ones((8, 8), dtype=torch.int8))


@pytest.mark.slow
def test_long_reductions_do_not_wrap_in_the_product() -> None:
    k = (1 << 19) + 4096
    x = float(np.float32(1.9999999))  # leading digit 64 in every entry: the leading diagonal sums 64 * 64 * k
    assert split_limbs(torch.tensor([[x]]), -1)[0][0].item() == 64
    assert 64 * 64 * k > 2**31  # one int32 accumulation over all of K would wrap
    a, b = torch.full((17, k), x), torch.full((k, 8), x)
    out = exact_mm(a, b)
    ref = k * (np.float64(np.float32(x)) ** 2)
    assert torch.allclose(out.double(), torch.full((17, 8), ref, dtype=torch.float64), rtol=1e-6)
    assert torch.equal(out, exact_mm_reference(a, b))


def test_unsupported_dtype_and_shape_are_named() -> None:
    with pytest.raises(UnsupportedOperator, match="aten.mm"):
        exact_mm(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(UnsupportedOperator, match="aten.mm"):
        exact_mm(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(UnsupportedOperator, match="aten.bmm"):
        exact_bmm(torch.ones(2, 2), torch.ones(2, 2))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 24),
    st.integers(1, 40),
    st.integers(1, 24),
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 60.0),
    st.booleans(),
)
def test_differential_random_shapes_and_special_values(m: int, k: int, n: int, seed: int, spread: float, specials: bool) -> None:
    rng = np.random.default_rng(seed)
    a, b = wide_rows(rng, (m, k), spread), wide_rows(rng, (k, n), spread)
    if specials:
        for x in (a, b):
            x.flat[rng.integers(0, x.size, 2)] = rng.choice([np.inf, -np.inf, np.nan, 0.0, 1e-45], 2)
    ta, tb = f32(a), f32(b)
    ref = exact_mm_reference(ta, tb)
    for backend in ("int8", "float64"):
        got = exact_mm(ta, tb, backend)  # type: ignore[arg-type]
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(got[~torch.isnan(ref)], ref[~torch.isnan(ref)])
