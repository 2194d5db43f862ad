"""The layers of the common model families under exact mode (pol/exact/norms via torch's decompositions, attention,
resample, conv, elementwise sin/cos, reduce cumsum): one digest at 1 and 2 threads, under the default instruction set
and with the compiled kernels off; accuracy against float64 at least that of native float32 (within a factor 2);
IEEE special values; metadata-only in-place ops as views."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pol.errors import UnsupportedOperator
from pol.exact import exact_cos, exact_mode, exact_sin
from tests.exact.helpers import f32, ulps

ROOT = Path(__file__).resolve().parents[2]
aten = torch.ops.aten


def _layer_digests(env_extra: dict[str, str], threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "POL_EXACT_NATIVE")} | env_extra
    out = subprocess.run(
        [sys.executable, "-m", "tests.exact.layers_run", "--threads", str(threads)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    return dict(line.split() for line in out.strip().splitlines())


def test_layers_give_one_digest_across_threads_instruction_sets_and_kernels() -> None:
    runs = {
        "1-thread": _layer_digests({}, 1),
        "2-threads": _layer_digests({}, 2),
        "no-kernels-default-isa": _layer_digests({"POL_EXACT_NATIVE": "0", "ATEN_CPU_CAPABILITY": "default"}, 2),
    }
    names = set(runs["1-thread"])
    assert len(names) == 16
    for name in names:
        assert len({r[name] for r in runs.values()}) == 1, (name, {k: r[name] for k, r in runs.items()})


def _err(fn, *xs: torch.Tensor) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Max |error| against float64 of the exact and the native float32 forward and input gradients."""
    weights = torch.from_numpy(np.random.default_rng(1).standard_normal(10000))

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        y = fn(*inputs)
        (y * weights[: y.numel()].reshape(y.shape).to(y.dtype)).sum().backward()
        return [y.detach(), *(t.grad for t in inputs)]  # type: ignore[misc]

    ref = run([x.double().requires_grad_() for x in xs])
    with exact_mode():
        exact = run([x.clone().requires_grad_() for x in xs])
    native = run([x.clone().requires_grad_() for x in xs])

    def worst(got: list[torch.Tensor]) -> float:
        return max(float((g.double() - r).abs().max() / r.abs().max().clamp(min=1e-30)) for g, r in zip(got, ref, strict=True))

    return worst(exact), worst(native)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return f32(np.random.default_rng(seed).standard_normal(shape))


ACCURACY_CASES = {
    "batchnorm": (lambda x: F.batch_norm(x, None, None, training=True), [_x(4, 3, 5, 5)]),
    "groupnorm": (lambda x: F.group_norm(x, 2), [_x(2, 4, 5, 5)]),
    "sdpa-causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [_x(2, 2, 9, 8, seed=s) for s in (1, 2, 3)]),
    "sdpa-gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), [_x(1, 4, 7, 8, seed=1), _x(1, 2, 7, 8, seed=2), _x(1, 2, 7, 8, seed=3)]),
    "grouped-conv": (lambda x, w: F.conv2d(x, w, padding=1, groups=2), [_x(2, 4, 6, 6), _x(6, 2, 3, 3, seed=1)]),
    "depthwise-conv": (lambda x, w: F.conv2d(x, w, stride=2, groups=4), [_x(2, 4, 7, 7), _x(4, 1, 3, 3, seed=1)]),
    "conv-transpose": (lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1), [_x(2, 4, 5, 5), _x(4, 3, 3, 3, seed=1)]),
    "conv-transpose-1d-grouped": (lambda x, w: F.conv_transpose1d(x, w, stride=3, groups=2), [_x(2, 4, 9), _x(4, 3, 4, seed=1)]),
    "adaptive-avg": (lambda x: F.adaptive_avg_pool2d(x, (3, 4)), [_x(2, 3, 7, 9)]),
    "nearest": (lambda x: F.interpolate(x, size=(9, 7), mode="nearest"), [_x(2, 3, 4, 5)]),
    "bilinear": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), [_x(2, 3, 4, 5)]),
    "bilinear-corners": (lambda x: F.interpolate(x, size=(9, 7), mode="bilinear", align_corners=True), [_x(2, 3, 4, 5)]),
    "cumsum": (lambda x: torch.cumsum(x, 1), [_x(3, 300)]),
    "sin-cos": (lambda x: torch.sin(x * 10) + torch.cos(x * 10), [_x(2000)]),
}


@pytest.mark.parametrize("case", list(ACCURACY_CASES))
def test_accuracy_against_float64_is_that_of_native_float32(case: str) -> None:
    fn, xs = ACCURACY_CASES[case]
    exact, native = _err(fn, *xs)
    assert exact <= 2 * native + 1e-7, (exact, native)


