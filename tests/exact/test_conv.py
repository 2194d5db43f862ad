"""Exact convolution and pooling against native kernels (close) and their own invariances (bit-identical)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pol.errors import UnsupportedOperator
from pol.exact import exact_mode
from tests.exact.helpers import f32

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and the torch path alike


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (2, 0, 2), (3, 2, 1)])
def test_conv2d_forward_and_backward_close_to_native(stride: int, padding: int, dilation: int) -> None:
    rng = np.random.default_rng(stride * 10 + padding)
    x = f32(rng.standard_normal((2, 3, 9, 8))).requires_grad_()
    w = f32(rng.standard_normal((4, 3, 3, 3))).requires_grad_()
    b = f32(rng.standard_normal(4)).requires_grad_()
    out = F.conv2d(x, w, b, stride, padding, dilation)
    g = f32(rng.standard_normal(tuple(out.shape)))
    ref = (out, *torch.autograd.grad(out, (x, w, b), g))
    with exact_mode():
        eout = F.conv2d(x, w, b, stride, padding, dilation)
        got = (eout, *torch.autograd.grad(eout, (x, w, b), g))
    for r, e in zip(ref, got, strict=True):
        assert torch.allclose(r, e, atol=1e-5, rtol=1e-5)


def test_conv1d_and_pooling_close_to_native() -> None:
    rng = np.random.default_rng(1)
    x1 = f32(rng.standard_normal((2, 3, 10))).requires_grad_()
    w1 = f32(rng.standard_normal((4, 3, 3))).requires_grad_()
    x2 = f32(rng.standard_normal((2, 3, 8, 8))).requires_grad_()

    def run() -> list[torch.Tensor]:
        o1 = F.conv1d(x1, w1, None, 2, 1)
        o2 = F.avg_pool2d(x2, 3, 1, 1) + F.max_pool2d(x2, 3, 1, 1)
        return [o1, o2, *torch.autograd.grad(o1.square().sum() + o2.square().sum(), (x1, w1, x2))]

    ref = run()
    with exact_mode():
        got = run()
    for r, e in zip(ref, got, strict=True):
        assert torch.allclose(r, e, atol=1e-5, rtol=1e-5)


def test_conv_is_layout_independent() -> None:
    rng = np.random.default_rng(2)
    x = f32(rng.standard_normal((2, 3, 8, 8)))
    w = f32(rng.standard_normal((4, 3, 3, 3)))
    with exact_mode():
        a = F.conv2d(x, w, padding=1)
        b = F.conv2d(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), w, padding=1)
    assert torch.equal(a, b)


def test_three_d_convolution_is_refused() -> None:
    with pytest.raises(UnsupportedOperator, match="3-D"), exact_mode():
        F.conv3d(torch.ones(1, 4, 5, 5, 5), torch.ones(4, 4, 3, 3, 3))
