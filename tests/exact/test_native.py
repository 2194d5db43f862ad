"""The compiled kernels (pol/exact/native.py) against the torch path, bit for bit: same definition, same bits, on
random inputs and on the awkward ones (subnormals, signed zeros, NaN, infinities, overflow, rounding ties)."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pol.exact import build, elementwise, exact_index_add, exact_mm_reference, exact_scatter_add, exact_sum, native
from pol.exact import matmul as mm
from tests.exact.helpers import exact_sum_reference, f32, wide_rows

SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1.17e-38, -3e-39, 3.4e38, -3.4e38,
            88.72, 88.73, -103.9, -104.0, 0.5, -0.5, 4.0, 3.99, 20.0, 2.0**-20, -(2.0**-21), 1.0, -1.0]  # fmt: skip


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def torch_path(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    with native.disabled():
        return fn(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    assert native.available(), native.status()


def test_status_says_the_kernels_are_loaded_and_disabled_switches_them_off() -> None:
    assert native.status() == "compiled kernels loaded"
    with native.disabled():
        assert not native.available()
        assert native.sum_rows(torch.ones(2, 2)) is None
    assert native.available()


def test_environment_switch_turns_the_kernels_off() -> None:
    code = "from pol.exact import native; print(native.available(), native.status())"
    env = os.environ | {"POL_EXACT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False disabled by POL_EXACT_NATIVE=0"


def test_a_missing_compiler_falls_back_to_the_torch_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import torch; from pol.exact import native, exact_sum; print(native.available());"
        "print(exact_sum(torch.tensor([1.0, 2.0**-30, -1.0])).item())"
    )
    env = os.environ | {"CC": "/nonexistent/cc", "POL_CACHE_DIR": str(tmp_path)}
    env.pop("POL_EXACT_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", str(2.0**-30)]


# --- transcendentals ------------------------------------------------------------------------------------------


def _unary_inputs(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    parts = [
        rng.standard_normal(20000) * 4,
        rng.standard_normal(5000) * np.exp2(rng.uniform(-140, 7, 5000)),  # down into the subnormals
        rng.uniform(-120, 100, 5000),  # across exp's whole range, both cut-offs
        np.array(SPECIALS),
    ]
    return f32(np.concatenate(parts))


@pytest.mark.parametrize("op", native.UNARY_OPS)
def test_transcendental_kernels_equal_the_torch_path(op: str) -> None:
    fn = getattr(elementwise, f"exact_{op}")
    x = _unary_inputs(sum(map(ord, op)))
    for arg in (x, x.abs(), x[:30000].reshape(50, -1).t()):  # negative arguments of log too; a transposed layout
        assert same_bits(fn(arg), torch_path(fn, arg)), op


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_transcendental_kernels_equal_the_torch_path_on_any_float(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    for op in native.UNARY_OPS:
        fn = getattr(elementwise, f"exact_{op}")
        assert same_bits(fn(x), torch_path(fn, x)), (op, values)


# --- sums -----------------------------------------------------------------------------------------------------


def _sum_cases() -> list[torch.Tensor]:
    rng = np.random.default_rng(3)
    big = np.float32(3.0e38)
    cases = [
        f32(wide_rows(rng, (33, 300), spread=60)),
        f32(rng.standard_normal((7, 4097))),  # more terms than one normalisation interval, many times over
        f32(np.array([[big, big, -big], [big, big, big], [-big, -big, 1.0], [1.0, 2.0**-24, 2.0**-24]])),
        f32(np.array([[1e-45, 1e-45, -1e-45], [-0.0, -0.0, -0.0], [0.0, -0.0, 0.0], [1.0, -1.0, -0.0]])),
        f32(np.array([[1.0, float("inf"), 2.0], [float("inf"), float("-inf"), 0.0], [float("nan"), 1.0, 1.0],
                      [float("-inf"), -1.0, 3e38]])),  # fmt: skip
        f32(np.array([[1.0 + 2.0**-23, 2.0**-24], [1.0, 2.0**-24], [1.0, 2.0**-24 + 2.0**-40], [16777215.0, 0.5]])),  # ties
    ]
    # rows of 8 or more (the kernel's vector lanes) holding the special cases above in every lane and in the tail;
    # fewer than 8 rows, so each row is summed on its own
    long = [np.tile(c.numpy(), (1, 7)) for c in cases[2:5]]
    cases += [f32(np.stack([rng.permutation(row) for row in c])) for c in long]
    cases.append(f32(np.where(rng.random((5, 40)) < 0.5, -0.0, rng.standard_normal((5, 40)) * 2.0**-140)))
    return cases


@pytest.mark.parametrize("case", range(10))
def test_row_sum_kernel_equals_the_torch_path_and_the_rational_sum(case: int) -> None:
    x = _sum_cases()[case]
    for dims in ([1], [0], None):
        assert same_bits(exact_sum(x, dims), torch_path(exact_sum, x, dims)), dims
    for row, got in zip(x.tolist(), exact_sum(x, [1]).tolist(), strict=True):
        if all(np.isfinite(row)):  # (a rational has no signed zero: the sign rule is held to the torch path above)
            ref = exact_sum_reference(row)
            assert np.float32(got).tobytes() == np.float32(ref).tobytes() or got == ref == 0, row


def test_row_sums_of_strided_views_and_empty_rows() -> None:
    x = f32(wide_rows(np.random.default_rng(4), (40, 64), spread=30))
    for view in (x.t(), x[::3], x.t()[::2, 1::5], x.unsqueeze(2).expand(40, 64, 3)):
        for dims in ([0], [1], [0, 1]):
            assert same_bits(exact_sum(view, dims), torch_path(exact_sum, view, dims))
    empty = torch.zeros(5, 0)
    assert same_bits(exact_sum(empty, [1]), torch.zeros(5))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=300))
def test_row_sum_kernel_is_the_correctly_rounded_sum(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    got, ref = exact_sum(x), exact_sum_reference(values)
    assert np.float32(got.item()).tobytes() == np.float32(ref).tobytes() or got.item() == ref == 0
    assert same_bits(got, torch_path(exact_sum, x))


def test_slot_sums_equal_the_torch_path() -> None:
    rng = np.random.default_rng(5)
    base = f32(wide_rows(rng, (11, 6), spread=40))
    src = f32(wide_rows(rng, (300, 6), spread=40))
    index = torch.from_numpy(rng.integers(0, 11, 300))
    assert same_bits(exact_index_add(base, 0, index, src), torch_path(exact_index_add, base, 0, index, src))
    idx2 = torch.from_numpy(rng.integers(0, 6, (300, 6)))
    assert same_bits(exact_scatter_add(base, 1, idx2[:11], src[:11]), torch_path(exact_scatter_add, base, 1, idx2[:11], src[:11]))
    # slots whose terms span few binades (one float64 sum each) beside wide ones (the superaccumulator), some empty
    mixed = f32(np.where(rng.random((400, 5)) < 0.1, wide_rows(rng, (400, 5), spread=60), rng.standard_normal((400, 5))))
    index = torch.from_numpy(rng.integers(0, 40, 400))
    zeros = torch.zeros(45, 5)
    assert same_bits(exact_index_add(zeros, 0, index, mixed), torch_path(exact_index_add, zeros, 0, index, mixed))
    special = torch.tensor([float("inf"), -0.0, float("nan"), -0.0, 1.0])
    slots = torch.tensor([0, 1, 2, 1, 0])
    assert same_bits(native.sum_slots(special, slots, 4), torch_path(slot_sums, special, slots, 4))  # type: ignore[arg-type]


def slot_sums(x: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    from pol.exact.reduce import sum_into_slots

    return sum_into_slots(x, target, n)


def test_slot_sum_out_of_range_index_is_refused_and_writes_nothing() -> None:
    base = torch.ones(3, 2)
    before = base.clone()
    with pytest.raises(IndexError, match="out of range"):
        native.sum_slots(torch.ones(4), torch.tensor([0, 1, 5, 2]), 3)
    with pytest.raises(IndexError, match="out of range"):
        native.sum_slots(torch.ones(2), torch.tensor([-1, 0]), 3)
    assert torch.equal(base, before)


# --- products -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 2), (17, 8, 8), (40, 300, 24), (65, 129, 33), (8, 5000, 4)])
def test_product_kernels_equal_the_reference(m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m + k + n)
    for a, b in ((rng.standard_normal((m, k)), rng.standard_normal((k, n))), (wide_rows(rng, (m, k)), wide_rows(rng, (k, n)))):
        ref = exact_mm_reference(f32(a), f32(b))
        fused = native.product(f32(a), f32(b))
        assert fused is not None and same_bits(fused, ref)
        assert same_bits(fused, torch_path(mm.exact_mm, f32(a), f32(b)))


def test_batched_product_kernel_equals_the_reference_per_batch_entry() -> None:
    rng = np.random.default_rng(6)
    a, b = f32(wide_rows(rng, (6, 9, 70))), f32(wide_rows(rng, (6, 70, 5)))
    fused = native.product(a, b)
    assert fused is not None
    for i in range(6):
        assert same_bits(fused[i], exact_mm_reference(a[i], b[i]))
    a, b = f32(rng.standard_normal((2, 3, 5000))), f32(rng.standard_normal((2, 5000, 3)))  # K > 2**12: int8 form
    fused = native.product(a, b)
    assert fused is not None and all(same_bits(fused[i], exact_mm_reference(a[i], b[i])) for i in range(2))


def test_product_kernels_on_extreme_rows_and_signed_zeros() -> None:
    tiny, huge = 1e-45, 3.0e38
    a = f32(np.array([[tiny, -tiny, 0.0, 1e-40], [huge, -huge, huge, 1.0], [-0.0, -0.0, -0.0, -0.0], [1.0, 2.0**-23, 0.5, -1.5]]))
    b = f32(np.array([[1.0, -0.0, huge], [tiny, 2.0, 1.0], [-0.0, 3.0, -huge], [0.25, -1e-40, 2.0]]))
    ref = exact_mm_reference(a, b)
    for fused in (native.product(a, b), native.product(a.unsqueeze(0), b.unsqueeze(0))[0]):  # type: ignore[index]
        assert same_bits(fused, ref)
    assert same_bits(ref[2], torch.zeros(3))  # an all -0 row gives +0: V is an integer, and its zero is +0
    assert same_bits(mm.exact_mm(a, b, "float64"), ref)


def test_non_finite_operands_take_the_torch_path_and_follow_ieee() -> None:
    a = torch.tensor([[1.0, float("inf")], [2.0, 3.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert native.product(a, b) is None
    out = mm.exact_mm(a, b)
    assert out[0, 0].item() == float("inf") and torch.isnan(out[0, 1])
    assert same_bits(out[1], torch.tensor([5.0, 0.0]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24), st.integers(1, 40), st.integers(1, 24), st.integers(0, 2**32 - 1), st.floats(0, 60))
def test_product_kernels_differential(m: int, k: int, n: int, seed: int, spread: float) -> None:
    rng = np.random.default_rng(seed)
    a, b = f32(wide_rows(rng, (m, k), spread)), f32(wide_rows(rng, (k, n), spread))
    ref = exact_mm_reference(a, b)
    assert same_bits(native.product(a, b), ref)  # type: ignore[arg-type]
    assert same_bits(native.product(a.unsqueeze(0), b.unsqueeze(0))[0], ref)  # type: ignore[index]


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (17, 40, 9), (64, 256, 48), (33, 100, 130), (300, 70, 8), (521, 147, 16), (9, 64, 300)])
def test_both_product_forms_of_the_kernels_equal_the_reference(m: int, k: int, n: int) -> None:
    """`native.product` takes the float64 form for 2-D products where the int8 form has no one-pass VNNI kernel
    (`torch._int_mm` is slow there); both forms stay bit-identical to the definition, signed zeros included, and
    so does (B^T A^T)^T: the definition is symmetric."""
    dll = native._library()
    rng = np.random.default_rng(m * k + n)
    a, b = f32(wide_rows(rng, (1, m, k), spread=25)), f32(wide_rows(rng, (1, k, n), spread=25))
    a[0, 0] = -0.0
    ref = exact_mm_reference(a[0], b[0])
    assert same_bits(native._product_f64(dll, a, b)[0], ref)  # type: ignore[index]
    assert same_bits(native._product_int8(dll, a, b)[0], ref)  # type: ignore[index]
    assert same_bits(native.product(a[0], b[0]), ref)  # type: ignore[arg-type]
    assert same_bits(native.product(a[0].t().contiguous().t(), b[0]), ref)  # type: ignore[arg-type]
    assert same_bits(native.product(b[0].t(), a[0].t()), ref.t())  # type: ignore[arg-type]


@pytest.mark.parametrize("z,m,kk,n", [(1, 1, 8, 8), (3, 17, 48, 16), (1, 521, 441, 16), (2, 5, 96, 128), (1, 6, 1024, 48),
                                       (1, 13, 3000, 8), (1, 4, 8, 136), (1, 4, 8, 12), (4, 32, 96, 32), (1, 9, 768, 64)])
def test_float64_gemm_kernel_is_an_exact_integer_product_or_declines(z: int, m: int, kk: int, n: int) -> None:
    """gemm_f64_exact (AVX2 or AVX-512 register tiles, fused multiply-adds): on integers whose partial sums stay
    below 2**53, as the float64 form's are, it gives the exact integer product, or declines (-1) where the library's
    GEMM takes over (N not a multiple of 8, large right operands, no AVX2)."""
    dll = native._library()
    rng = np.random.default_rng(z * m + kk * n)
    bound = int(2 ** ((53 - np.log2(kk)) / 2)) - 1  # every |partial sum| < kk * bound**2 < 2**53
    left = torch.from_numpy(rng.integers(-bound, bound + 1, (z, m, kk)))
    right = torch.from_numpy(rng.integers(-bound, bound + 1, (z, kk, n)))
    left[0, 0, : min(kk, 4)] = bound
    right[0, : min(kk, 4), 0] = bound
    v = torch.full((z, m, n), float("nan"), dtype=torch.float64)
    lf, rf = left.double(), right.double()
    rc = dll.gemm_f64_exact(lf.data_ptr(), rf.data_ptr(), v.data_ptr(), z, m, kk, n)
    if rc != 0:
        assert rc == -1 and (n % 8 or n > 128 or kk * n > 4096)
        return
    assert torch.equal(v.to(torch.int64), torch.bmm(left, right))


@pytest.mark.parametrize("m,k,n", [(521, 147, 16), (64, 256, 48), (37, 64, 40), (8, 100, 128)])
def test_products_have_the_same_bits_at_1_and_2_threads(m: int, k: int, n: int) -> None:
    """2-D products split their rows in blocks of 6 over threads, batched ones their entries: the same bits."""
    rng = np.random.default_rng(m + n)
    a, b = f32(wide_rows(rng, (m, k), spread=20)), f32(wide_rows(rng, (k, n), spread=20))
    a3, b3 = torch.stack([a, a.flip(0)]), torch.stack([b, b.flip(1)])
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append((native.product(a, b), native.product(a3, b3)))
    finally:
        torch.set_num_threads(threads)
    ref = exact_mm_reference(a, b)
    for two_d, batched in runs:
        assert same_bits(two_d, ref) and same_bits(batched[0], ref)  # type: ignore[arg-type, index]
        assert same_bits(batched[1], exact_mm_reference(a.flip(0), b.flip(1)))  # type: ignore[index]


@pytest.mark.skipif(not native.vnni(), reason="the kernels were built without AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (37, 64, 53), (64, 256, 16), (5, 4100, 17), (130, 12, 200)])
def test_one_pass_vnni_product_equals_the_int_mm_form_and_the_reference(m: int, k: int, n: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The VNNI kernel (unsigned-byte trick, diagonals in registers, its own combine) against the five `_int_mm`
    GEMMs: the same bits on ragged tiles, wide rows, signed zeros and a reduction past the float64 combine's 2**12."""
    rng = np.random.default_rng(m + k + n)
    a, b = f32(wide_rows(rng, (m, k), spread=25)), f32(wide_rows(rng, (k, n), spread=25))
    a[0, : min(k, 3)] = -0.0
    b[:, 0] = 0.0
    one_pass = native.product(a, b)
    batched = native.product(torch.stack([a, a.flip(0)]), torch.stack([b, b.flip(1)]))  # one pass per entry past 2**12
    monkeypatch.setattr(native, "use_vnni", False)
    assert same_bits(one_pass, native.product(a, b))  # type: ignore[arg-type]
    assert same_bits(one_pass, exact_mm_reference(a, b))  # type: ignore[arg-type]
    assert batched is not None and same_bits(batched[1], exact_mm_reference(a.flip(0), b.flip(1)))


