"""Canonical digests of tensors and of whole training states.

A state digest never hashes a file's bytes (safetensors may write its header in a different order in another
process). It hashes, for each tensor in sorted-name order, the name and that tensor's own digest, which covers its
dtype, shape and raw little-endian bytes. Per-tensor digests are kept so that a mismatch can name the tensor.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping

import blake3
import torch

from .canonical import Digest, compute_hash

__all__ = ["State", "tensor_digest", "tensor_digests", "state_digest", "combine_digests", "tensor_bytes"]

State = Mapping[str, torch.Tensor]  # tensor name -> tensor; a full training state at a step boundary

_PARALLEL_BYTES = 1 << 22  # above 4 MiB, let blake3 use all cores
assert sys.byteorder == "little", "pol hashes raw tensor bytes and assumes a little-endian host"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor in row-major order, without copying when it is already contiguous on the CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


@functools.lru_cache(maxsize=4096)
def _header(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """The hashed header of a tensor digest (a state's names, dtypes and shapes recur at every checkpoint)."""
    return compute_hash("pol/tensor-header/v1", name.encode(), str(dtype).encode(), repr(shape).encode())


def tensor_digest(name: str, t: torch.Tensor, data: memoryview | None = None) -> Digest:
    """blake3 over (domain, name, dtype, shape, raw bytes) of one tensor. `data`: `tensor_bytes(t)` if at hand."""
    header = _header(name, t.dtype, tuple(t.shape))
    if data is None:
        data = tensor_bytes(t)
    h = blake3.blake3(header, max_threads=blake3.blake3.AUTO if data.nbytes > _PARALLEL_BYTES else 1)
    h.update(data)
    return h.hexdigest()


def tensor_digests(state: State) -> dict[str, Digest]:
    """Per-tensor digests of a state, keyed by name."""
    return {name: tensor_digest(name, state[name]) for name in sorted(state)}


def combine_digests(per_tensor: Mapping[str, Digest]) -> Digest:
    """The state digest from per-tensor digests: order-free in the mapping, fixed by sorted names."""
    parts = [p for name in sorted(per_tensor) for p in (name.encode(), bytes.fromhex(per_tensor[name]))]
    return compute_hash("pol/state/v1", len(per_tensor).to_bytes(8, "little"), *parts).hex()


def state_digest(state: State) -> Digest:
    """The canonical digest of a whole training state."""
    return combine_digests(tensor_digests(state))
