"""The exact dispatch mode: every aten operator of a training step goes to an exact implementation.

Routing, in order (`route_operator`):
  1. random draws                       -> UnsupportedOperator (draws come from the hardware-independent generator)
  2. an exact handler for the overload  -> products, reductions, transcendentals, convolution, pooling, scatter-adds,
                                           layer norm, softmax, log-softmax, GELU, NLL loss and embedding backward
                                           (torch's decompositions written out, one fused kernel per row or element
                                           where it pays), and the split of multi-rounding ops (add/sub with alpha,
                                           addcmul, addcdiv, lerp: one rounding per step, in a fixed order)
  3. pass-through                       -> data movement, comparisons and single-rounding IEEE ops (+ - * /...; not
                                           sqrt: torch's CPU sqrt is not correctly rounded, so it has a handler)
  4. torch's own decomposition         -> the listed ones (other losses and activations...) and any
                                           CompositeImplicitAutograd operator; the decomposition runs under this
                                           mode again, so its pieces are routed too
  5. in-place form `op_` of a routed op  -> computed out of place, then copied into `self`
  6. an operator on integer/bool tensors only -> native (integer arithmetic is exact)
  7. anything else                      -> UnsupportedOperator naming the operator; never a silent native kernel.

The mode keeps a per-instance count of the operators it saw (`ExactMode.seen`), so tests can check that autograd's
backward and the optimizer step were routed through it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
import torch._decomp
from torch.utils._python_dispatch import TorchDispatchMode

from pol.errors import UnsupportedOperator
from pol.exact import conv, elementwise, matmul, native, reduce

__all__ = ["ExactMode", "exact_mode", "route_operator", "supported_operators", "is_supported"]

aten = torch.ops.aten
OpOverload = torch._ops.OpOverload
Handler = Callable[..., Any]

RANDOM_PACKETS = frozenset(
    p.lower()
    for p in (
        "rand",
        "rand_like",
        "randn",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "bernoulli",
        "bernoulli_",
        "normal",
        "normal_",
        "uniform",
        "uniform_",
        "native_dropout",
        "exponential_",
        "multinomial",
        "random_",
        "poisson",
        "cauchy_",
        "log_normal_",
        "geometric_",
        "rrelu_with_noise",
        "_fused_dropout",
    )
)

PASSTHROUGH_PACKETS = frozenset(
    (
        # views, copies and shape changes
        "view",
        "_unsafe_view",
        "reshape",
        "permute",
        "transpose",
        "t",
        "expand",
        "expand_as",
        "clone",
        "copy_",
        "copy",
        "slice",
        "select",
        "cat",
        "stack",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "narrow",
        "unsqueeze",
        "squeeze",
        "flatten",
        "contiguous",
        "as_strided",
        "alias",
        "detach",
        "lift_fresh",
        "lift_fresh_copy",
        "_to_copy",
        "unfold",
        "repeat",
        "roll",
        "flip",
        "diagonal",
        "slice_scatter",
        "select_scatter",
        "constant_pad_nd",
        "tril",
        "triu",
        "_unsafe_index",
        "index",
        "index_select",
        "gather",
        "embedding",
        "where",
        "masked_fill",
        "masked_fill_",
        "fill_",
        "fill",
        "zero_",
        "scatter",
        "scatter_",
        "one_hot",
        "_reshape_alias",
        "view_as",
        "movedim",
        "squeeze_",
        "unsqueeze_",
        "t_",
        "transpose_",
        # factories
        "zeros",
        "ones",
        "full",
        "empty",
        "empty_like",
        "zeros_like",
        "ones_like",
        "full_like",
        "new_zeros",
        "new_ones",
        "new_full",
        "new_empty",
        "new_empty_strided",
        "empty_strided",
        "scalar_tensor",
        "arange",
        "_local_scalar_dense",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "is_same_size",
        # comparisons, selections and sign-only ops: no rounded result
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "logical_not",
        "logical_and",
        "logical_or",
        "logical_xor",
        "bitwise_not",
        "bitwise_and",
        "bitwise_or",
        "bitwise_xor",
        "isnan",
        "isinf",
        "isfinite",
        "signbit",
        "amax",
        "amin",
        "max",
        "min",
        "aminmax",
        "argmax",
        "argmin",
        "maximum",
        "minimum",
        "clamp",
        "clamp_min",
        "clamp_max",
        "relu",
        "threshold",
        "threshold_backward",
        "hardtanh",
        "abs",
        "neg",
        "sign",
        "sgn",
        "floor",
        "ceil",
        "round",
        "trunc",
        "max_pool2d_with_indices",
        "any",
        "all",
        "sort",
        "topk",
        "nonzero",
        # single IEEE rounding each (correctly rounded on every IEEE machine)
        "mul",
        "div",
        "reciprocal",
        "fmod",
        "remainder",
        "mul_",
        "div_",
    )
)

DECOMPOSED: frozenset[OpOverload] = frozenset(
    (
        aten.mse_loss.default,
        aten.mse_loss_backward.default,
        aten.logsumexp.default,
        aten.linalg_vector_norm.default,
        aten.baddbmm.default,
        aten.tanh_backward.default,
        aten.sigmoid_backward.default,
        aten.silu.default,
        aten.silu_backward.default,
        aten.hardtanh_backward.default,
        aten.mv.default,
        aten.dot.default,
        aten.log_sigmoid_forward.default,
        aten.softplus.default,
        aten.elu.default,
        aten.leaky_relu.default,
        aten.leaky_relu_backward.default,
        aten.rsub.Tensor,
        aten.rsub.Scalar,
        aten.nll_loss2d_forward.default,
        aten.nll_loss2d_backward.default,
        aten.huber_loss.default,
        aten.smooth_l1_loss.default,
        aten.binary_cross_entropy.default,
        aten.binary_cross_entropy_backward.default,
        aten.binary_cross_entropy_with_logits.default,
        aten._unsafe_masked_index.default,
        aten._unsafe_masked_index_put_accumulate.default,
        aten.softplus_backward.default,
        aten.elu_backward.default,
        aten.huber_loss_backward.default,
        aten.smooth_l1_loss_backward.default,
        aten.log_sigmoid_backward.default,
        aten.select_backward.default,
        aten.slice_backward.default,
        aten.diagonal_backward.default,
        aten.glu.default,
        aten.glu_backward.default,
        aten.hardswish.default,
        aten.hardswish_backward.default,
        aten.mish.default,
        aten.logit.default,
        aten.logit_backward.default,
        aten.norm.Scalar,
        aten.norm.ScalarOpt_dim,
        aten.prelu.default,
    )
)


def _is_float_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _float_only(name: str, func: OpOverload, exact: Handler, allowed: frozenset[torch.dtype]) -> Handler:
    """Run `exact` on inputs of the allowed float dtypes, the native op on integer/bool-only inputs; refuse others."""

    def handler(*args: Any, **kwargs: Any) -> Any:
        floats = [t for t in _tensors(args, kwargs) if t.is_floating_point()]
        if not floats:
            return func(*args, **kwargs)
        if any(t.dtype not in allowed for t in floats):
            raise UnsupportedOperator(name, f"exact mode computes in float32, got {sorted({str(t.dtype) for t in floats})}")
        return exact(*args, **kwargs)

    return handler


# --- handlers (mode is off inside them: they call the exact primitives and native data movement) -------------


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul.exact_mm(a, b)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul.exact_bmm(a, b)


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1) -> torch.Tensor:
    prod = matmul.exact_mm(a, b)
    if alpha != 1:
        prod = prod * alpha
    if beta == 0:
        return prod
    return prod + (bias if beta == 1 else bias * beta)


def _sum(x: torch.Tensor, dim: Sequence[int] | None = None, keepdim: bool = False, *, dtype: torch.dtype | None = None):
    if dtype is not None and dtype != x.dtype:
        raise UnsupportedOperator("aten.sum", f"dtype change to {dtype}")
    return reduce.exact_sum(x, dim, keepdim)


def _mean(x: torch.Tensor, dim: Sequence[int] | None = None, keepdim: bool = False, *, dtype: torch.dtype | None = None):
    if dtype is not None and dtype != x.dtype:
        raise UnsupportedOperator("aten.mean", f"dtype change to {dtype}")
    return reduce.exact_mean(x, dim, keepdim)


def _add(a: Any, b: Any, *, alpha: float = 1) -> torch.Tensor:
    return torch.add(a, b if alpha == 1 else b * alpha)


def _sub(a: Any, b: Any, *, alpha: float = 1) -> torch.Tensor:
    return torch.sub(a, b if alpha == 1 else b * alpha)


def _addcmul(x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, *, value: float = 1) -> torch.Tensor:
    """x + (t1 * t2) * value: one rounding per operation, in this order (torch's own kernel may fuse them)."""
    prod = t1 * t2
    return x + (prod if value == 1 else prod * value)


def _addcdiv(x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, *, value: float = 1) -> torch.Tensor:
    """x + (t1 / t2) * value, one rounding per operation."""
    quot = t1 / t2
    return x + (quot if value == 1 else quot * value)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: Any) -> torch.Tensor:
    """start + weight * (end - start) where |weight| < 0.5, else end - (end - start) * (1 - weight): torch's own
    formula (exact at both ends), one rounding per operation."""
    diff = end - start
    if isinstance(weight, torch.Tensor):
        return torch.where(weight.abs() < 0.5, start + weight * diff, end - diff * (1 - weight))
    return start + diff * weight if abs(weight) < 0.5 else end - diff * (1 - weight)


