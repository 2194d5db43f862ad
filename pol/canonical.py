"""Canonical JSON: the one byte encoding that digests, job ids and Merkle leaves are computed over.

Sorted keys, no whitespace, ASCII only, no NaN or infinity, floats written with Python's shortest round-trip
`repr` (so the exact binary64 value is recoverable). Two equal values always give the same bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import blake3

__all__ = ["canonical_json", "canonical_bytes", "compute_hash", "Digest", "parse_json_strict"]

Digest = str  # 64 lowercase hex characters of a 32-byte blake3 digest


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite number at {where or '<root>'}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"non-string key {key!r} at {where or '<root>'}")
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def canonical_json(value: Any) -> str:
    """Return the canonical JSON text of `value`. Raises ValueError on NaN, infinity or non-string keys."""
    _check_finite(value, "")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_bytes(value: Any) -> bytes:
    """The canonical JSON of `value` as bytes."""
    return canonical_json(value).encode("ascii")


def compute_hash(domain: str, *parts: bytes) -> bytes:
    """blake3 over a domain tag and length-prefixed parts, so no two different part lists collide."""
    h = blake3.blake3(domain.encode("ascii") + b"\x00")
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def parse_json_strict(text: str | bytes) -> Any:
    """Parse JSON refusing NaN/Infinity and duplicate keys. Raises ValueError."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = item
        return out

    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=no_duplicates)
