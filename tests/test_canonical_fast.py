"""The fast paths of opening a bundle, held to their references byte for byte and error for error.

`canonical_float`/`canonical_floats` against `canonical_json` (the rfc8785 package), `compute_leaves` against
`Record.leaf`, `merkle_root` against the reference levels (`leaf_hash`/`node_hash`), `records_from_dicts` against
`record_from_dict`, the file table's one-pass check against the entry-by-entry one, `parse_json_strict`'s depth and
duplicate-key checks against naive versions, and the directory listing against `os.walk`.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pol.bundle import BundleFileError, _files_from_dict, _listing, checkpoint_name
from pol.canonical import canonical_float, canonical_floats, canonical_json, parse_json_strict
from pol.errors import BundleError, ManifestError
from pol.merkle import _levels, merkle_root
from pol.trace import Record, compute_leaves, record_from_dict, records_from_dicts

JOB = "5e" * 32
HEX = "0123456789abcdef"


def _random_double(rng: random.Random) -> float:
    """A double from random bits: every exponent equally likely, subnormals and huge values included."""
    while True:
        (x,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if math.isfinite(x):
            return x


def _floats(rng: random.Random, n: int) -> list[float]:
    """Random doubles across the ranges where RFC 8785's number format changes form."""
    out = [0.0, -0.0, 1.0, -1.0, 1e-7, 1e-6, 9.999999999999999e-7, 1e-5, 1e-4, 0.001, 1e15, 1e16, 1e20, 1e21, 1e22,
           1.5e21, 123456789012345680.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 0.2 + 0.1,
           2.2680747509002686, 3.4028234663852886e38, 2.0**53, 2.0**53 + 2, 1 / 3]
    out += [-x for x in out]
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            out.append(_random_double(rng))
        elif kind == 1:
            out.append(rng.uniform(-1, 1) * 10.0 ** rng.randint(-9, 23))
        elif kind == 2:
            out.append(float(rng.randint(-(2**60), 2**60)))
        elif kind == 3:
            out.append(rng.random() * 3)
        else:
            out.append(float(f"{rng.randint(1, 10 ** rng.randint(1, 17))}e{rng.randint(-25, 22)}"))  # short decimals
    return out


def test_canonical_float_is_the_reference_text_on_many_doubles():
    rng = random.Random(8785)
    for x in _floats(rng, 20000):
        assert canonical_float(x) == canonical_json(x), repr(x)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_float_is_the_reference_text(x):
    assert canonical_float(x) == canonical_json(x)


@pytest.mark.parametrize("x", [math.nan, math.inf, -math.inf])
def test_canonical_float_refuses_what_has_no_canonical_form(x):
    with pytest.raises(ValueError):
        canonical_float(x)
    with pytest.raises(ValueError):
        canonical_floats([1.0, x])


def test_canonical_floats_is_canonical_float_of_each():
    rng = random.Random(1)
    plain = [rng.random() * 10 for _ in range(200)] + [None, 1.0, 10.0, 0.0, 100.0, 0.5]
    for values in ([], [None], [0.0], [-0.0], [-0.0, 1.0], [1.0, None, -10.0], plain, plain + [1e-5], plain + [1e17],
                   _floats(rng, 3000) + [None] * 5):
        assert canonical_floats(values) == ["null" if v is None else canonical_json(v) for v in values]


def _digest(rng: random.Random) -> str:
    return "".join(rng.choice(HEX) for _ in range(64))


def _record(rng: random.Random, i: int, evaluated: bool) -> Record:
    floats = _floats(rng, 2)[-2:]
    loss = None if rng.random() < 0.1 else abs(floats[0]) if rng.random() < 0.5 else rng.random() * 5
    update = None if i == 0 else abs(floats[1]) if rng.random() < 0.5 else rng.random()
    evaluation = None
    if evaluated:
        names = ["loss", "accuracy", "pkg.mod:f1", "é", "\U0001f600", "a\"b", "z\n", "Ω"]
        evaluation = {name: _floats(rng, 1)[-1] for name in rng.sample(names, rng.randint(1, 8))}
    return Record(rng.randint(0, 10**9), _digest(rng), _digest(rng), loss, evaluation, update)


@pytest.mark.parametrize("evaluated", [False, True])
def test_compute_leaves_is_record_leaf_byte_for_byte(evaluated):
    rng = random.Random(16 + evaluated)
    records = [_record(rng, i, evaluated) for i in range(3000)]
    assert compute_leaves(JOB, records) == [r.leaf(JOB) for r in records]