def _pow(x: torch.Tensor, p: float) -> torch.Tensor:
    return elementwise.exact_pow_scalar(x, float(p))


def _index_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor, *, alpha: float = 1):
    return reduce.exact_index_add(x, dim, index, src if alpha == 1 else src * alpha)


def _scatter_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return reduce.exact_scatter_add(x, dim, index, src)


def _index_put(x: torch.Tensor, indices: Sequence[torch.Tensor | None], values: torch.Tensor, accumulate: bool = False):
    if not accumulate:
        return aten.index_put.default(x, indices, values, False)
    if len(indices) != 1 or indices[0] is None or indices[0].dtype == torch.bool:
        raise UnsupportedOperator("aten.index_put", "accumulate=True is exact only for one integer index tensor")
    idx = indices[0].reshape(-1)
    src = values.expand(*indices[0].shape, *x.shape[1:]).reshape(idx.numel(), *x.shape[1:])
    return reduce.exact_index_add(x, 0, idx, src)


def _var_params(overload: str, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, float, bool]:
    """(dim, correction, keepdim) of var/std/var_mean/std_mean for their .default, .dim and .correction forms."""
    rest = list(args)
    if overload == "default":
        unbiased = rest[0] if rest else kwargs.get("unbiased", True)
        return None, 1.0 if unbiased else 0.0, False
    if overload == "dim":
        dim = rest[0] if rest else kwargs.get("dim")
        unbiased = rest[1] if len(rest) > 1 else kwargs.get("unbiased", True)
        keepdim = rest[2] if len(rest) > 2 else kwargs.get("keepdim", False)
        return dim, 1.0 if unbiased else 0.0, keepdim
    dim = rest[0] if rest else kwargs.get("dim")
    correction = kwargs.get("correction")
    return dim, 1.0 if correction is None else float(correction), kwargs.get("keepdim", False)


