"""Numerics modes. `native`: torch's own kernels with deterministic algorithms on. `exact`: pol.exact's dispatch
mode, bit-exact on any machine (see pol/exact)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import NumericsUnavailable

__all__ = ["numerics_context"]


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def numerics_context(mode: str) -> contextlib.AbstractContextManager[None]:
    """The context every training computation (forward, backward, update) runs in. Raises NumericsUnavailable
    for an unknown mode."""
    if mode == "native":
        return _deterministic()
    if mode == "exact":
        from .exact import exact_mode

        return exact_mode()
    raise NumericsUnavailable(f"unknown numerics mode {mode!r}")
