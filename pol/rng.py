"""Hardware-independent, counter-based randomness keyed by `(seed, purpose, counters)`.

`torch.randn` gives different values for one seed under different CPU instruction sets, and a generator's hidden
state would force a verifier to replay from step 0. So every draw here is a pure function of its key: the key is
hashed with blake3 into a Philox-4x64 key, numpy's Philox produces raw 64-bit integers (defined by integer
arithmetic only, the same on every platform), and all floats are made from those integers by exact operations and
a single IEEE rounding. Any checkpoint can therefore be a starting point, on any machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import torch

from .canonical import compute_hash

__all__ = ["raw_bits", "uniform", "normal", "permutation", "keep_mask", "small_ints"]

_U24 = float(2**-24)


def _key_text(seed: int, purpose: str, counters: Sequence[int]) -> bytes:
    """The key's bytes: compact JSON of `[seed, purpose, counters]`. Not JCS on purpose: keys may be 64-bit
    integers (a verifier's sampling key), which JCS cannot hold; for pol's ASCII purposes and integer counters
    these are the bytes every earlier version used, so every draw is unchanged."""
    return json.dumps([int(seed), str(purpose), [int(c) for c in counters]], separators=(",", ":"), ensure_ascii=True).encode()


def raw_bits(seed: int, purpose: str, counters: Sequence[int], n: int) -> np.ndarray:
    """`n` raw uint64 draws for the key `(seed, purpose, counters)`."""
    key_bytes = compute_hash("pol/rng/v1", _key_text(seed, purpose, counters))
    bitgen = np.random.Philox(key=int.from_bytes(key_bytes[:16], "little"))
    return bitgen.random_raw(n) if n > 0 else np.zeros(0, dtype=np.uint64)


def _u24(seed: int, purpose: str, counters: Sequence[int], n: int) -> np.ndarray:
    """Integers uniform on [0, 2^24), the top 24 bits of each raw draw."""
    return (raw_bits(seed, purpose, counters, n) >> np.uint64(40)).astype(np.int64)


def uniform(seed: int, purpose: str, counters: Sequence[int], shape: Sequence[int], low: float, high: float) -> torch.Tensor:
    """float32 tensor uniform on [low, high): 24-bit grid, computed in float64 (exact) and rounded once."""
    n = math.prod(shape)
    u = _u24(seed, purpose, counters, n).astype(np.float64) * _U24
    values = (low + (high - low) * u).astype(np.float32)
    return torch.from_numpy(values.reshape(tuple(shape)))


def normal(seed: int, purpose: str, counters: Sequence[int], shape: Sequence[int], std: float) -> torch.Tensor:
    """float32 tensor with mean 0 and standard deviation `std`, as an Irwin-Hall sum of 12 uniforms.

    The sum is formed in integers (exact, order-free) and scaled once, so no transcendental function (whose last
    bit varies between libms) is involved. Tails are cut at 6 standard deviations, which suits initialisation.
    """
    n = math.prod(shape)
    ints = _u24(seed, purpose, counters, 12 * n).reshape(n, 12).sum(axis=1) - 6 * 2**24
    values = (ints.astype(np.float64) * _U24 * std).astype(np.float32)
    return torch.from_numpy(values.reshape(tuple(shape)))


def permutation(seed: int, purpose: str, counters: Sequence[int], n: int) -> np.ndarray:
    """A permutation of range(n): indices sorted by their raw draw (stable, so ties are broken by index)."""
    return np.argsort(raw_bits(seed, purpose, counters, n), kind="stable").astype(np.int64)


def keep_mask(seed: int, purpose: str, counters: Sequence[int], shape: Sequence[int], p_drop: float) -> torch.Tensor:
    """Dropout mask: float32 tensor of 0 and 1/(1-p_drop), each element dropped with probability p_drop.

    Each raw 64-bit draw gives two 32-bit uniforms (low half first), so a mask costs half a draw per element.
    """
    n = math.prod(shape)
    raw = raw_bits(seed, purpose, counters, (n + 1) // 2)
    halves = np.empty(2 * len(raw), dtype=np.uint64)
    halves[0::2] = raw & np.uint64(0xFFFFFFFF)
    halves[1::2] = raw >> np.uint64(32)
    keep = halves[:n] >= np.uint64(int(round(p_drop * 2**32)))
    scale = np.float32(1.0 / (1.0 - p_drop))
    return torch.from_numpy((keep.astype(np.float32) * scale).reshape(tuple(shape)))


def small_ints(seed: int, purpose: str, counters: Sequence[int], shape: Sequence[int], low: int, high: int) -> np.ndarray:
    """int64 array uniform on [low, high) (high - low <= 2^24; the tiny modulo bias is irrelevant for data)."""
    span = high - low
    assert 0 < span <= 2**24, "span out of range"
    return (_u24(seed, purpose, counters, math.prod(shape)) % span + low).reshape(tuple(shape))