def _moments(packet: str, overload: str) -> Handler:
    """var/std (and their _mean forms): mean exactly, squared deviations one rounding each, their exact sum,
    one division by (count - correction), then sqrt for std."""

    def handler(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dim, correction, keepdim = _var_params(overload, args, kwargs)
        mean = reduce.exact_mean(x, dim, keepdim=True)
        dev = x - mean
        count = x.numel() // max(mean.numel(), 1)
        var = reduce.exact_sum(dev * dev, dim, keepdim) / max(count - correction, 0.0)
        out = elementwise.exact_sqrt(var) if packet.startswith("std") else var
        if packet.endswith("_mean"):
            return out, mean if keepdim else mean.reshape(out.shape)
        return out

    return handler


def _layer_norm(
    x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """native_layer_norm as torch's decomposition computes it (this is that arithmetic, written out so that it does
    not depend on torch's version): mean = S(x) / n, var = S((x - mean)^2) / n with S the exact sum, rstd =
    rsqrt(var + eps), out = ((x - mean) * rstd) * weight + bias; mean and rstd keep the reduced dims as size 1."""
    x = x.contiguous()
    axis = x.dim() - len(normalized_shape)
    dims = list(range(axis, x.dim()))
    n = 1
    for d in normalized_shape:
        n *= d
    stat_shape = (*x.shape[:axis], *([1] * len(normalized_shape)))
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    fused = native.layer_norm(x, w, b, eps, n) if n > 0 else None
    if fused is not None:
        out, mean, rstd = fused
        return out, mean.view(stat_shape), rstd.view(stat_shape)
    mean = reduce.exact_sum(x, dims, keepdim=True) / n
    dev = x - mean
    var = reduce.exact_sum(dev * dev, dims, keepdim=True) / float(n)
    rstd = elementwise.exact_rsqrt(var + eps)
    out = (x - mean) * rstd
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out, mean, rstd


def _layer_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """native_layer_norm_backward as torch's decomposition computes it: x_hat = (x - mean) * rstd, g = grad * weight,
    dx = (rstd / n) * ((g * n - S(g)) - x_hat * S(g * x_hat)), dweight = S_rows(grad * x_hat), dbias = S_rows(grad),
    every S an exact sum rounded once."""
    go, x = grad_out.contiguous(), x.contiguous()
    w = weight.contiguous() if weight is not None else None
    axis = x.dim() - len(normalized_shape)
    inner, outer = list(range(axis, x.dim())), list(range(axis))
    n, rows = 1, 1
    for d in x.shape[axis:]:
        n *= d
    for d in x.shape[:axis]:
        rows *= d
    want_dx, want_dw, want_db = output_mask[0], output_mask[1] and w is not None, output_mask[2] and bias is not None
    if n == 0 or rows == 0:
        zeros = (x.new_zeros(x.shape), x.new_zeros(x.shape[axis:]), x.new_zeros(x.shape[axis:]))
        return tuple(z if want else None for z, want in zip(zeros, (output_mask[0], output_mask[1], output_mask[2]), strict=True))  # type: ignore[return-value]
    while mean.dim() < x.dim():
        mean, rstd = mean.unsqueeze(-1), rstd.unsqueeze(-1)
    fused = native.layer_norm_backward(go, x, mean.contiguous(), rstd.contiguous(), w, n, want_dx, want_dw and bool(outer))
    if fused is not None:
        d_input, goxhat = fused
    else:
        x_hat = (x - mean) * rstd
        g = go * w if w is not None else go
        a = g * n
        b = reduce.exact_sum(g, inner, True)
        c2 = reduce.exact_sum(g * x_hat, inner, True)
        c3 = x_hat * c2
        d_input = (rstd / n) * (a - b - c3) if want_dx else None
        goxhat = go * x_hat if want_dw else None
    d_weight = d_bias = None
    if want_dw:
        if goxhat is None:  # the kernel skips it when there is no row to sum over
            goxhat = go * ((x - mean) * rstd)
        d_weight = reduce.exact_sum(goxhat, outer, False) if outer else goxhat
    if want_db:
        d_bias = reduce.exact_sum(go, outer, False) if outer else go.clone()
    return (d_input if want_dx else None), d_weight, d_bias


M_SQRT2 = 1.41421356237309504880  # torch's decompositions' constants (Python floats, rounded to float32 in use)
M_SQRT1_2 = 0.70710678118654752440
M_2_SQRTPI = 1.12837916709551257390


def _wrap_dim(dim: int, ndim: int) -> int:
    """dim in [-ndim, ndim) (a 0-d tensor counts as 1-d), as a non-negative index; IndexError as torch's otherwise."""
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")
    return dim % n


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """aten._softmax as torch's decomposition computes it: m = amax, e = exp(x - m), e / S(e) (S exact)."""
    if half_to_float:
        raise UnsupportedOperator("aten._softmax", "half_to_float")
    x = x.contiguous()
    dim = _wrap_dim(dim, x.dim())
    if x.dim() and dim == x.dim() - 1:
        fused = native.softmax(x)
        if fused is not None:
            return fused
    if x.numel() == 0:
        return torch.empty_like(x)
    x_max = torch.amax(x, dim, keepdim=True)
    unnormalized = elementwise.exact_exp(x - x_max)
    return unnormalized / reduce.exact_sum(unnormalized, [dim], keepdim=True)


def _softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    """aten._softmax_backward_data as torch's decomposition computes it: p = g * o, p - o * S(p)."""
    dim = _wrap_dim(dim, out.dim())
    if out.dim() and dim == out.dim() - 1:
        fused = native.softmax_backward(grad.contiguous(), out.contiguous())
        if fused is not None:
            return fused
    new_grad = grad * out
    return (new_grad - out * reduce.exact_sum(new_grad, [dim], keepdim=True)).contiguous()


def _gelu(a: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """aten.gelu as torch's decomposition computes it, with the exact erf and tanh."""
    if approximate == "tanh":
        k_beta = M_SQRT2 * M_2_SQRTPI * 0.5
        inner = (a + (a * a * a) * 0.044715) * k_beta
        return (a * 0.5) * (1 + elementwise.exact_tanh(inner))
    if approximate != "none":
        raise UnsupportedOperator("aten.gelu", f"approximate={approximate!r}")
    fused = native.gelu(a.contiguous(), M_SQRT1_2)
    if fused is not None:
        return fused.view(a.shape)
    return (a * 0.5) * (1 + elementwise.exact_erf(a * M_SQRT1_2))


def _gelu_backward(grad: torch.Tensor, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """aten.gelu_backward as torch's decomposition computes it, with the exact erf, exp and tanh."""
    if approximate == "tanh":
        k_beta = M_SQRT2 * M_2_SQRTPI * 0.5
        k_kappa = 0.044715
        x_sq = x * x
        inner = (x + (x_sq * x) * k_kappa) * k_beta
        tanh_inner = elementwise.exact_tanh(inner)
        left = x * 0.5
        right = 1 + tanh_inner
        left_derivative = right * 0.5
        tanh_derivative = 1 - tanh_inner * tanh_inner
        inner_derivative = (1 + x_sq * (3 * k_kappa)) * k_beta
        right_derivative = (left * tanh_derivative) * inner_derivative
        return grad * (left_derivative + right_derivative)
    if approximate != "none":
        raise UnsupportedOperator("aten.gelu_backward", f"approximate={approximate!r}")
    k_beta = M_2_SQRTPI * M_SQRT1_2 * 0.5
    if grad.shape == x.shape:
        fused = native.gelu_backward(grad.contiguous(), x.contiguous(), M_SQRT1_2, k_beta)
        if fused is not None:
            return fused
    cdf = (1 + elementwise.exact_erf(x * M_SQRT1_2)) * 0.5
    pdf = elementwise.exact_exp((x * x) * -0.5) * k_beta
    return grad * (cdf + x * pdf)


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """aten._log_softmax as torch's decomposition computes it: d = x - amax(x), d - log(S(exp(d))) (S exact)."""
    if half_to_float:
        raise UnsupportedOperator("aten._log_softmax", "half_to_float")
    if x.dim() == 0:
        return _log_softmax(x.reshape(1), 0, False).reshape(())
    x = x.contiguous()
    dim = _wrap_dim(dim, x.dim())
    if dim == x.dim() - 1:
        fused = native.log_softmax(x)
        if fused is not None:
            return fused
    if x.numel() == 0:
        return torch.empty_like(x)
    shifted = x - torch.amax(x, dim, keepdim=True)
    return shifted - elementwise.exact_log(reduce.exact_sum(elementwise.exact_exp(shifted), [dim], keepdim=True))


def _log_softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    """aten._log_softmax_backward_data as torch's decomposition computes it: g - exp(o) * S(g)."""
    if input_dtype != torch.float32:
        raise UnsupportedOperator("aten._log_softmax_backward_data", f"input dtype {input_dtype}")
    dim = _wrap_dim(dim, out.dim())
    if out.dim() and dim == out.dim() - 1 and grad.shape == out.shape:
        fused = native.log_softmax_backward(grad.contiguous(), out.contiguous())
        if fused is not None:
            return fused
    return grad - elementwise.exact_exp(out) * reduce.exact_sum(grad, [dim] if out.dim() else None, keepdim=out.dim() > 0)


MEAN, SUM = 1, 2  # torch's Reduction enum (NONE is 0)


def _nll_loss_forward(
    x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """aten.nll_loss_forward as torch's decomposition computes it, its sums exact: -x[target] (0 where ignored),
    summed (or averaged over the total weight, itself an exact sum)."""
    channel_dim = 1 if x.dim() >= 2 else 0
    w = None
    if weight is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = weight.shape[0]
        w = weight.view(shape) if x.dim() > 1 else weight
        x = x * w
    keep = target != ignore_index
    safe = torch.where(keep, target, 0).unsqueeze(channel_dim)
    result = torch.where(keep, -torch.gather(x, channel_dim, safe).squeeze(channel_dim), 0)
    if reduction not in (MEAN, SUM) and x.dim() > 1:
        return result, x.new_full((), 0.0)
    if w is not None:
        picked = torch.gather(w.expand(x.shape), channel_dim, safe).squeeze(channel_dim)
        total = reduce.exact_sum(torch.where(keep, picked, 0), None)
    else:
        total = keep.sum().to(x)
    if reduction == SUM:
        result = reduce.exact_sum(result, None)
    elif reduction == MEAN:
        result = reduce.exact_sum(result, None) / total
    return result, total


def _nll_loss_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: int,
    ignore_index: int,
    total_weight: torch.Tensor,
) -> torch.Tensor:
    """aten.nll_loss_backward as torch's decomposition computes it (single roundings only): -1 at the target,
    times the incoming gradient (divided by the total weight for a mean, times the class weight)."""
    channel_dim = 0 if x.dim() < 2 else 1
    if reduction == MEAN:
        grad_output = grad_output / total_weight
    if x.dim() == 1 and target.dim() > 0:
        target = target[0]
    target = target.unsqueeze(channel_dim)
    keep = target != ignore_index
    grad_input = torch.zeros_like(x).scatter(channel_dim, torch.where(keep, target, 0), -1.0)
    if grad_input.dim() > grad_output.dim() > 0:
        grad_output = grad_output.unsqueeze(channel_dim)
    if weight is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = weight.shape[0]
        grad_output = grad_output * weight.reshape(shape)
    return grad_input * torch.where(keep, grad_output, 0)


def _embedding_dense_backward(
    grad: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int, scale_grad_by_freq: bool
) -> torch.Tensor:
    """aten.embedding_dense_backward as torch's decomposition computes it: the rows of `grad` added into a zero
    table at their indices (out-of-range and padding indices skipped), each slot one exact sum rounded once; with
    scale_grad_by_freq each row first divided by its index's count."""
    idx = indices.to(torch.int64)
    valid = (idx >= 0) & (idx < num_weights)
    if scale_grad_by_freq:
        counts = torch.bincount(idx[valid], minlength=num_weights)
        grad = grad / torch.where(valid, counts[idx.clamp(0, max(num_weights - 1, 0))], 1).unsqueeze(-1)
    keep = (valid & (idx != padding_idx)).reshape(-1)
    row_shape = tuple(grad.shape[idx.dim() :])
    rows = grad.reshape(idx.numel(), *row_shape)
    flat = idx.reshape(-1)
    if not bool(keep.all()):
        rows, flat = rows[keep], flat[keep]
    return reduce.exact_index_add(grad.new_zeros((num_weights, *row_shape)), 0, flat, rows)


def _sqrt_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(elementwise.exact_sqrt(x))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Handler:
    return lambda x: fn(x)


EXACT_HANDLERS: dict[OpOverload, Handler] = {
    aten.mm.default: _mm,
    aten.bmm.default: _bmm,
    aten.addmm.default: _addmm,
    aten.sum.default: _sum,
    aten.sum.dim_IntList: _sum,
    aten.mean.default: _mean,
    aten.mean.dim: _mean,
    aten.add.Tensor: _add,
    aten.add.Scalar: _add,
    aten.sub.Tensor: _sub,
    aten.sub.Scalar: _sub,
    aten.exp.default: _unary(elementwise.exact_exp),
    aten.expm1.default: _unary(elementwise.exact_expm1),
    aten.log.default: _unary(elementwise.exact_log),
    aten.log1p.default: _unary(elementwise.exact_log1p),
    aten.tanh.default: _unary(elementwise.exact_tanh),
    aten.sigmoid.default: _unary(elementwise.exact_sigmoid),
    aten.erf.default: _unary(elementwise.exact_erf),
    aten.rsqrt.default: _unary(elementwise.exact_rsqrt),
    aten.sqrt.default: _unary(elementwise.exact_sqrt),
    aten.sqrt.out: _sqrt_out,
    aten.native_layer_norm.default: _layer_norm,
    aten._softmax.default: _softmax,
    aten._softmax_backward_data.default: _softmax_backward,
    aten.gelu.default: _gelu,
    aten.gelu_backward.default: _gelu_backward,
    aten._log_softmax.default: _log_softmax,
    aten._log_softmax_backward_data.default: _log_softmax_backward,
    aten.nll_loss_forward.default: _nll_loss_forward,
    aten.nll_loss_backward.default: _nll_loss_backward,
    aten.embedding_dense_backward.default: _embedding_dense_backward,
    aten.native_layer_norm_backward.default: _layer_norm_backward,
    aten.pow.Tensor_Scalar: _pow,
    aten.addcmul.default: _addcmul,
    aten.addcdiv.default: _addcdiv,
    aten.lerp.Scalar: _lerp,
    aten.lerp.Tensor: _lerp,
    aten.index_add.default: _index_add,
    aten.scatter_add.default: _scatter_add,
    aten.index_put.default: _index_put,
    aten._unsafe_index_put.default: _index_put,
    aten.convolution.default: conv.exact_convolution,
    aten.convolution_backward.default: conv.exact_convolution_backward,
    aten.avg_pool2d.default: conv.exact_avg_pool2d,
    aten.avg_pool2d_backward.default: conv.exact_avg_pool2d_backward,
    aten.max_pool2d_with_indices_backward.default: conv.exact_max_pool2d_backward,
}

for _packet in ("var", "std", "var_mean", "std_mean"):
    for _overload in ("default", "dim", "correction"):
        EXACT_HANDLERS[getattr(getattr(aten, _packet), _overload)] = _moments(_packet, _overload)

SINGLE_ROUNDING_SPLITS = frozenset(
    (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.addcmul.default, aten.addcdiv.default,
     aten.lerp.Scalar, aten.lerp.Tensor)
)
"""Handlers made of IEEE single-rounding steps only: exact in float64 as well as float32."""

_GUARDED: dict[OpOverload, Handler] = {
    op: _float_only(
        str(op),
        op,
        h,
        frozenset((torch.float32, torch.float64)) if op in SINGLE_ROUNDING_SPLITS else frozenset((torch.float32,)),
    )
    for op, h in EXACT_HANDLERS.items()
}


def _inplace_functional(func: OpOverload) -> OpOverload | None:
    """aten.add_.Tensor -> aten.add.Tensor, when that functional overload exists."""
    name = func.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    return getattr(packet, func._overloadname, None)


@cache
def _is_composite(func: OpOverload) -> bool:
    """True for operators defined in terms of other aten operators (CompositeImplicitAutograd)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def supported_operators() -> frozenset[str]:
    """Names of the operators exact mode computes, passes through or decomposes (random draws excluded)."""
    names = {str(op) for op in EXACT_HANDLERS} | {str(op) for op in DECOMPOSED}
    names |= {f"aten.{p}" for p in PASSTHROUGH_PACKETS}
    return frozenset(names)


def is_supported(func: OpOverload) -> bool:
    """True when `route_operator` would not refuse `func` for float32 inputs."""
    packet = func.overloadpacket.__name__
    if packet in RANDOM_PACKETS:
        return False
    if func in EXACT_HANDLERS or func in DECOMPOSED or packet in PASSTHROUGH_PACKETS or _is_composite(func):
        return True
    functional = _inplace_functional(func)
    return functional is not None and is_supported(functional)


def route_operator(mode: ExactMode, func: OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Run one aten operator the exact way (see module docstring). Raises UnsupportedOperator naming it."""
    packet = func.overloadpacket.__name__
    if packet in RANDOM_PACKETS:
        raise UnsupportedOperator(str(func), "random draws must come from the hardware-independent generator")
    handler = _GUARDED.get(func)
    if handler is not None:
        return handler(*args, **kwargs)
    if packet in PASSTHROUGH_PACKETS:
        return func(*args, **kwargs)
    if func in DECOMPOSED:
        with mode:
            return torch._decomp.decomposition_table[func](*args, **kwargs)
    if _is_composite(func):
        with mode:
            return func.decompose(*args, **kwargs)
    functional = _inplace_functional(func)
    if functional is not None and is_supported(functional):
        out = route_operator(mode, functional, args, kwargs)
        args[0].copy_(out)
        return args[0]
    if not any(t.is_floating_point() for t in _tensors(args, kwargs)) and _tensors(args, kwargs):
        return func(*args, **kwargs)
    raise UnsupportedOperator(str(func))


_DIRECT: dict[int, tuple[OpOverload, Handler | None]] = {}
"""Per operator, what `route_operator` would run without needing the mode: its guarded handler, or the C++ op itself
for pass-through; None where routing needs more (a decomposition under the mode, an in-place form, a refusal).
Keyed by id (hashing an OpOverload runs Python code); each entry holds its operator, so no id is ever reused."""


def _direct(func: OpOverload) -> Handler | None:
    packet = func.overloadpacket.__name__
    if packet in RANDOM_PACKETS:
        return None
    handler = _GUARDED.get(func)
    if handler is not None:
        return handler
    return func._op if packet in PASSTHROUGH_PACKETS else None


class ExactMode(TorchDispatchMode):
    """TorchDispatchMode that computes every operator exactly or refuses it (see the module docstring).

    `seen` counts the operators routed through this instance by name (its own state; nothing global).
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[int, int] = {}
        self._ops: dict[int, OpOverload] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No dynamo-disable wrapper around __torch_dispatch__ (about 1.2 us per operator): pol never compiles,
        and exact mode refuses to run under torch.compile's tracing anyway (its handlers call C kernels)."""
        return False

    @property
    def seen(self) -> Counter[str]:
        """How often each operator (by name, e.g. "aten.mm.default") was routed through this mode."""
        return Counter({str(self._ops[key]): n for key, n in self._seen.items()})

    def __torch_dispatch__(self, func: OpOverload, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        key = id(func)
        count = self._seen.get(key)
        if count is None:
            self._ops[key] = func
            if key not in _DIRECT:
                _DIRECT[key] = (func, _direct(func))
            count = 0
        self._seen[key] = count + 1
        direct = _DIRECT[key][1]
        if direct is not None:
            return direct(*args, **(kwargs or {}))
        return route_operator(self, func, args, kwargs or {})


def exact_mode() -> ExactMode:
    """A fresh exact dispatch mode, to be used as `with exact_mode(): ...` around forward, backward and the
    optimizer step. Operators it cannot make exact raise `pol.errors.UnsupportedOperator`."""
    return ExactMode()
