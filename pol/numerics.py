"""Numerics modes. `native`: torch's own kernels with deterministic algorithms on. `exact`: pol.exact's dispatch
mode, bit-exact on any machine (see pol/exact)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import NumericsUnavailable

__all__ = ["numerics_context", "is_exact_available"]


def is_exact_available() -> bool:
    try:
        from . import exact
    except ImportError:
        return False
    return hasattr(exact, "exact_mode")


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def numerics_context(mode: str) -> contextlib.AbstractContextManager[None]:
    """The context every training computation (forward, backward, update) runs in. Raises NumericsUnavailable."""
    if mode == "native":
        return _deterministic()
    if mode == "exact":
        if not is_exact_available():
            raise NumericsUnavailable("exact numerics is not available in this build yet")
        from .exact import exact_mode

        return exact_mode()
    raise NumericsUnavailable(f"unknown numerics mode {mode!r}")