# --- the AdamW update -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 3e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
        {"lr": 1e-2, "weight_decay": 0.0, "beta1": 0.3, "beta2": 0.0, "eps": 1e-3},  # lerp's other branch, value 1
        {"lr": 0.5, "weight_decay": 0.01, "beta1": 0.0, "beta2": 0.5, "eps": 0.0},
    ],
)
def test_fused_adamw_equals_the_routed_update_bit_for_bit(hyper: dict[str, float]) -> None:
    from pol.exact import exact_mode
    from pol.optim import apply_update, init_optimizer_state
    from pol.spec import OptimSpec

    opt = OptimSpec(name="adamw", **hyper)
    rng = np.random.default_rng(7)
    shapes = {"w": (33, 17), "b": (17,), "s": ()}
    runs = []
    for fused in (True, False):
        params = {n: f32(wide_rows(rng, (1, max(1, int(np.prod(s)))), spread=10).reshape(s)) for n, s in shapes.items()}
        rng = np.random.default_rng(7)  # the same draws for both runs
        state = init_optimizer_state(opt, params)
        for step in range(6):
            grads = {n: f32(wide_rows(np.random.default_rng(step), (1, max(1, p.numel())), spread=20).reshape(p.shape))
                     for n, p in params.items()}  # fmt: skip
            grads["b"][3] = 0.0
            grads["b"][4] = -0.0
            with exact_mode():
                apply_update(opt, params, grads, state, hyper["lr"] * (step + 1) / 6, exact_kernels=fused)
        runs.append((params, state))
    (p1, s1), (p2, s2) = runs
    for name in p1:
        assert same_bits(p1[name], p2[name]), name
    for key in s1:
        assert torch.equal(s1[key].view(torch.uint8) if s1[key].dim() else s1[key], s2[key].view(torch.uint8) if s2[key].dim() else s2[key]), key


