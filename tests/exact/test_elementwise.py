"""Transcendentals from basic operations: within 1 ulp of float64 references, IEEE special values, no flush to zero."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pol.errors import UnsupportedOperator
from pol.exact import (
    exact_erf,
    exact_exp,
    exact_expm1,
    exact_log,
    exact_log1p,
    exact_pow_scalar,
    exact_rsqrt,
    exact_sigmoid,
    exact_sqrt,
    exact_tanh,
)
from tests.exact.helpers import ulps

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and the torch path alike

RNG = np.random.default_rng(0)
WIDE = torch.from_numpy(
    np.concatenate([RNG.uniform(-100, 100, 20000), RNG.standard_normal(20000) * 3, RNG.standard_normal(2000) * 1e-6])
).to(torch.float32)
POS = WIDE.abs() * torch.from_numpy(np.exp2(RNG.uniform(-140, 100, WIDE.numel()))).to(torch.float32) + 1e-45


@pytest.mark.parametrize(
    "fn,ref,x",
    [
        (exact_exp, torch.exp, WIDE),
        (exact_expm1, torch.expm1, WIDE.clamp(-80, 80)),
        (exact_log, torch.log, POS),
        (exact_log1p, torch.log1p, WIDE.clamp(-0.999, 1e30)),
        (exact_tanh, torch.tanh, WIDE),
        (exact_sigmoid, torch.sigmoid, WIDE),
        (exact_rsqrt, torch.rsqrt, POS),
        (lambda x: exact_pow_scalar(x, 1.5), lambda x: x**1.5, POS.clamp(max=1e20)),
        (lambda x: exact_pow_scalar(x, 3.0), lambda x: x**3, WIDE),
    ],
)
def test_within_one_ulp_of_float64(fn, ref, x: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    y = fn(x)
    r = ref(x.to(torch.float64))
    ok = torch.isfinite(r.to(torch.float32))
    assert float(ulps(y[ok], r[ok]).max()) <= 1.0


def test_erf_within_one_ulp() -> None:
    x = WIDE[WIDE.abs() < 8]
    r = torch.tensor([math.erf(v) for v in x.to(torch.float64).tolist()], dtype=torch.float64)
    assert float(ulps(exact_erf(x), r).max()) <= 1.0


def test_special_values() -> None:
    inf, nan = float("inf"), float("nan")
    e = exact_exp(torch.tensor([nan, inf, -inf, 0.0, -104.0, 89.0]))
    assert np.isnan(float(e[0])) and e[1:].tolist() == [inf, 0.0, 1.0, 0.0, inf]
    assert float(exact_exp(torch.tensor(-100.0))) > 0  # a subnormal result, not flushed
    lg = exact_log(torch.tensor([0.0, -1.0, inf, 1e-45]))
    assert lg[0] == -inf and np.isnan(float(lg[1])) and lg[2] == inf and float(lg[3]) == pytest.approx(-103.279, abs=1e-3)
    t = exact_tanh(torch.tensor([-0.0, inf, -inf, nan]))
    assert torch.signbit(t[0]) and t[1] == 1 and t[2] == -1 and np.isnan(float(t[3]))
    r = exact_erf(torch.tensor([inf, -inf, -0.0, nan]))
    assert r[0] == 1 and r[1] == -1 and torch.signbit(r[2]) and np.isnan(float(r[3]))
    s = exact_sigmoid(torch.tensor([-inf, inf, nan]))
    assert s[0] == 0 and s[1] == 1 and np.isnan(float(s[2]))
    p = exact_pow_scalar(torch.tensor([-2.0, 0.0, inf]), 1.5)
    assert np.isnan(float(p[0])) and p[1] == 0 and p[2] == inf


def test_non_float32_is_refused() -> None:
    with pytest.raises(UnsupportedOperator, match="aten.exp"):
        exact_exp(torch.ones(2, dtype=torch.float64))


def _ieee_sqrt(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 sqrt: float64 holds enough bits (53 >= 2 * 24 + 2) for one rounding to suffice."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(x.astype(np.float64)).astype(np.float32)


def test_sqrt_is_correctly_rounded_everywhere() -> None:
    """torch's own CPU sqrt is not (it is off by an ulp on many inputs, differently per CPU capability): exact
    mode computes its own."""
    tiny = torch.from_numpy(np.arange(1, 5000, dtype=np.int32)).view(torch.float32)  # the smallest subnormals
    big = torch.from_numpy(np.arange(0x7F7FFFFF - 5000, 0x7F800000, dtype=np.int32)).view(torch.float32)  # up to max
    for x in (POS, WIDE.abs(), tiny, big, torch.tensor([1.0, 4.0, 2.0, 0.25, 2.0**-149, 2.0**127])):
        assert torch.equal(exact_sqrt(x).view(torch.int32), torch.from_numpy(_ieee_sqrt(x.numpy())).view(torch.int32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, min_value=0.0, allow_infinity=True), min_size=1, max_size=32))
def test_sqrt_is_correctly_rounded_for_any_float(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(exact_sqrt(x).view(torch.int32), torch.from_numpy(_ieee_sqrt(x.numpy())).view(torch.int32))


def test_sqrt_and_rsqrt_special_values() -> None:
    inf, nan = float("inf"), float("nan")
    s = exact_sqrt(torch.tensor([0.0, -0.0, inf, -1.0, -inf, nan, -1e-45]))
    assert s[0] == 0 and not torch.signbit(s[0]) and torch.signbit(s[1]) and s[2] == inf
    assert all(np.isnan(float(v)) for v in s[3:])
    r = exact_rsqrt(torch.tensor([0.0, -0.0, inf, -4.0, nan, 4.0, 1e-45]))
    assert r[0] == inf and r[1] == -inf and r[2] == 0 and np.isnan(float(r[3])) and np.isnan(float(r[4])) and r[5] == 0.5
    assert float(r[6]) == pytest.approx(1 / math.sqrt(1.401298464324817e-45), rel=1e-7)


def test_std_and_pow_half_use_the_correct_sqrt() -> None:
    from pol.exact import exact_mode

    x = WIDE[:4096].reshape(64, 64)
    with exact_mode():
        std = torch.std(x, dim=1)
        var = torch.var(x, dim=1)
        half = x.abs() ** 0.5
        root = torch.sqrt(x.abs())
        out = torch.empty_like(root)
        torch.sqrt(x.abs(), out=out)
    assert torch.equal(std, exact_sqrt(var)) and torch.equal(half, exact_sqrt(x.abs()))
    assert torch.equal(root, exact_sqrt(x.abs())) and torch.equal(out, root)
