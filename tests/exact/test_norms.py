"""The exact handlers written out from torch's decompositions (pol/exact/mode.py: layer norm, softmax, log-softmax,
GELU, NLL loss, embedding backward) are those decompositions bit for bit: held here to each decomposition run under
the exact mode, on the compiled kernels and the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._decomp

from pol.exact import exact_mode
from tests.exact.helpers import f32, wide_rows

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and the torch path alike

aten = torch.ops.aten
FWD, BWD = aten.native_layer_norm.default, aten.native_layer_norm_backward.default


def _bits_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("shape,norm", [((4, 5, 8), (8,)), ((3, 64), (64,)), ((2, 3, 4, 5), (4, 5)), ((7, 1), (1,)), ((300,), (300,))])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_layer_norm_handlers_equal_the_decomposition(shape: tuple[int, ...], norm: tuple[int, ...], affine: str) -> None:
    rng = np.random.default_rng(len(shape) * 10 + len(affine))
    x = f32(wide_rows(rng, (1, int(np.prod(shape))), spread=8).reshape(shape))
    w = f32(rng.standard_normal(norm)) if affine in ("both", "weight") else None
    b = f32(rng.standard_normal(norm)) if affine in ("both", "bias") else None
    go = f32(wide_rows(rng, (1, int(np.prod(shape))), spread=8).reshape(shape))
    with exact_mode():
        new = FWD(x, list(norm), w, b, 1e-5)
        old = torch._decomp.decomposition_table[FWD](x, list(norm), w, b, 1e-5)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            got = BWD(go, x, list(norm), new[1], new[2], w, b, mask)
            want = torch._decomp.decomposition_table[BWD](go, x, list(norm), old[1], old[2], w, b, mask)
            assert all(_bits_equal(g, h) for g, h in zip(got, want, strict=True)), (mask, affine)
    assert all(_bits_equal(g, h) for g, h in zip(new, old, strict=True))


def test_layer_norm_trains_through_the_module_and_autograd() -> None:
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(16)
    x = torch.randn(8, 16, requires_grad=True)
    with exact_mode() as mode:
        y = ln(x)
        (y * y).sum().backward()
    assert "aten.native_layer_norm.default" in mode.seen and "aten.native_layer_norm_backward.default" in mode.seen
    assert x.grad is not None and ln.weight.grad is not None and ln.bias.grad is not None
    assert torch.allclose(y, torch.nn.functional.layer_norm(x, (16,), ln.weight, ln.bias), atol=1e-5)


def test_constant_rows_and_special_values() -> None:
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, -0.0, 0.0, 0.0], [1.0, float("inf"), 2.0, 3.0], [1e-45, 0.0, -1e-45, 1e-45]])
    with exact_mode():
        new = FWD(x, [4], None, None, 1e-5)
        old = torch._decomp.decomposition_table[FWD](x, [4], None, None, 1e-5)
    assert all(_bits_equal(g, h) for g, h in zip(new, old, strict=True))


SM, SMB = aten._softmax.default, aten._softmax_backward_data.default
GELU, GELUB = aten.gelu.default, aten.gelu_backward.default


@pytest.mark.parametrize("shape,dim", [((4, 5, 8), -1), ((64, 32), 1), ((6, 7), 0), ((3, 4, 5), 1), ((9,), 0)])
def test_softmax_handlers_equal_the_decomposition(shape: tuple[int, ...], dim: int) -> None:
    rng = np.random.default_rng(sum(shape))
    x = f32(rng.standard_normal(shape) * 5)
    if len(shape) == 2:
        x[0, :3] = float("-inf")  # masked entries, as causal attention has
    g = f32(wide_rows(rng, (1, int(np.prod(shape))), spread=6).reshape(shape))
    with exact_mode():
        new = SM(x, dim, False)
        old = torch._decomp.decomposition_table[SM](x, dim, False)
        new_b = SMB(g, new, dim, torch.float32)
        old_b = torch._decomp.decomposition_table[SMB](g, old, dim, torch.float32)
    assert _bits_equal(new, old) and _bits_equal(new_b, old_b)


def test_softmax_rows_with_nan_or_all_masked() -> None:
    x = torch.tensor([[1.0, float("nan"), 2.0], [float("-inf")] * 3, [float("inf"), 0.0, 1.0], [-0.0, 0.0, -0.0]])
    with exact_mode():
        new = SM(x, -1, False)
        old = torch._decomp.decomposition_table[SM](x, -1, False)
    assert torch.equal(new.isnan(), old.isnan()) and torch.equal(torch.nan_to_num(new), torch.nan_to_num(old))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_handlers_equal_the_decomposition(approximate: str) -> None:
    rng = np.random.default_rng(3)
    x = torch.cat([f32(rng.standard_normal(5000) * 4), torch.tensor([0.0, -0.0, 1e-45, -1e-40, 9.0, -9.0, 30.0, -30.0])])
    g = f32(wide_rows(rng, (1, x.numel()), spread=6).reshape(-1))
    with exact_mode():
        new = GELU(x, approximate=approximate)
        old = torch._decomp.decomposition_table[GELU](x, approximate=approximate)
        new_b = GELUB(g, x, approximate=approximate)
        old_b = torch._decomp.decomposition_table[GELUB](g, x, approximate=approximate)
    assert _bits_equal(new, old) and _bits_equal(new_b, old_b)
    with exact_mode():  # a non-contiguous input takes the same definition
        assert _bits_equal(GELU(x.reshape(2, -1).t(), approximate=approximate), new.reshape(2, -1).t())


def test_softmax_of_empty_tensors_keeps_their_shape() -> None:
    with exact_mode():
        for shape in ((3, 0), (0, 4)):
            out = torch.softmax(torch.zeros(shape), -1)
            assert out.shape == shape


LSM, LSMB = aten._log_softmax.default, aten._log_softmax_backward_data.default


@pytest.mark.parametrize("shape,dim", [((512, 32), -1), ((4, 5, 8), 1), ((6, 7), 0), ((9,), 0), ((3, 1), -1)])
def test_log_softmax_handlers_equal_the_decomposition(shape: tuple[int, ...], dim: int) -> None:
    rng = np.random.default_rng(sum(shape) + 7)
    x = f32(rng.standard_normal(shape) * 8)
    if len(shape) == 2 and shape[1] > 3:
        x[0, :3] = float("-inf")  # some masked entries, the row's maximum still finite
    g = f32(wide_rows(rng, (1, int(np.prod(shape))), spread=6).reshape(shape))
    with exact_mode():
        new = LSM(x, dim, False)
        old = torch._decomp.decomposition_table[LSM](x, dim, False)
        new_b = LSMB(g, new, dim, torch.float32)
        old_b = torch._decomp.decomposition_table[LSMB](g, old, dim, torch.float32)
    assert _bits_equal(new, old) and _bits_equal(new_b, old_b)


def test_log_softmax_rows_with_nan_infinity_or_all_masked_take_the_definition() -> None:
    x = torch.tensor([[1.0, float("nan"), 2.0], [float("-inf")] * 3, [float("inf"), 0.0, 1.0], [-0.0, 0.0, 3.0]])
    with exact_mode():
        new = LSM(x, -1, False)
        old = torch._decomp.decomposition_table[LSM](x, -1, False)
        scalar = LSM(torch.tensor(2.5), 0, False)
    assert _bits_equal(new, old)
    assert scalar.shape == () and scalar.item() == 0.0


NLL, NLLB = aten.nll_loss_forward.default, aten.nll_loss_backward.default


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_nll_loss_handlers_equal_the_decomposition(reduction: int, weighted: bool, batched: bool) -> None:
    rng = np.random.default_rng(reduction * 4 + weighted * 2 + batched)
    x = f32(wide_rows(rng, (1, 40 * 7), spread=10).reshape(40, 7))
    target = torch.from_numpy(rng.integers(0, 7, 40))
    target[::5] = 3  # the ignored class: where-masked terms and a smaller total weight
    weight = f32(rng.random(7) + 0.5) if weighted else None
    if not batched:
        x, target = x[0], target[1]
    with exact_mode():
        new = NLL(x, target, weight, reduction, 3)
        old = torch._decomp.decomposition_table[NLL](x, target, weight, reduction, 3)
        go = torch.ones_like(new[0]) * 0.75
        new_b = NLLB(go, x, target, weight, reduction, 3, new[1])
        old_b = torch._decomp.decomposition_table[NLLB](go, x, target, weight, reduction, 3, old[1])
    assert all(_bits_equal(a, b) for a, b in zip(new, old, strict=True)) and _bits_equal(new_b, old_b)


EMB = aten.embedding_dense_backward.default


@pytest.mark.parametrize("padding_idx", [-1, 2])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
@pytest.mark.parametrize("index_shape", [(16, 32), (50,)])
def test_embedding_backward_handler_equals_the_decomposition(padding_idx: int, scale_grad_by_freq: bool, index_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(padding_idx + 3 * scale_grad_by_freq + len(index_shape))
    indices = torch.from_numpy(rng.integers(0, 9, index_shape))
    n = int(np.prod(index_shape))
    grad = f32(wide_rows(rng, (n, 6), spread=30).reshape(*index_shape, 6))
    grad[..., 0] = -0.0  # a column of negative zeros: the zero table's +0 decides the sign
    with exact_mode():
        new = EMB(grad, indices, 11, padding_idx, scale_grad_by_freq)  # rows 9 and 10 receive nothing
        old = torch._decomp.decomposition_table[EMB](grad, indices, 11, padding_idx, scale_grad_by_freq)
    assert _bits_equal(new, old)
    assert new.shape == (11, 6)


@pytest.mark.parametrize("op", [SM, LSM])
def test_softmax_handlers_refuse_a_dimension_out_of_range_as_torch_does(op) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3)
    with pytest.raises(IndexError, match="Dimension out of range"):
        op(x, 5, False)  # torch's own kernel
    with exact_mode(), pytest.raises(IndexError, match="Dimension out of range"):
        op(x, 5, False)
    backward = SMB if op is SM else LSMB
    with exact_mode(), pytest.raises(IndexError, match="Dimension out of range"):
        backward(x, x, -3, torch.float32)


BN, BN_BWD = aten.native_batch_norm.default, aten.native_batch_norm_backward.default


@pytest.mark.parametrize("shape", [(8, 16, 8, 8), (4, 3, 5), (6, 4), (2, 5, 3, 4, 2), (1, 3, 1, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_batch_norm_handlers_equal_the_decomposition(shape: tuple[int, ...], affine: bool, training: bool, layout: str) -> None:
    """native_batch_norm (training and eval, running statistics updated in place) and its backward: the written-out
    handlers against torch's decomposition run under the exact mode, bit for bit, on wide-range inputs with
    subnormals, signed zeros and (last test) non-finite values, on several memory layouts."""
    rng = np.random.default_rng(sum(shape) + affine + 2 * training)
    n = int(np.prod(shape))
    x = f32(wide_rows(rng, (1, n), spread=12).reshape(shape))
    go = f32(wide_rows(rng, (1, n), spread=12).reshape(shape))
    x.view(-1)[:3] = torch.tensor([1e-45, -0.0, 3e-39])
    if layout == "channels_last" and x.dim() == 4:
        x, go = x.to(memory_format=torch.channels_last), go.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x, go = x.transpose(0, -1).contiguous().transpose(0, -1), go.transpose(0, -1).contiguous().transpose(0, -1)
    c = shape[1]
    w, b = (f32(rng.standard_normal(c)), f32(rng.standard_normal(c))) if affine else (None, None)
    stats = [(f32(rng.standard_normal(c)), f32(rng.random(c) + 0.5)) for _ in range(2)]
    stats[1] = (stats[0][0].clone(), stats[0][1].clone())
    with exact_mode():
        new = BN(x, w, b, *stats[0], training, 0.1, 1e-5)
        old = torch._decomp.decomposition_table[BN](x, w, b, *stats[1], training, 0.1, 1e-5)
        for mask in ([True, True, True], [True, False, False]):
            got = BN_BWD(go, x, w, *stats[0], new[1], new[2], training, 1e-5, mask)
            want = torch._decomp.decomposition_table[BN_BWD](go, x, w, *stats[1], old[1], old[2], training, 1e-5, mask)
            assert all(_bits_equal(g, h) for g, h in zip(got, want, strict=True)), mask
    assert all(_bits_equal(g, h) for g, h in zip(new, old, strict=True))
    assert _bits_equal(stats[0][0], stats[1][0]) and _bits_equal(stats[0][1], stats[1][1])


def test_batch_norm_with_non_finite_values_and_without_running_statistics() -> None:
    x = f32(np.random.default_rng(3).standard_normal((4, 3, 2, 2)))
    x[0, 0, 0, 0], x[1, 1, 0, 1] = float("nan"), float("inf")
    go = torch.ones_like(x)
    go[2, 2, 1, 1] = float("-inf")
    with exact_mode():
        new = BN(x, None, None, None, None, True, 0.1, 1e-5)
        old = torch._decomp.decomposition_table[BN](x, None, None, None, None, True, 0.1, 1e-5)
        got = BN_BWD(go, x, None, None, None, new[1], new[2], True, 1e-5, [True, False, False])
        want = torch._decomp.decomposition_table[BN_BWD](go, x, None, None, None, old[1], old[2], True, 1e-5, [True, False, False])
    assert all(_bits_equal(g, h) for g, h in zip((*new, *got), (*old, *want), strict=True))


@pytest.mark.parametrize("op", [aten.silu.default, aten.silu_backward.default, aten.tanh_backward.default])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast"])
def test_silu_and_tanh_backward_handlers_equal_the_decomposition(op, layout: str) -> None:  # type: ignore[no-untyped-def]
    """SiLU, its backward and tanh's backward: the written-out handlers against torch's decomposition under the
    exact mode, bit for bit, on wide-range values with subnormals, signed zeros, infinities and NaN."""
    rng = np.random.default_rng(11)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 3e-39, 88.0, -88.0, 104.0, -104.0, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([f32(wide_rows(rng, (1, 1012), spread=10).reshape(-1)), specials]).reshape(32, 32)
    g = f32(wide_rows(rng, (1, 1024), spread=6).reshape(32, 32))
    if layout == "transposed":
        x, g = x.t(), g.t()
    elif layout == "broadcast":
        g = g[:1].expand(32, 32)
    args = (x,) if op is aten.silu.default else (g, x if op is aten.silu_backward.default else x.clamp(-1, 1))
    with exact_mode():
        new = op(*args)
        old = torch._decomp.decomposition_table[op](*args)
    assert _bits_equal(new, old)  # NaN payloads included


@pytest.mark.parametrize("shape,dim", [((2, 4, 8, 8), -1), ((6, 7), 0), ((3, 4, 5), 1), ((9,), 0)])
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_safe_softmax_handler_equals_the_decomposition(shape: tuple[int, ...], dim: int, dtype: torch.dtype | None) -> None:
    """_safe_softmax (SDPA's math path): the written-out handler against torch's decomposition under the exact mode,
    bit for bit, with fully masked rows (0), partly masked rows, NaN, +inf and signed zeros."""
    rng = np.random.default_rng(len(shape) + dim)
    x = f32(wide_rows(rng, (1, int(np.prod(shape))), spread=4).reshape(shape))
    if x.dim() > 1:
        x.movedim(dim, -1)[..., 0, :] = float("-inf")  # a fully masked row
    x.view(-1)[-5:] = torch.tensor([float("-inf"), float("nan"), float("inf"), -0.0, 1e-45])
    op = aten._safe_softmax.default
    with exact_mode():
        new = op(x, dim, dtype=dtype) if dtype else op(x, dim)
        old = torch._decomp.decomposition_table[op](x, dim, dtype=dtype) if dtype else torch._decomp.decomposition_table[op](x, dim)
    assert _bits_equal(new, old)
