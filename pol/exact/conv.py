"""Exact convolution (1-D and 2-D, forward and backward) and pooling through im2col and the exact product.

    forward       out[n, o, l]  = sum_{c,ky,kx} W[o, c, ky, kx] * patch[n, l, (c,ky,kx)]    one exact product
    grad_input    = convolution of the stride-dilated, padded grad_output with the flipped weight (one exact
                    product per input position: every overlapping contribution is inside one exact sum)
    grad_weight   = grad_output (O, N*L) @ patches (N*L, C*K*K)                                one exact product
    grad_bias     = exact sum over batch and positions

A bias is added after the product (a second IEEE rounding). Average pooling sums each window exactly and divides
once; its backward spreads grad/divisor and adds overlapping windows with one exact sum per input element. Max
pooling's backward is an exact scatter-add.

Grouped (and depthwise) convolutions take one exact product per group; a transposed convolution is computed as the
input gradient of the convolution it transposes (and its backward as that convolution's forward and weight
gradient), so every output element is still one exact sum rounded once.

Average pooling takes torch's geometry and divisors: ceil_mode's last partial windows, count_include_pad=False
(the window clipped to the input) and divisor_override.

Raises `UnsupportedOperator` for 3-D convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pol.errors import UnsupportedOperator
from pol.exact.matmul import exact_mm
from pol.exact.reduce import exact_scatter_add, exact_sum, sum_into_slots

__all__ = [
    "exact_convolution",
    "exact_convolution_backward",
    "exact_avg_pool2d",
    "exact_avg_pool2d_backward",
    "exact_max_pool2d_backward",
]

Pair = tuple[int, int]


def _pair(v: Sequence[int] | int, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


def _verify_conv(weight: torch.Tensor) -> None:
    if weight.dim() not in (3, 4):
        raise UnsupportedOperator("aten.convolution", f"{weight.dim() - 2}-D convolution is not supported")


def _conv2d_nobias(x: torch.Tensor, w: torch.Tensor, stride: Pair, padding: Pair, dilation: Pair) -> torch.Tensor:
    """2-D cross-correlation as im2col + one exact product. x (N, C, H, W), w (O, C, kh, kw) -> (N, O, Ho, Wo)."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, CKK, L)
    a = cols.transpose(1, 2).reshape(n * ho * wo, -1)
    out = exact_mm(a, w.reshape(o, -1).t())  # (N*L, O)
    return out.reshape(n, ho * wo, o).transpose(1, 2).reshape(n, o, ho, wo)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2) if x.dim() == 3 else x