def test_compute_leaves_of_other_shapes_is_record_leaf():
    rng = random.Random(3)
    base = [_record(rng, i, False) for i in range(5)]
    odd = [
        Record(7, "S" * 64, _digest(rng), 1.0),  # not lowercase hex (still a string JSON holds)
        Record(7, _digest(rng), _digest(rng), 3),  # an int loss
        Record(True, _digest(rng), _digest(rng), 1.0),  # a bool step
        Record(7, "a\"\\" * 3, _digest(rng), 1.0, None, 2),  # a string that needs escaping, an int update
    ]
    for record in odd:
        records = [*base, record]
        assert compute_leaves(JOB, records) == [r.leaf(JOB) for r in records]
    assert compute_leaves("not a digest \u00e9", base) == [r.leaf("not a digest \u00e9") for r in base]
    for bad in (Record(2**53, _digest(rng), _digest(rng), 1.0), Record(1, _digest(rng), _digest(rng), math.nan)):
        with pytest.raises(ValueError):
            compute_leaves(JOB, [*base, bad])


@given(st.lists(st.binary(max_size=80), min_size=1, max_size=70))
def test_merkle_root_is_the_reference_root(leaves):
    from pol.merkle import leaf_hash

    assert merkle_root(leaves) == _levels([leaf_hash(d) for d in leaves])[-1][0]


def test_merkle_root_is_the_reference_root_for_every_small_tree():
    from pol.merkle import leaf_hash

    leaves = [os.urandom(i % 50) for i in range(130)]
    for n in range(1, 130):
        assert merkle_root(leaves[:n]) == _levels([leaf_hash(d) for d in leaves[:n]])[-1][0]


def _record_dicts(rng: random.Random, n: int, evaluated: bool) -> list[dict]:
    return [json.loads(json.dumps(_record(rng, i, evaluated).to_dict())) for i in range(n)]


def _outcome(f, *args):
    try:
        return "ok", f(*args)
    except ManifestError as exc:
        return type(exc).__name__, str(exc)


def _reference(values):
    return tuple(record_from_dict(v, f"records[{i}]") for i, v in enumerate(values))


_BAD_FIELDS = [
    ("step", -1), ("step", 10**9 + 1), ("step", True), ("step", 1.0), ("step", "1"), ("state", "A" * 64),
    ("state", "a" * 63), ("state", 5), ("data", "g" * 64), ("data", "a" * 63 + "\u0661"), ("loss", math.inf),
    ("loss", True), ("loss", "1"), ("loss", 3), ("update", -1.0), ("update", -0.0), ("update", math.nan),
    ("update", 2), ("update", False), ("eval", None), ("eval", {}), ("eval", {"a": 1}), ("eval", {"a": math.inf}),
    ("eval", {"": 1.0}), ("eval", {"x" * 301: 1.0}), ("eval", {str(i): 1.0 for i in range(9)}), ("eval", {"a": True}),
    ("eval", [1.0]), ("extra", 1),
]


@pytest.mark.parametrize("evaluated", [False, True])
def test_records_from_dicts_is_the_reference_on_good_records(evaluated):
    values = _record_dicts(random.Random(5), 500, evaluated)
    assert records_from_dicts(values) == _reference(values)
    assert records_from_dicts([]) == ()


@pytest.mark.parametrize("evaluated", [False, True])
def test_records_from_dicts_is_the_reference_error_for_error(evaluated):
    rng = random.Random(6 + evaluated)
    good = _record_dicts(rng, 40, evaluated)
    for field, bad in _BAD_FIELDS:
        for where in (0, 17, 39):
            values = [dict(v) for v in good]
            values[where][field] = bad
            got, expected = _outcome(records_from_dicts, values), _outcome(_reference, values)
            assert got == expected, (field, bad, where)
            values[3]["state"] = "Z" * 64  # an earlier error is the one named
            assert _outcome(records_from_dicts, values) == _outcome(_reference, values)
    for values in ([*good[:5], "not a record", *good[5:]], [*good[:5], {"step": 1}], [*good, [1, 2]]):
        assert _outcome(records_from_dicts, values) == _outcome(_reference, values)
    mixed = [*_record_dicts(rng, 3, not evaluated), *good]  # records with and without eval side by side
    assert _outcome(records_from_dicts, mixed) == _outcome(_reference, mixed)


def test_records_from_dicts_keeps_no_reference_to_the_input():
    values = _record_dicts(random.Random(7), 3, True)
    records = records_from_dicts(values)
    values[1]["eval"]["loss"] = 123.0
    assert records[1].eval is not values[1]["eval"] and 123.0 not in records[1].eval.values()


def _files(rng: random.Random, n: int) -> dict:
    return {checkpoint_name(i): {"size": rng.randint(0, 10**6), "blake3": _digest(rng)} for i in range(n)}


def _table_outcome(value, expected):
    try:
        return "ok", _files_from_dict(value, expected)
    except BundleError as exc:
        return type(exc).__name__, str(exc)


