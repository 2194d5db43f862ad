"""Exact backward passes of adaptive pooling and upsampling: every input gradient is one exact sum of the output
gradients that reach it (each scaled first by one IEEE rounding per factor), rounded once.

    adaptive avg pool   window i covers [floor(i*H/Ho), ceil((i+1)*H/Ho)); grad_in[p] = S(g[w] / count[w])
    adaptive max pool   grad_in[p] = S(g[w] over the windows whose argmax is p)
    nearest upsample    grad_in[p] = S(g[o] over the outputs that copied p) (the forward's own source indices)
    bilinear upsample   grad_in[p] = S((g[o] * wy) * wx over the outputs whose corner is p), torch's weights

The forwards are torch's decompositions run under the mode (gathers, exact sums, single roundings) or, for max
pooling, torch's own kernel (a maximum rounds nothing).

Raises `UnsupportedOperator` for bilinear upsampling of other than 4-D tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pol.errors import UnsupportedOperator
from pol.exact.reduce import exact_scatter_add, sum_into_slots

__all__ = [
    "spread_to_inputs",
    "adaptive_avg_pool2d_backward",
    "adaptive_max_pool2d_backward",
    "upsample_nearest2d_backward",
    "upsample_bilinear2d_backward",
]


def spread_to_inputs(values: torch.Tensor, slots: torch.Tensor, planes: int, hw: int) -> torch.Tensor:
    """out[p, s] = exact sum of values[p, l, k] over slots[l, k] == s, rounded once: values (planes, L, K) float32,
    slots (L, K) int64 in [0, hw) or -1 for none. Returns (planes, hw)."""
    base = (torch.arange(planes, device=values.device) * hw).view(-1, 1, 1)
    target = torch.where(slots >= 0, base + slots, torch.full_like(base + slots, planes * hw))
    out = sum_into_slots(values.reshape(-1), target.reshape(-1), planes * hw + 1)
    return out[:-1].reshape(planes, hw)


def _windows(size: int, out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pooling's windows along one dim: (indices (out, k) with -1 past a window's end, counts (out,))."""
    i = torch.arange(out, device=device)
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out
    k = int((end - start).max()) if out else 0
    idx = start.unsqueeze(1) + torch.arange(k, device=device)
    return torch.where(idx < end.unsqueeze(1), idx, torch.full_like(idx, -1)), end - start


def adaptive_avg_pool2d_backward(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """aten._adaptive_avg_pool2d_backward: grad / window count, spread over each window, exact sums."""
    h, w = x.shape[-2:]
    ho, wo = grad_output.shape[-2:]
    planes = x.numel() // max(h * w, 1)
    ry, cy = _windows(h, ho, x.device)
    rx, cx = _windows(w, wo, x.device)
    slots = torch.where((ry[:, None, :, None] >= 0) & (rx[None, :, None, :] >= 0), ry[:, None, :, None] * w + rx[None, :, None, :], -1)
    slots = slots.reshape(ho * wo, -1)  # (L, ky * kx)
    count = (cy[:, None] * cx[None, :]).reshape(1, -1, 1).to(grad_output.dtype)
    g = grad_output.reshape(planes, ho * wo, 1) / count
    return spread_to_inputs(g.expand(planes, ho * wo, slots.shape[1]), slots, planes, h * w).reshape(x.shape)


def adaptive_max_pool2d_backward(grad_output: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """aten.adaptive_max_pool2d_backward: exact scatter-add of grad_output to each window's argmax."""
    h, w = x.shape[-2:]
    planes = x.numel() // max(h * w, 1)
    out = exact_scatter_add(x.new_zeros((planes, h * w)), 1, indices.reshape(planes, -1), grad_output.reshape(planes, -1))
    return out.reshape(x.shape)


def _nearest_sources(in_size: int, out_size: int, scale: float | None, device: torch.device) -> torch.Tensor:
    """The input index each output copies, as torch's nearest upsampling computes it: floor(dst * s) clamped, with
    s = 1 / scale where a scale is given, else in / out (in float32, as torch's decomposition)."""
    s = (1.0 / scale) if scale else in_size / out_size
    src = torch.floor(torch.arange(out_size, dtype=torch.float32, device=device) * torch.tensor(s, dtype=torch.float32))
    return src.to(torch.int64).clamp(max=in_size - 1)


def upsample_nearest2d_backward(
    grad_output: torch.Tensor,
    output_size: Sequence[int],
    input_size: Sequence[int],
    scales_h: float | None = None,
    scales_w: float | None = None,
) -> torch.Tensor:
    """aten.upsample_nearest2d_backward: every output gradient added to the input it copied, exact sums."""
    h, w = input_size[-2:]
    ho, wo = output_size
    planes = grad_output.numel() // max(ho * wo, 1)
    sy = _nearest_sources(h, ho, scales_h, grad_output.device)
    sx = _nearest_sources(w, wo, scales_w, grad_output.device)
    slots = (sy[:, None] * w + sx[None, :]).reshape(-1, 1)
    out = spread_to_inputs(grad_output.reshape(planes, -1, 1), slots, planes, h * w)
    return out.reshape(*input_size)


def _linear_weights(in_size: int, out_size: int, align_corners: bool, scale: float | None, device: torch.device):
    """Bilinear interpolation's corners and weights along one dim, as torch computes them in float32:
    (i0, i1, w0, w1) with the source coordinate's floor, its neighbour (clamped) and their weights 1 - l and l."""
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    if align_corners:
        ratio = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * torch.tensor(ratio, dtype=torch.float32)
    else:
        ratio = (1.0 / scale) if scale else in_size / out_size
        src = ((dst + 0.5) * torch.tensor(ratio, dtype=torch.float32) - 0.5).clamp(min=0.0)
    i0 = torch.floor(src).to(torch.int64).clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    return i0, i1, 1.0 - lam, lam


def upsample_bilinear2d_backward(
    grad_output: torch.Tensor,
    output_size: Sequence[int],
    input_size: Sequence[int],
    align_corners: bool,
    scales_h: float | None = None,
    scales_w: float | None = None,
) -> torch.Tensor:
    """aten.upsample_bilinear2d_backward: (g * wy) * wx added to each of an output's four corners, exact sums."""
    if len(input_size) != 4:
        raise UnsupportedOperator("aten.upsample_bilinear2d_backward", f"{len(input_size)}-D input")
    h, w = input_size[-2:]
    ho, wo = output_size
    planes = grad_output.numel() // max(ho * wo, 1)
    y0, y1, wy0, wy1 = _linear_weights(h, ho, align_corners, scales_h, grad_output.device)
    x0, x1, wx0, wx1 = _linear_weights(w, wo, align_corners, scales_w, grad_output.device)
    g = grad_output.reshape(planes, ho, wo)
    values, slots = [], []
    for yi, wy in ((y0, wy0), (y1, wy1)):
        gy = g * wy.view(1, -1, 1)
        for xi, wx in ((x0, wx0), (x1, wx1)):
            values.append((gy * wx.view(1, 1, -1)).reshape(planes, -1))
            slots.append((yi[:, None] * w + xi[None, :]).reshape(-1))
    out = spread_to_inputs(torch.stack(values, dim=2), torch.stack(slots, dim=1), planes, h * w)
    return out.reshape(*input_size)