def _params_2d(one_d: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    if one_d:
        return [1, _pair(stride, 1)[0]], [0, _pair(padding, 1)[0]], [1, _pair(dilation, 1)[0]]
    return _pair(stride, 2), _pair(padding, 2), _pair(dilation, 2)


def _conv_params(one_d: bool, output_padding: Sequence[int]) -> list[int]:
    return [0, _pair(output_padding, 1)[0]] if one_d else _pair(output_padding, 2)


def _transposed_size(x: torch.Tensor, w: torch.Tensor, s: list[int], p: list[int], d: list[int], op: list[int]) -> list[int]:
    """Spatial size of a transposed convolution's output (that of the convolution it is the input gradient of)."""
    return [(x.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (w.shape[2 + i] - 1) + op[i] + 1 for i in range(2)]


def exact_convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """aten.convolution for 1-D/2-D, grouped (depthwise) and transposed: per group one exact product (see module
    docstring); a transposed convolution is the input gradient of the convolution it transposes. Raises
    UnsupportedOperator for 3-D convolutions."""
    _verify_conv(weight)
    one_d = weight.dim() == 3
    s, p, d = _params_2d(one_d, stride, padding, dilation)
    x2, w2 = _as_2d(x), _as_2d(weight)
    outs = []
    for xg, wg in zip(x2.chunk(groups, 1), w2.chunk(groups, 0), strict=True):
        if transposed:
            outs.append(_grad_input(xg, wg, _transposed_size(x2, w2, s, p, d, _conv_params(one_d, output_padding)), s, p, d))
        else:
            outs.append(_conv2d_nobias(xg, wg, (s[0], s[1]), (p[0], p[1]), (d[0], d[1])))
    out = outs[0] if groups == 1 else torch.cat(outs, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.squeeze(2) if one_d else out


def _grad_input(g: torch.Tensor, w: torch.Tensor, in_hw: Sequence[int], s: list[int], p: list[int], d: list[int]) -> torch.Tensor:
    """Gradient of a 2-D convolution with respect to its input (see module docstring)."""
    n, o, ho, wo = g.shape
    kh, kw = w.shape[2:]
    extra = [(in_hw[i] + 2 * p[i] - d[i] * ((kh, kw)[i] - 1) - 1) % s[i] for i in range(2)]
    dil = g.new_zeros((n, o, (ho - 1) * s[0] + 1 + extra[0], (wo - 1) * s[1] + 1 + extra[1]))
    dil[:, :, : (ho - 1) * s[0] + 1 : s[0], : (wo - 1) * s[1] + 1 : s[1]] = g
    ph, pw = d[0] * (kh - 1) - p[0], d[1] * (kw - 1) - p[1]
    padded = F.pad(dil, (pw, pw, ph, ph))
    flipped = w.transpose(0, 1).flip(2, 3)  # (C, O, kh, kw)
    out = _conv2d_nobias(padded, flipped, (1, 1), (0, 0), (d[0], d[1]))
    assert tuple(out.shape[2:]) == tuple(in_hw), "grad_input shape mismatch"
    return out


def _grad_weight(g: torch.Tensor, x: torch.Tensor, k: Sequence[int], s: list[int], p: list[int], d: list[int]) -> torch.Tensor:
    """Gradient of a 2-D convolution with respect to its weight: grad_output (O, N*L) @ patches (N*L, C*kh*kw)."""
    n, o = g.shape[:2]
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, CKK, L)
    a = g.reshape(n, o, -1).transpose(0, 1).reshape(o, -1)  # (O, N*L)
    return exact_mm(a, cols.transpose(1, 2).reshape(-1, cols.shape[1]))


def exact_convolution_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
):
    """aten.convolution_backward -> (grad_input, grad_weight, grad_bias), each None where not asked for. Per group:
    a convolution's input gradient is `_grad_input`, a transposed one's is the plain convolution of grad_output; the
    weight gradient is `_grad_weight` with the roles of input and grad_output swapped for a transposed one.

    Raises UnsupportedOperator as `exact_convolution` does."""
    _verify_conv(weight)
    one_d = weight.dim() == 3
    s, p, d = _params_2d(one_d, stride, padding, dilation)
    g, x2, w2 = _as_2d(grad_output), _as_2d(x), _as_2d(weight)
    gis, gws = [], []
    for gg, xg, wg in zip(g.chunk(groups, 1), x2.chunk(groups, 1), w2.chunk(groups, 0), strict=True):
        if output_mask[0]:
            if transposed:
                gis.append(_conv2d_nobias(gg, wg, (s[0], s[1]), (p[0], p[1]), (d[0], d[1])))
            else:
                gis.append(_grad_input(gg, wg, x2.shape[2:], s, p, d))
        if output_mask[1]:
            gws.append(_grad_weight(xg, gg, wg.shape[2:], s, p, d) if transposed else _grad_weight(gg, xg, wg.shape[2:], s, p, d))
    gi = gw = gb = None
    if output_mask[0]:
        gi = gis[0] if groups == 1 else torch.cat(gis, 1)
        gi = gi.squeeze(2) if one_d else gi
    if output_mask[1]:
        gw = (gws[0] if groups == 1 else torch.cat(gws, 0)).reshape(weight.shape)
    if output_mask[2]:
        gb = exact_sum(grad_output, [0] + list(range(2, grad_output.dim())))
    return gi, gw, gb


def _pool_geometry(kernel_size, stride, padding):
    k = _pair(kernel_size, 2)
    s = _pair(stride, 2) if stride else k
    return k, s, _pair(padding, 2)


def _pool_out_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape (dilation 1): with ceil_mode a last partial window is kept unless it would start
    inside the right padding."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _avg_pool_plan(h: int, w: int, k: list[int], s: list[int], p: list[int], ceil_mode: bool, count_include_pad: bool,
                   divisor_override: int | None, device: torch.device) -> tuple[int, int, list[int], float | torch.Tensor]:
    """(ho, wo, extra zero rows/columns past the bottom/right padding that the last windows reach, divisor): the
    divisor a Python number where every window shares it, else a float32 (ho, wo) tensor of integers. torch's rule:
    divisor_override if given, else the window's size clipped to the padded input (count_include_pad) or to the
    input itself."""
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("avg_pool2d: divisor must be not zero")
    if any(pp > kk // 2 for pp, kk in zip(p, k, strict=True)):
        raise RuntimeError(f"avg_pool2d: pad should be at most half of effective kernel size, got {p} for {k}")
    ho, wo = _pool_out_size(h, k[0], s[0], p[0], ceil_mode), _pool_out_size(w, k[1], s[1], p[1], ceil_mode)
    extra = [max(0, (ho - 1) * s[0] + k[0] - (h + 2 * p[0])), max(0, (wo - 1) * s[1] + k[1] - (w + 2 * p[1]))]
    if divisor_override is not None:
        return ho, wo, extra, divisor_override
    if count_include_pad and not any(extra):
        return ho, wo, extra, k[0] * k[1]

    def counts(out: int, size: int, kk: int, ss: int, pp: int) -> torch.Tensor:
        start = torch.arange(out, device=device) * ss - pp
        end = torch.clamp(start + kk, max=size + pp)
        if count_include_pad:
            return end - start
        return torch.clamp(end, max=size) - torch.clamp(start, min=0)

    rows, cols = counts(ho, h, k[0], s[0], p[0]), counts(wo, w, k[1], s[1], p[1])
    return ho, wo, extra, (rows.unsqueeze(1) * cols.unsqueeze(0)).to(torch.float32)


def _pad_for_windows(x4: torch.Tensor, p: list[int], extra: list[int]) -> torch.Tensor:
    """x4 (planes, 1, h, w) with zero padding on every side and `extra` more at the bottom/right."""
    return F.pad(x4, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))


