"""Tiny models and a training loop for the exact-numerics tests and the overhead benchmark.

Initialisation comes from numpy (torch.randn differs across CPU capabilities); dropout, where used, would be a
precomputed float mask. `train(...)` runs a few AdamW steps and returns the final parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, classes)
        return self.fc2(F.gelu(self.ln(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 16, 16)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 8, 8, 8)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 1)  # (B, 16, 4, 4)
        return self.fc(torch.flatten(x, 1))


class TinyAttention(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, heads: int = 4, t: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp1 = nn.Linear(d, 4 * d)
        self.mlp2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.tril(torch.ones(t, t, dtype=torch.bool)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        b, t = idx.shape
        x = self.emb(idx) + self.pos(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=2)
        hd = x.shape[-1] // self.heads
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        att = (q @ k.transpose(-2, -1)) * (1.0 / hd**0.5)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(y)
        x = x + self.mlp2(F.gelu(self.mlp1(self.ln2(x))))
        return self.head(x)


def init_numpy(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with numpy draws (hardware independent)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            scale = 1.0 / np.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1
            p.copy_(torch.from_numpy((rng.standard_normal(p.shape) * scale).astype(np.float32)))
    return model


def make_data(kind: str, seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed + 1000)
    if kind == "mlp":
        x = torch.from_numpy(rng.standard_normal((batch, 32)).astype(np.float32))
        return x, torch.from_numpy(rng.integers(0, 10, batch))
    if kind == "cnn":
        x = torch.from_numpy(rng.standard_normal((batch, 1, 16, 16)).astype(np.float32))
        return x, torch.from_numpy(rng.integers(0, 10, batch))
    idx = torch.from_numpy(rng.integers(0, 32, (batch, 16)))
    return idx, torch.roll(idx, -1, dims=1)


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": CNN, "attn": TinyAttention}


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "attn":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if kind == "cnn":
        return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))
    return F.cross_entropy(out, y)


def adamw_step(
    params: list[torch.Tensor],
    state: list[tuple[torch.Tensor, torch.Tensor]],
    step: int,
    lr: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    wd: float = 0.01,
) -> None:
    """AdamW with plain tensor ops (the trainer's form)."""
    with torch.no_grad():
        for p, (m, v) in zip(params, state, strict=True):
            g = p.grad
            assert g is not None
            m.copy_(b1 * m + (1 - b1) * g)
            v.copy_(b2 * v + (1 - b2) * g * g)
            mhat = m / (1 - b1**step)
            vhat = v / (1 - b2**step)
            p.copy_(p - lr * (mhat / (torch.sqrt(vhat) + eps)) - lr * wd * p)


def sgd_step(params: list[torch.Tensor], bufs: list[torch.Tensor], lr: float = 0.05, mom: float = 0.9, wd: float = 1e-4) -> None:
    """SGD with momentum and weight decay, plain tensor ops."""
    with torch.no_grad():
        for p, buf in zip(params, bufs, strict=True):
            assert p.grad is not None
            g = p.grad + wd * p
            buf.copy_(mom * buf + g)
            p.copy_(p - lr * buf)


def train(
    kind: str,
    steps: int,
    mode: Callable[[], contextlib.AbstractContextManager[object]],
    batch: int = 16,
    seed: int = 0,
    optimizer: str = "adamw",
    micro_batches: int = 1,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Train `kind` for `steps` steps with the numerics context `mode`; returns the final parameters."""
    model = init_numpy(MODELS[kind](), seed).to(device)
    params = [p for _, p in sorted(model.named_parameters())]
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in make_data(kind, seed + step, batch))
        for p in params:
            p.grad = None
        with mode():
            for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
                loss = loss_fn(kind, model(xs), ys) * (1.0 / micro_batches)
                loss.backward()
            if optimizer == "adamw":
                adamw_step(params, state, step)
            else:
                sgd_step(params, bufs)
    return {n: p.detach().cpu().clone() for n, p in sorted(model.named_parameters())}


@contextlib.contextmanager
def native() -> Iterator[None]:
    yield
