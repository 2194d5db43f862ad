"""Exact scaled-dot-product attention: the handlers of `aten._scaled_dot_product_flash_attention_for_cpu` and its
backward (the CPU form torch dispatches `F.scaled_dot_product_attention` to), one definition for every backend:

    S   = (Q @ K^T) * scale                 one exact product, one rounding; scale = 1/sqrt(E) unless given
    S   = where(mask, S, -inf) or S + mask  causal (lower triangle), boolean or additive masks
    P   = softmax(S) (rows with every entry masked give 0)       exact sums (pol/exact/softmax.py)
    out = P @ V;  logsumexp = max + log(S(exp(S - max)))
    dV  = P^T @ dO;  dS = softmax_backward(dO @ V^T, P) * scale;  dQ = dS @ K;  dK = dS^T @ Q

Grouped-query attention (fewer key/value heads) repeats each key/value head over its query heads; their gradients
are exact sums over the group. The backward recomputes S and P from Q and K (it does not read the logsumexp).

Raises `UnsupportedOperator` for dropout_p > 0 (the draws come from the hardware-independent generator).
"""

from __future__ import annotations

import math

import torch

from pol.errors import UnsupportedOperator
from pol.exact import elementwise, matmul, reduce, softmax

__all__ = ["flash_attention_for_cpu", "flash_attention_for_cpu_backward"]

Tensor = torch.Tensor


def _verify_dropout(name: str, dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise UnsupportedOperator(name, "dropout_p > 0: random draws must come from the hardware-independent generator")


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """(..., M, K) @ (..., K, N) as one exact batched product."""
    lead = a.shape[:-2]
    out = matmul.exact_bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.reshape(*lead, out.shape[-2], out.shape[-1])


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _sum_heads(x: Tensor, heads: int) -> Tensor:
    """The gradient of `_repeat_heads`: exact sums over each key/value head's group of query heads."""
    if x.shape[1] == heads:
        return x
    n, h = x.shape[:2]
    return reduce.exact_sum(x.reshape(n, heads, h // heads, *x.shape[2:]), [2])


def _scores(q: Tensor, k: Tensor, is_causal: bool, attn_mask: Tensor | None, scale: float | None) -> tuple[Tensor, Tensor, float]:
    """(S, P, scale) of the module docstring, P with fully masked rows set to 0."""
    e = q.shape[-1]
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    s = _bmm(q, _repeat_heads(k, q.shape[1]).transpose(-2, -1)) * scale
    if is_causal:
        s = torch.where(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), s, float("-inf"))
    if attn_mask is not None:
        s = torch.where(attn_mask, s, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    s = s.contiguous()
    p = softmax.softmax(s, -1, False)
    masked = (s == float("-inf")).all(dim=-1, keepdim=True)
    return s, torch.where(masked, 0.0, p), scale


def flash_attention_for_cpu(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """aten._scaled_dot_product_flash_attention_for_cpu -> (output (N, H, L, Ev), logsumexp (N, H, L))."""
    _verify_dropout("aten._scaled_dot_product_flash_attention_for_cpu", dropout_p)
    s, p, _ = _scores(query, key, is_causal, attn_mask, scale)
    out = _bmm(p, _repeat_heads(value, query.shape[1]))
    m = torch.amax(s, -1, keepdim=True)
    finite_m = torch.where(torch.isfinite(m), m, 0.0)
    lse = (finite_m + elementwise.exact_log(reduce.exact_sum(elementwise.exact_exp(s - finite_m), [-1], keepdim=True))).squeeze(-1)
    lse = torch.where(m.squeeze(-1) == float("-inf"), float("-inf"), lse)
    # the flash kernel's layout: (N, L, H, E) memory seen as (N, H, L, E)
    return out.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3), lse


def flash_attention_for_cpu_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    logsumexp: Tensor,
    dropout_p: float,
    is_causal: bool,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """aten._scaled_dot_product_flash_attention_for_cpu_backward -> (dQ, dK, dV), see the module docstring."""
    _verify_dropout("aten._scaled_dot_product_flash_attention_for_cpu_backward", dropout_p)
    heads = query.shape[1]
    s, p, scale = _scores(query, key, is_causal, attn_mask, scale)
    k, v = _repeat_heads(key, heads), _repeat_heads(value, heads)
    d_v = _bmm(p.transpose(-2, -1), grad_out)
    d_p = _bmm(grad_out, v.transpose(-2, -1)).contiguous()
    d_s = softmax.softmax_backward(d_p, p.contiguous(), -1, torch.float32) * scale
    d_q = _bmm(d_s, k)
    d_k = _bmm(d_s.transpose(-2, -1), query)
    return d_q, _sum_heads(d_k, key.shape[1]), _sum_heads(d_v, value.shape[1])
