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

`canonical_bytes` (the `rfc8785` package) is the reference encoder. `canonical_float` is a fast path beside it for one
number, equal to it by construction (it hands every float whose shortest form has an exponent back to the package)
and held to it byte for byte by tests/test_canonical_fast.py; `pol.trace.compute_leaves` builds on it.
"""

from __future__ import annotations

import json
import re
from itertools import chain, compress, repeat
from operator import is_
from typing import Any

import blake3
import rfc8785

__all__ = [
    "Digest",
    "MAX_SAFE_INTEGER",
    "MAX_JSON_DEPTH",
    "canonical_json",
    "canonical_bytes",
    "canonical_float",
    "canonical_floats",
    "compute_hash",
    "is_digest",
    "is_digest_list",
    "parse_digest",
    "parse_json_strict",
]

Digest = str  # 64 lowercase hex characters of a 32-byte blake3 digest
MAX_SAFE_INTEGER = 2**53 - 1  # the largest integer JCS (an IEEE double) represents exactly
MAX_JSON_DEPTH = 64  # nesting deeper than this in anything read from outside is refused
_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEX = b"0123456789abcdef"


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


def canonical_float(value: float) -> str:
    """The RFC 8785 text of a float, equal to `canonical_json(value)`: Python's shortest round-trip digits
    (`repr`) without a trailing `.0`, and `0` for both zeros. Numbers whose shortest form has an exponent (below
    1e-4 or from 1e16 on), NaN and the infinities go to the reference encoder (which refuses the last three with
    ValueError)."""
    if value == 0:
        return "0"
    text = repr(value)
    if "e" in text or "n" in text:  # 1e-05, 1e+16, nan, inf: ECMAScript's exponent rules, or no canonical form
        return canonical_json(value)
    return text[:-2] if text.endswith(".0") else text


def canonical_floats(values: list[float | None]) -> list[str]:
    """`canonical_float` of each float, `null` for each None, formatted all at once: the `repr`s are joined with
    `|` after each, and when none has an exponent, a NaN, an infinity or a negative zero, every trailing `.0` is
    dropped in one replace (`.0|` can only be a value's end). Otherwise value by value."""
    if not values:
        return []
    joined = ("|".join(map(repr, values)) + "|").replace("None|", "N|")  # no float's repr holds an N
    if "e" in joined or "n" in joined or "-0.0|" in joined:  # 1e-05, 1e+16, nan, inf, -0.0
        return ["null" if v is None else canonical_float(v) for v in values]
    return joined.replace(".0|", "|").replace("N|", "null|").split("|")[:-1]


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


def is_digest_list(values: list[Any]) -> bool:
    """True if every value is a digest (`is_digest`), checked over all of them at once: each a 64-character
    string, and their concatenation nothing but lowercase hex."""
    if not (set(map(type, values)) <= {str} and set(map(len, values)) <= {64}):
        return False
    joined = "".join(values)
    return joined.isascii() and not joined.encode("ascii").translate(None, _HEX)


def parse_digest(value: Any, what: str = "digest") -> Digest:
    """Return `value` if it is a digest (see `is_digest`). Raises ValueError naming `what`."""
    if not is_digest(value):
        raise ValueError(f"{what}: expected 64 lowercase hex characters, got {str(value)[:80]!r}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, computed level by level without recursion (each level's children are
    gathered and sorted into objects and arrays by C-level iteration). Stops counting past `limit`."""
    dicts, lists = ([value], []) if type(value) is dict else ([], [value]) if type(value) is list else ([], [])
    depth = 0
    while (dicts or lists) and depth <= limit:
        depth += 1
        children = list(chain(chain.from_iterable(map(dict.values, dicts)), chain.from_iterable(lists)))
        kinds = list(map(type, children))
        dicts = list(compress(children, map(is_, kinds, repeat(dict))))
        lists = list(compress(children, map(is_, kinds, repeat(list))))
    return depth


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object from its members, refusing a key given twice. Raises ValueError naming the first repeated key."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return out


def parse_json_strict(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON refusing NaN/Infinity, duplicate keys and nesting deeper than `max_depth`. Raises ValueError."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    if _depth(value, max_depth) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return value
