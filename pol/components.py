"""Resolving `module:callable` references for user models and datasets.

Only modules already importable on this machine are loaded; a bundle never carries code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .errors import ComponentError

__all__ = ["is_import_path", "load_callable"]


def is_import_path(name: str) -> bool:
    """True for `package.module:attr` references."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr) and not name.startswith("dir:")


def load_callable(ref: str) -> Callable[..., Any]:
    """Import `module:attr[.attr]` and return the callable. Raises ComponentError naming what failed."""
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ComponentError(f"cannot import module {module_name!r} for {ref!r}: {exc}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ComponentError(f"module {module_name!r} has no attribute {attr_path!r} (from {ref!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ComponentError(f"{ref!r} is not callable")
    return obj