def test_the_file_table_checked_in_one_pass_is_the_table_checked_entry_by_entry():
    rng = random.Random(9)
    table = _files(rng, 50)
    names = set(table)
    assert _files_from_dict(table, names) == _files_from_dict(table)
    bad_entries = [{"size": -1, "blake3": "a" * 64}, {"size": True, "blake3": "a" * 64}, {"size": 2**41, "blake3": "a" * 64},
                   {"size": 1, "blake3": "A" * 64}, {"size": 1}, {"size": 1, "blake3": "a" * 64, "x": 1}, [1, 2], None]
    for entry in bad_entries:
        for where in (0, 49):
            value = dict(table)
            value[checkpoint_name(where)] = entry
            assert _table_outcome(value, names) == _table_outcome(value, frozenset()) != ("ok", None)
            assert _table_outcome(value, names)[0] != "ok"
    renamed = dict(table)
    renamed["checkpoints/../x"] = renamed.pop(checkpoint_name(3))
    assert _table_outcome(renamed, names) == _table_outcome(renamed, frozenset())
    assert _table_outcome(renamed, names)[0] == BundleFileError.__name__


def _naive_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((_naive_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_naive_depth(v) for v in value), default=0)
    return 0


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
                     max_leaves=40)


@given(_json, st.integers(0, 8))
def test_parse_json_strict_refuses_exactly_what_nests_too_deep(value, limit):
    text = json.dumps(value)
    if _naive_depth(value) > limit:
        with pytest.raises(ValueError, match="nested deeper"):
            parse_json_strict(text, max_depth=limit)
    else:
        assert parse_json_strict(text, max_depth=limit) == value


def test_parse_json_strict_depth_limit_boundary():
    for limit in (1, 2, 64):
        for opener, closer in (("[", "]"), ('{"a":', "}")):
            assert parse_json_strict(opener * limit + "1" + closer * limit, max_depth=limit) is not None
            with pytest.raises(ValueError, match="nested deeper"):
                parse_json_strict(opener * (limit + 1) + "1" + closer * (limit + 1), max_depth=limit)
    assert parse_json_strict("5", max_depth=0) == 5
    with pytest.raises(ValueError, match="nested deeper"):
        parse_json_strict("[[1], 2, [[{}]]]", max_depth=3)


@pytest.mark.parametrize(("text", "key"), [('{"a": 1, "a": 2}', "a"), ('{"b": {"a": 1, "c": 2, "a": 2}}', "a"),
                                          ('[{"x": 1}, {"y": 1, "y": 1}]', "y"), ('{"a": 1, "b": 2, "b": 3, "a": 4}', "b")])
def test_parse_json_strict_refuses_duplicate_keys_naming_the_first(text, key):
    with pytest.raises(ValueError, match=f"duplicate key '{key}'"):
        parse_json_strict(text)


def _walk_listing(directory: Path) -> dict[str, int]:
    """The listing as os.walk gives it (the previous implementation): what `_listing` must equal."""
    found = {}
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            full = Path(root) / name
            if full.is_file() and not full.is_symlink():
                found[full.relative_to(directory).as_posix()] = full.stat().st_size
    return found


def test_listing_is_the_walk(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "manifest.json").write_bytes(b"{}")
    for i in range(30):
        (tmp_path / checkpoint_name(i)).write_bytes(b"x" * i)
    assert _listing(tmp_path) == _walk_listing(tmp_path)
    (tmp_path / "checkpoints" / "nested").mkdir()
    with pytest.raises(BundleFileError, match="unexpected directory"):
        _listing(tmp_path)
    (tmp_path / "checkpoints" / "nested").rmdir()
    (tmp_path / "checkpoints" / "link").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(BundleFileError, match="is a link"):
        _listing(tmp_path)
    (tmp_path / "checkpoints" / "link").unlink()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BundleFileError, match="not a regular file"):
        _listing(tmp_path)


@pytest.mark.parametrize("evaluated", [False, True])
def test_the_common_shape_takes_the_fast_paths(monkeypatch, evaluated):
    """Records as solvers write them never reach the references (else opening a bundle is slow again)."""
    import pol.bundle
    import pol.trace

    rng = random.Random(10)
    values = _record_dicts(rng, 50, evaluated)
    records = _reference(values)
    table = _files(rng, 50)

    def unreachable(*args, **kwargs):
        raise AssertionError("the reference path was taken")

    monkeypatch.setattr(pol.trace, "record_from_dict", unreachable)
    monkeypatch.setattr(Record, "leaf", unreachable)
    monkeypatch.setattr(pol.bundle, "_check_path", unreachable)
    assert records_from_dicts(values) == records
    assert len(compute_leaves(JOB, records)) == 50
    assert len(_files_from_dict(table, set(table))) == 50
