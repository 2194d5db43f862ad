"""Exact average pooling with torch's full geometry (ceil_mode's partial windows, count_include_pad=False,
divisor_override), forward and backward: torch's shapes and divisors, at least native float32's accuracy against a
float64 reference, and the same bits at 1 and 2 threads, on the compiled kernels and the torch path, and for any
memory layout."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pol.exact import exact_mode, native
from tests.exact.helpers import f32, ulps, wide_rows

pytestmark = pytest.mark.usefixtures("both_paths")

CASES = [  # kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, (h, w)
    (3, 2, 1, True, False, None, (7, 8)),
    (3, 2, 1, True, True, None, (7, 8)),
    (3, 2, 0, True, True, None, (8, 9)),
    (2, 2, 1, False, False, None, (5, 5)),
    ((3, 2), (2, 3), (1, 0), True, False, None, (9, 7)),
    (3, 1, 1, False, True, 5, (6, 6)),
    (3, 3, 1, True, False, 7, (10, 11)),
    (4, 3, 2, True, False, None, (6, 13)),
    (2, 2, 0, False, True, None, (6, 6)),  # the case supported before: same bits as ever
    (1, 2, 0, True, True, None, (5, 4)),
]


def _inputs(h: int, w: int, seed: int) -> torch.Tensor:
    x = f32(wide_rows(np.random.default_rng(seed), (6, h * w), spread=6).reshape(2, 3, h, w))
    x.view(-1)[:3] = torch.tensor([1e-45, -0.0, -3e-39])
    return x


def _grad_for(x: torch.Tensor, case: tuple) -> torch.Tensor:  # type: ignore[type-arg]
    k, s, p, ceil, include, div, _ = case
    shape = F.avg_pool2d(x, k, s, p, ceil, include, div).shape
    n = int(np.prod(shape))
    return f32(np.linspace(-3, 5, n) * np.exp2(np.arange(n) % 9 - 4)).reshape(shape).to(x.dtype)


def _pool(x: torch.Tensor, g: torch.Tensor, case: tuple) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
    k, s, p, ceil, include, div, _ = case
    x = x.detach().requires_grad_()
    out = F.avg_pool2d(x, k, s, p, ceil, include, div)
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("case", CASES)
def test_avg_pool2d_has_torchs_geometry_and_at_least_native_accuracy(case: tuple) -> None:  # type: ignore[type-arg]
    x = _inputs(*case[-1], seed=len(str(case)))
    g = _grad_for(x, case)
    ref_out, ref_grad = _pool(x.double(), g.double(), case)  # float64: the reference
    nat_out, nat_grad = _pool(x, g, case)
    with exact_mode():
        out, grad = _pool(x, g, case)
    assert out.shape == nat_out.shape and grad.shape == x.shape
    for got, nat, ref in ((out, nat_out, ref_out), (grad, nat_grad, ref_grad)):
        # one exact sum rounded once, then one division: within 1.5 ulp where native float32 may be far off
        assert float(ulps(got, ref).max()) <= max(1.5, float(ulps(nat, ref).max()))


@pytest.mark.parametrize("case", CASES)
def test_avg_pool2d_bits_do_not_depend_on_threads_kernels_or_layout(case: tuple) -> None:  # type: ignore[type-arg]
    x = _inputs(*case[-1], seed=7)
    g = _grad_for(x, case)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n, layout, kernels in itertools.product((1, 2), ("contiguous", "channels_last"), (True, False)):
            torch.set_num_threads(n)
            xx = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
            with exact_mode():
                if kernels:
                    runs.append(_pool(xx, g, case))
                else:
                    with native.disabled():
                        runs.append(_pool(xx, g, case))
    finally:
        torch.set_num_threads(threads)
    for out, grad in runs[1:]:
        assert torch.equal(_bits(out), _bits(runs[0][0])) and torch.equal(_bits(grad), _bits(runs[0][1]))


def test_avg_pool2d_special_values_and_errors() -> None:
    x = torch.tensor([[[[1.0, float("inf")], [float("nan"), -0.0]], [[-0.0, -0.0], [-0.0, -0.0]]]])
    with exact_mode():
        out = F.avg_pool2d(x, 2, 2, 1, True, False)
    native_out = F.avg_pool2d(x, 2, 2, 1, True, False)
    assert torch.equal(out.isnan(), native_out.isnan()) and torch.equal(out.nan_to_num(), native_out.nan_to_num())
    with exact_mode(), pytest.raises(RuntimeError):
        F.avg_pool2d(x, 2, divisor_override=0)
    with exact_mode(), pytest.raises(RuntimeError):
        F.avg_pool2d(x, 2, 2, 2)  # padding above half the kernel, as torch
