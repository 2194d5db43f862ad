"""The exact dispatch mode: what it routes (forward, backward, optimizer), what it refuses (by name), the split of
multi-rounding operators, and that exact training stays close to native training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pol.errors import UnsupportedOperator
from pol.exact import exact_mode, is_supported, supported_operators
from tests.exact.helpers import f32
from tests.exact.models import MODELS, init_numpy, loss_fn, make_data, native, train

aten = torch.ops.aten


def _grads(kind: str, mode, x=None) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    model = init_numpy(MODELS[kind](), 0)
    xs, ys = make_data(kind, 1, 8)
    with mode():
        loss_fn(kind, model(xs if x is None else x), ys).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_backward_and_optimizer_ops_are_routed_through_the_mode() -> None:
    seen: set[str] = set()
    for kind in ("mlp", "cnn", "attn"):
        mode = exact_mode()
        train(kind, 1, lambda mode=mode: mode)
        seen |= set(mode.seen)
    for op in (
        "aten.convolution_backward.default",
        "aten.native_layer_norm_backward.default",
        "aten.embedding_dense_backward.default",
        "aten._softmax_backward_data.default",
        "aten.gelu_backward.default",
        "aten.max_pool2d_with_indices_backward.default",
        "aten.avg_pool2d_backward.default",
        "aten.threshold_backward.default",
        "aten.mm.default",
        "aten.bmm.default",
        "aten.sqrt.default",
        "aten.nll_loss_backward.default",
        "aten.mse_loss_backward.default",
    ):
        assert op in seen, op


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn"])
def test_exact_gradients_are_close_to_native(kind: str) -> None:
    exact, nat = _grads(kind, exact_mode), _grads(kind, native)
    assert exact.keys() == nat.keys()
    for name in exact:
        scale = float(nat[name].abs().max()) + 1e-12
        assert float((exact[name] - nat[name]).abs().max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_exact_training_loss_within_two_percent_of_native(kind: str, optimizer: str) -> None:
    def final_loss(mode) -> float:  # type: ignore[no-untyped-def]
        params = train(kind, 6, mode, optimizer=optimizer)
        model = MODELS[kind]()
        model.load_state_dict(params, strict=False)
        x, y = make_data(kind, 99, 16)
        with torch.no_grad():
            return float(loss_fn(kind, model(x), y))

    e, n = final_loss(exact_mode), final_loss(native)
    assert abs(e - n) <= 0.02 * abs(n)


def test_non_contiguous_activations_give_identical_gradients() -> None:
    xs, _ = make_data("mlp", 1, 8)
    a = _grads("mlp", exact_mode, xs)
    b = _grads("mlp", exact_mode, xs.t().contiguous().t())
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_multi_rounding_operators_are_split_into_single_roundings() -> None:
    rng = np.random.default_rng(0)
    a, b, c = (f32(rng.standard_normal(1000)) for _ in range(3))
    with exact_mode():
        add_alpha = torch.add(a, b, alpha=0.3)
        sub_alpha = torch.sub(a, b, alpha=0.7)
        addcmul = torch.addcmul(a, b, c, value=0.5)
        addcdiv = torch.addcdiv(a, b, c.abs() + 1, value=0.5)
        lerp = torch.lerp(a, b, 0.25)
        inplace = a.clone().add_(b, alpha=2.0)
    assert torch.equal(add_alpha, a + b * 0.3)
    assert torch.equal(sub_alpha, a - b * 0.7)
    assert torch.equal(addcmul, a + (b * c) * 0.5)
    assert torch.equal(addcdiv, a + (b / (c.abs() + 1)) * 0.5)
    assert torch.equal(lerp, a + (b - a) * 0.25)
    with exact_mode():
        far = torch.lerp(a, b, 0.75)
        weights = torch.full_like(a, 0.75)
        weights[::2] = 0.25
        tensor_weight = torch.lerp(a, b, weights)
    assert torch.equal(far, b - (b - a) * (1 - 0.75))
    assert torch.equal(tensor_weight[::2], lerp[::2]) and torch.equal(tensor_weight[1::2], far[1::2])
    assert torch.equal(inplace, a + b * 2.0)


@pytest.mark.parametrize(
    "fn,name",
    [
        (lambda x: torch.lgamma(x), "aten.lgamma"),
        (lambda x: torch.randn(3), "aten.randn"),
        (lambda x: torch.rand_like(x), "aten.rand_like"),
        (lambda x: F.dropout(x, 0.5, training=True), "bernoulli|dropout"),
        (lambda x: x.double() @ x.double().t(), "aten.mm"),
        (lambda x: torch.prod(x), "aten.prod"),
        (lambda x: x.normal_(), "aten.normal_"),
        (lambda x: torch.sum(x, dtype=torch.float64), "aten.sum"),
    ],
)
def test_unsupported_operators_raise_a_named_error(fn, name: str) -> None:  # type: ignore[no-untyped-def]
    x = torch.ones(4, 4)
    with pytest.raises(UnsupportedOperator, match=name), exact_mode():
        fn(x)


def test_integer_ops_and_data_movement_pass_through() -> None:
    with exact_mode():
        idx = torch.arange(10)
        s = idx.sum()
        x = torch.ones(3, 4).t().contiguous().view(-1)[torch.tensor([0, 5])]
    assert int(s) == 45 and x.tolist() == [1.0, 1.0]


def test_supported_operator_listing() -> None:
    names = supported_operators()
    assert "aten.mm.default" in names and "aten.view" in names
    assert is_supported(aten.mm.default) and is_supported(aten.add_.Tensor)
    assert not is_supported(aten.randn.default) and not is_supported(aten.lgamma.default)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: torch.logsumexp(x, dim=1),
        lambda x, y: torch.linalg.vector_norm(x, dim=1),
        lambda x, y: F.softplus(x),
        lambda x, y: F.elu(x),
        lambda x, y: F.leaky_relu(x, 0.1),
        lambda x, y: F.silu(x),
        lambda x, y: F.gelu(x, approximate="tanh"),
        lambda x, y: F.huber_loss(x, y),
        lambda x, y: F.smooth_l1_loss(x, y),
        lambda x, y: F.binary_cross_entropy_with_logits(x, torch.sigmoid(y)),
        lambda x, y: F.binary_cross_entropy(torch.sigmoid(x), torch.sigmoid(y)),
        lambda x, y: torch.mv(x, y[0]),
        lambda x, y: torch.dot(x[0], y[0]),
        lambda x, y: x.var(dim=1),
        lambda x, y: x.std(),
        lambda x, y: torch.sigmoid(x) * torch.tanh(y),
        lambda x, y: torch.baddbmm(x.unsqueeze(0), x.unsqueeze(0), y.t().unsqueeze(0)[:, :, :8]),
    ],
)
def test_decomposed_operators_run_exactly_and_close_to_native(fn) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    x = f32(rng.standard_normal((8, 8))).requires_grad_()
    y = f32(rng.standard_normal((8, 8)))
    ref = fn(x, y)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    with exact_mode():
        out = fn(x, y)
        (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g, gref, rtol=1e-4, atol=1e-5)


def test_in_place_forms_run_directly_as_route_operator_runs_them() -> None:
    """An in-place operator whose functional form has a handler (or passes through) is run without route_operator's
    look-ups each call (mode._DIRECT): the same result as routing it, written into `self`, which is returned."""
    from pol.exact import mode as exact_mode_module

    rng = np.random.default_rng(5)
    a, b = f32(rng.standard_normal((4, 6)) * 1e3), f32(rng.standard_normal((4, 6)))
    cases = [
        (aten.add_.Tensor, (b,), {"alpha": 0.3}),
        (aten.sub_.Tensor, (b,), {}),
        (aten.addcmul_.default, (b, a), {"value": -0.7}),
        (aten.lerp_.Scalar, (b, 0.25), {}),
        (aten.exp_.default, (), {}),
    ]
    for op, rest, kwargs in cases:
        assert exact_mode_module._direct(op) is not None, op
        x, y = a.clone() * 1e-3, a.clone() * 1e-3
        mode = exact_mode()
        with mode:
            got = op(x, *rest, **kwargs)
        routed = exact_mode_module.route_operator(mode, op, (y, *rest), kwargs)
        assert got is x and routed is y and torch.equal(x.view(torch.int32), y.view(torch.int32)), op
    steps = torch.zeros((), dtype=torch.int64)
    with exact_mode():
        steps.add_(1)
    assert int(steps) == 1
