"""Subprocess entry: run small real layers forward AND backward under exact mode and print one blake3 digest per
layer of its outputs and gradients (inputs from numpy, so the same on any machine).

    python -m tests.exact.layers_run [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import blake3
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pol.exact import exact_mode


def _init(module: nn.Module, seed: int) -> nn.Module:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.5))
    return module


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * self.weight


def _sdpa(**kw: object) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> heads from channels
        q = x.reshape(2, 2, 4, 8)  # (B, heads, T, E)
        return F.scaled_dot_product_attention(q, q * 0.5, q.flip(2), dropout_p=0.0, **kw)  # type: ignore[arg-type]

    return f


def layers() -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]]:
    bn, bn_eval, gn = _init(nn.BatchNorm2d(4), 1), _init(nn.BatchNorm2d(4, affine=False), 2), _init(nn.GroupNorm(2, 4), 3)
    bn_eval.eval()
    conv, dw, ct = _init(nn.Conv2d(4, 4, 3, padding=1), 4), _init(nn.Conv2d(4, 4, 3, padding=1, groups=4), 5), _init(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), 6)
    rms = _init(RMSNorm(8), 7)
    mask = torch.from_numpy(np.random.default_rng(8).random((4, 4)) > 0.4)
    return {
        "batchnorm-train": (lambda x: bn(bn(x)), [bn]),  # twice: the running stats' update feeds the second call
        "batchnorm-eval": (bn_eval, [bn_eval]),
        "groupnorm": (gn, [gn]),
        "rmsnorm": (lambda x: rms(x.reshape(-1, 8)), [rms]),
        "sdpa-causal": (_sdpa(is_causal=True), []),
        "sdpa-mask": (_sdpa(attn_mask=mask), []),
        "conv-adaptiveavg": (lambda x: nn.AdaptiveAvgPool2d(1)(conv(x)), [conv]),
        "maxpool": (nn.MaxPool2d(2), []),
        "adaptive-max": (nn.AdaptiveMaxPool2d(3), []),
        "depthwise": (dw, [dw]),
        "conv-transpose": (ct, [ct]),
        "nearest": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), []),
        "bilinear": (lambda x: F.interpolate(x, size=(7, 5), mode="bilinear", align_corners=False), []),
        "silu-hardswish-relu6-mish": (lambda x: nn.Mish()(nn.ReLU6()(nn.Hardswish()(nn.SiLU()(x) * 3))), []),
        "cumsum": (lambda x: torch.cumsum(x, 2), []),
        "sin-cos": (lambda x: torch.sin(x * 3) * torch.cos(x * 7), []),
    }


def digest(tensors: list[torch.Tensor]) -> str:
    h = blake3.blake3()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_layer(fn: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Module]) -> str:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 4, 4, 4)).astype(np.float32)).requires_grad_()
    weights = torch.from_numpy(rng.standard_normal(1000).astype(np.float32))
    with exact_mode():
        y = fn(x)
        loss = (y * weights[: y.numel()].reshape(y.shape)).sum()
        loss.backward()
    grads = [p.grad for m in params for p in m.parameters() if p.grad is not None]
    buffers = [b for m in params for b in m.buffers() if b.is_floating_point()]
    return digest([y, x.grad, *grads, *buffers])  # type: ignore[list-item]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for name, (fn, params) in layers().items():
        print(name, run_layer(fn, params))


if __name__ == "__main__":
    main()