def exact_avg_pool2d(
    x: torch.Tensor, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
) -> torch.Tensor:
    """Average pooling: each window's exact sum (the input's values and +0 for padding), rounded once, then one IEEE
    division by the window's divisor (torch's: kh*kw, the window clipped to the padded input or to the input with
    count_include_pad=False, or divisor_override); ceil_mode keeps torch's last partial windows."""
    k, s, p = _pool_geometry(kernel_size, stride, padding)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    ho, wo, extra, divisor = _avg_pool_plan(h, w, k, s, p, ceil_mode, count_include_pad, divisor_override, x.device)
    x4 = x.reshape(-1, 1, h, w)
    if any(extra):
        cols = F.unfold(_pad_for_windows(x4, p, extra), k, stride=s)  # (NC, kk, L)
    else:
        cols = F.unfold(x4, k, padding=p, stride=s)
    sums = exact_sum(cols, [1])
    if isinstance(divisor, torch.Tensor):
        return (sums.reshape(-1, ho, wo) / divisor).reshape(*lead, ho, wo)
    return (sums / divisor).reshape(*lead, ho, wo)


def exact_avg_pool2d_backward(
    grad_output: torch.Tensor, x: torch.Tensor, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
) -> torch.Tensor:
    """Backward of `exact_avg_pool2d`: grad / divisor (one IEEE division per window) added into each window's inputs,
    one exact sum per input."""
    k, s, p = _pool_geometry(kernel_size, stride, padding)
    h, w = x.shape[-2:]
    ho, wo, extra, divisor = _avg_pool_plan(h, w, k, s, p, ceil_mode, count_include_pad, divisor_override, x.device)
    planes = x.numel() // (h * w)
    pos = torch.arange(1, h * w + 1, dtype=torch.float64, device=x.device).reshape(1, 1, h, w)
    slots = F.unfold(_pad_for_windows(pos, p, extra), k, stride=s).to(torch.int64)[0] - 1  # (kk, L), -1 for padding
    g = grad_output.reshape(planes, ho, wo) / divisor
    g = g.reshape(planes, 1, -1).expand(planes, slots.shape[0], slots.shape[1])
    plane_base = (torch.arange(planes, device=x.device) * (h * w)).view(-1, 1, 1)
    target = torch.where(slots >= 0, plane_base + slots, torch.full_like(plane_base + slots, planes * h * w))
    out = sum_into_slots(g.reshape(-1), target.reshape(-1), planes * h * w + 1)
    return out[:-1].reshape(x.shape)


def exact_max_pool2d_backward(
    grad_output: torch.Tensor, x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode, indices: torch.Tensor
) -> torch.Tensor:
    """Backward of max pooling: exact scatter-add of grad_output to the argmax positions of each plane."""
    h, w = x.shape[-2:]
    planes = x.numel() // (h * w)
    base = x.new_zeros((planes, h * w))
    out = exact_scatter_add(base, 1, indices.reshape(planes, -1), grad_output.reshape(planes, -1))
    return out.reshape(x.shape)