def test_sin_and_cos_are_within_half_an_ulp_and_keep_ieee_special_values() -> None:
    rng = np.random.default_rng(5)
    x = torch.cat([f32(rng.standard_normal(20000) * 50), f32(np.exp2(rng.uniform(-140, 20, 5000)))])
    for fn, ref in ((exact_sin, np.sin), (exact_cos, np.cos)):
        assert float(ulps(fn(x), torch.from_numpy(ref(x.double().numpy()))).max()) <= 0.51
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-40, float("inf"), float("-inf"), float("nan")])
    s, c = exact_sin(special), exact_cos(special)
    assert torch.equal(s[:4], special[:4]) and torch.signbit(s[1]) and s[4:].isnan().all()
    assert c[:4].tolist() == [1.0] * 4 and c[4:].isnan().all()
    with pytest.raises(UnsupportedOperator):
        exact_sin(special.double())


def test_cumsum_prefixes_are_exact_sums_with_ieee_special_values() -> None:
    x = torch.tensor([[1e20, 1.0, -1e20, 1.0], [-0.0, -0.0, 1e-45, float("inf")], [1.0, float("nan"), 1.0, 1.0]])
    with exact_mode():
        c = torch.cumsum(x, 1)
    assert c[0].tolist() == [x[0, 0].item(), x[0, 0].item(), 1.0, 2.0]  # each prefix rounded once: the 1 survives the cancellation
    assert torch.signbit(c[1, :2]).all() and c[1, 2].item() == x[1, 2].item() and c[1, 3].item() == float("inf")
    assert c[2, 0].item() == 1.0 and c[2, 1:].isnan().all()


def test_sdpa_rows_with_every_key_masked_give_zero_and_dropout_is_refused() -> None:
    q = _x(1, 1, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    q.requires_grad_()
    with exact_mode():
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        out.sum().backward()
    assert torch.equal(out[0, 0, 1], torch.zeros(4)) and torch.isfinite(q.grad).all()  # type: ignore[arg-type]
    with exact_mode(), pytest.raises(UnsupportedOperator, match="dropout"):
        aten._scaled_dot_product_flash_attention_for_cpu.default(q, q, q, 0.1)


def test_layouts_do_not_change_a_bit() -> None:
    x, w = _x(2, 4, 6, 6), _x(4, 1, 3, 3, seed=1)
    with exact_mode():
        a = F.conv_transpose2d(F.conv2d(x, w, padding=1, groups=4), w.transpose(0, 1).contiguous().transpose(0, 1), groups=1)
        xc = x.contiguous(memory_format=torch.channels_last)
        b = F.conv_transpose2d(F.conv2d(xc, w, padding=1, groups=4), w.transpose(0, 1).contiguous().transpose(0, 1), groups=1)
        bn_a = F.batch_norm(x, None, None, training=True)
        bn_b = F.batch_norm(xc, None, None, training=True)
        q = _x(2, 3, 5, 8)
        s_a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        s_b = F.scaled_dot_product_attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, is_causal=True)
    assert torch.equal(a, b) and torch.equal(bn_a, bn_b) and torch.equal(s_a, s_b)


def test_batch_norm_updates_running_stats_in_training_and_uses_them_in_eval() -> None:
    bn = nn.BatchNorm2d(3)
    x = _x(4, 3, 5, 5) * 3 + 1
    with exact_mode():
        bn(x)
    ref = nn.BatchNorm2d(3)
    ref(x)
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6) and torch.allclose(bn.running_var, ref.running_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    ref.eval()
    with exact_mode():
        y = bn(x)
    assert torch.allclose(y, ref(x), atol=1e-5)


def test_metadata_only_in_place_ops_are_views() -> None:
    x = torch.arange(12.0)
    conv = nn.Conv2d(2, 2, 3)
    with exact_mode():
        v = x[:]
        v.as_strided_((3, 2), (4, 1))
        assert v.data_ptr() == x.data_ptr() and v.tolist() == [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]]
        r = x[:6]
        r.resize_(2, 3)
        assert r.data_ptr() == x.data_ptr() and r.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        y = nn.AdaptiveAvgPool2d(1)(conv(_x(1, 2, 5, 5)))  # as_strided_ on a view inside the pooling
    assert y.shape == (1, 2, 1, 1)


def test_dropout_backward_is_grad_times_mask_times_scale() -> None:
    g, mask = _x(50), torch.from_numpy(np.random.default_rng(2).random(50) > 0.5)
    with exact_mode():
        out = aten.native_dropout_backward.default(g, mask, 2.0)
    assert torch.equal(out, g * mask * 2.0)
