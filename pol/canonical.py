"""Canonical JSON and digests: the one byte encoding that job ids, Merkle leaves and transcript heads are computed over.

Canonical JSON is RFC 8785, the JSON Canonicalization Scheme (JCS), computed by the `rfc8785` package: keys sorted
by UTF-16 code units, no whitespace, strings as UTF-8 with the minimal escapes, numbers in ECMAScript's shortest
round-trip form (`1.0` is written `1`, `1e21` is `1e+21`). A verifier written in another language with any JCS
library recomputes the same bytes, and so the same job id. JCS numbers are IEEE doubles: integers beyond 2**53 - 1,
NaN and infinities have no canonical form and are refused, so every integer pol commits to is bounded by
`MAX_SAFE_INTEGER`.

Digests travel as 64 lowercase hex characters; `parse_digest` is the one place that reads them (exact length,
full match, no whitespace or newline). `parse_json_strict` is the one place that reads JSON from outside: it
refuses NaN/Infinity, duplicate keys and nesting deeper than `MAX_JSON_DEPTH`, all as ValueError.
"""

from __future__ import annotations

import json
import re
from typing import Any

import blake3
import rfc8785

__all__ = [
    "Digest",
    "MAX_SAFE_INTEGER",
    "MAX_JSON_DEPTH",
    "canonical_json",
    "canonical_bytes",
    "compute_hash",
    "is_digest",
    "parse_digest",
    "parse_json_strict",
]

Digest = str  # 64 lowercase hex characters of a 32-byte blake3 digest
MAX_SAFE_INTEGER = 2**53 - 1  # the largest integer JCS (an IEEE double) represents exactly
MAX_JSON_DEPTH = 64  # nesting deeper than this in anything read from outside is refused
_DIGEST = re.compile(r"[0-9a-f]{64}")


def canonical_bytes(value: Any) -> bytes:
    """The RFC 8785 (JCS) encoding of `value`. Raises ValueError on NaN, infinity, integers beyond 2**53 - 1,
    non-string keys or values JSON cannot hold."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(str(exc)) from None


def canonical_json(value: Any) -> str:
    """The canonical JSON text of `value` (see `canonical_bytes`)."""
    return canonical_bytes(value).decode("utf-8")


def compute_hash(domain: str, *parts: bytes) -> bytes:
    """blake3 over a domain tag and length-prefixed parts, so no two different part lists collide."""
    h = blake3.blake3(domain.encode("ascii") + b"\x00")
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def is_digest(value: Any) -> bool:
    """True for exactly 64 lowercase hex characters (no whitespace, no newline)."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def parse_digest(value: Any, what: str = "digest") -> Digest:
    """Return `value` if it is a digest (see `is_digest`). Raises ValueError naming `what`."""
    if not is_digest(value):
        raise ValueError(f"{what}: expected 64 lowercase hex characters, got {str(value)[:80]!r}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json_strict(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON refusing NaN/Infinity, duplicate keys and nesting deeper than `max_depth`. Raises ValueError."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key[:40]!r}")
            out[key] = item
        return out

    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    if _depth(value) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return value