def test_fused_adamw_declines_what_it_cannot_do_and_touches_nothing() -> None:
    p, g = torch.ones(4, 4), torch.ones(4, 4)
    m, v = torch.zeros(4, 4), torch.zeros(4, 4)
    kw = {"decay": None, "lerp_weight": 0.1, "beta2": 0.9, "sq_weight": 0.1, "bias2_sqrt": 1.0, "eps": 1e-8, "value": -1.0}
    assert not native.adamw(p, g.double(), m, v, **kw)  # another dtype
    assert not native.adamw(p, torch.ones(4, 8)[:, ::2], m, v, **kw)  # a strided gradient
    assert torch.equal(p, torch.ones(4, 4)) and torch.equal(m, torch.zeros(4, 4))
    version = p._version
    assert native.adamw(p, g, m, v, **kw)
    assert p._version > version and not torch.equal(p, torch.ones(4, 4))


def test_a_compiler_that_rejects_the_cpu_level_still_builds_the_kernels(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("POL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_cpu_flags", lambda: ("-march=no-such-level",))
    dll = native._build()  # the first attempt fails on the unknown level, the second builds without it
    assert dll.kernel_constants is not None
    assert len(list(tmp_path.glob("pol_exact_kernels-*.so"))) == 1


@pytest.mark.parametrize("z,m,k,n", [(64, 32, 32, 16), (5, 7, 33, 24), (3, 1, 5, 8), (2, 9, 4096, 32), (4, 6, 3, 12)])
def test_batched_float64_form_equals_the_reference_for_every_column_count(z: int, m: int, k: int, n: int) -> None:
    """The float64 form's own GEMM (AVX-512, N a multiple of 8, row tails) and torch.bmm (other N) both give V."""
    rng = np.random.default_rng(z * m + k + n)
    a, b = f32(wide_rows(rng, (z * m, k), spread=30).reshape(z, m, k)), f32(wide_rows(rng, (z * k, n), spread=30).reshape(z, k, n))
    fused = native.product(a, b)
    assert fused is not None
    for i in range(z):
        assert same_bits(fused[i], exact_mm_reference(a[i], b[i]))


def test_splitting_work_across_threads_changes_no_bit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every kernel that runs on the thread pool gives the same bits split in many ranges as in one."""
    from pol.exact import exact_mode

    rng = np.random.default_rng(11)
    x = f32(wide_rows(rng, (37, 64), spread=20))
    a3, b3 = f32(rng.standard_normal((5, 9, 16))), f32(rng.standard_normal((5, 16, 24)))
    w, b = f32(rng.standard_normal(64)), f32(rng.standard_normal(64))
    aten = torch.ops.aten

    def run() -> list[torch.Tensor]:
        with exact_mode():
            ln, mean, rstd = aten.native_layer_norm.default(x, [64], w, b, 1e-5)
            outs = [
                native.unary("erf", x), native.unary("exp", x), exact_sum(x, [0]), exact_sum(x, [1]), ln, mean, rstd,
                *aten.native_layer_norm_backward.default(x, x, [64], mean, rstd, w, b, [True, True, True]),
                aten._softmax.default(x, -1, False), aten._softmax_backward_data.default(x, x, -1, torch.float32),
                aten.gelu.default(x), aten.gelu_backward.default(x, x), aten._log_softmax.default(x, -1, False),
                aten._log_softmax_backward_data.default(x, x, -1, torch.float32),
            ]  # fmt: skip
        # the product kernels run outside the mode, as its handlers do (their torch fallback is a float64 bmm)
        outs += [native.product(x, x.t().contiguous()), native.product(a3, b3)]
        p, g, m, v = x.clone(), x * 0.5, torch.zeros_like(x), torch.zeros_like(x)
        kw = {"decay": 0.9, "lerp_weight": 0.1, "beta2": 0.99, "sq_weight": 0.01, "bias2_sqrt": 0.3, "eps": 1e-8, "value": -0.01}
        assert native.adamw(p, g, m, v, **kw)
        return [*outs, p, m, v]

    whole = run()
    monkeypatch.setattr(native, "PARALLEL_MIN", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        split = run()
    finally:
        torch.set_num_threads(threads)
    assert len(whole) == len(split)
    for i, (u, s) in enumerate(zip(whole, split, strict=True)):
        assert same_bits(u, s), i


def test_no_home_directory_falls_back_to_the_torch_path(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(build, "get_cache_dir", lambda env: no_home())
    monkeypatch.setattr(native, "_state", {})  # a fresh process's state; the real one comes back after the test
    assert not native.available()
    assert "home directory" in native.status() and "torch path" in native.status()
    assert native.sum_rows(torch.ones(2, 3)) is None


@pytest.mark.parametrize("level", [(), ("-march=x86-64-v3",)], ids=["generic", "x86-64-v3"])
def test_kernels_built_for_another_cpu_level_give_the_same_bits(level: tuple[str, ...], tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The x86-64 level the kernels are built for changes speed, never a bit: a build without AVX-512 (vector types
    lowered to narrower SIMD, the scalar erf, torch.bmm for attention, `_int_mm` instead of VNNI) against this one."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 levels only")
    from pol.exact import exact_mode

    rng = np.random.default_rng(17)
    x = f32(wide_rows(rng, (37, 72), spread=20))
    x[3, :9] = -0.0
    a3, b3 = f32(rng.standard_normal((6, 9, 40))), f32(rng.standard_normal((6, 40, 24)))
    w = f32(rng.standard_normal(72))
    idx = torch.from_numpy(rng.integers(0, 5, 37))
    aten = torch.ops.aten

    def run() -> list[torch.Tensor]:
        direct = [
            native.product(x, x.t().contiguous()), native.product(a3, b3), exact_sum(x, [0]), exact_sum(x, [1]),
            exact_index_add(torch.zeros(5, 72), 0, idx, x), native.unary("erf", x), native.unary("exp", x),
        ]  # fmt: skip
        with exact_mode():
            ln, mean, rstd = aten.native_layer_norm.default(x, [72], w, w, 1e-5)
            lsm = aten._log_softmax.default(x, -1, False)
            return [
                *direct, ln, mean, rstd,
                *aten.native_layer_norm_backward.default(x, x, [72], mean, rstd, w, w, [True, True, True]),
                aten._softmax.default(x, -1, False), lsm, aten._log_softmax_backward_data.default(x, lsm, -1, torch.float32),
                aten.gelu.default(x), aten.gelu_backward.default(x, x),
            ]  # fmt: skip

    here = run()
    monkeypatch.setenv("POL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_cpu_flags", lambda: level)
    monkeypatch.setitem(native._state, "dll", native._build())
    native.vnni.cache_clear()
    try:
        other = run()
        assert level or not native.vnni()
    finally:
        native.vnni.cache_clear()
    for i, (u, v) in enumerate(zip(here, other, strict=True)):
        assert same_bits(u, v), i


_CTYPES = {"void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}


def _header_prototypes() -> dict[str, tuple[object, tuple[object, ...]]]:
    """(restype, argtypes) of every function `_kernels.h` declares, in ctypes terms (any pointer is a void pointer)."""
    text = re.sub(r"/\*.*?\*/", "", build.HEADER.read_text(), flags=re.S)
    text = re.sub(r"typedef struct \{.*?\} \w+;", "", text, flags=re.S)
    out = {}
    for ret, name, params in re.findall(r"^(\w+)\s+(\w+)\(([^)]*)\);", text, flags=re.M):
        args = tuple(ctypes.c_void_p if "*" in a else _CTYPES[a.split()[-2]] for a in " ".join(params.split()).split(","))
        out[name] = (_CTYPES[ret], args)
    return out


def test_the_header_declares_exactly_the_ctypes_signatures() -> None:
    declared = _header_prototypes()
    assert declared == dict(native.SIGNATURES)
    assert len(declared) == len(native.SIGNATURES) > 20


def test_the_build_reads_its_environment_in_one_place(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CC", "my-cc")
    monkeypatch.setenv("POL_CACHE_DIR", "/some/dir")
    monkeypatch.setenv("POL_EXACT_NATIVE", "0")
    env = build.read_environment()
    assert env == build.BuildEnvironment(cc="my-cc", cache_dir="/some/dir", enabled=False)
    assert build.get_cache_dir(env) == Path("/some/dir")
    monkeypatch.delenv("POL_CACHE_DIR")
    monkeypatch.delenv("POL_EXACT_NATIVE")
    assert build.read_environment().enabled and build.read_environment().cache_dir is None
