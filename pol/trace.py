"""Trace records: one per checkpoint, committed as the leaves of the Merkle tree.

`record_from_dict` and `Record.leaf` are the reference. `records_from_dicts` and `compute_leaves` do the same for a
whole manifest's records at a few microseconds a record: the first checks the common shape in one pass and hands
anything else to `record_from_dict` (so it accepts, rejects and names errors exactly as the reference), the second
writes the leaf's canonical JSON directly for the fixed record shape and hands anything else to `Record.leaf`.
tests/test_canonical_fast.py holds both to the reference, byte for byte and error for error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import eq, is_not, itemgetter
from typing import Any

import torch

from .canonical import (
    MAX_SAFE_INTEGER,
    Digest,
    canonical_bytes,
    canonical_floats,
    canonical_json,
    is_digest,
    is_digest_list,
)
from .errors import ManifestError
from .merkle import compute_commitment, merkle_root

__all__ = ["Record", "record_from_dict", "records_from_dicts", "compute_leaves", "compute_trace_commitment",
           "compute_update_norm", "EMPTY_DATA", "MAX_EVAL_METRICS"]

FLOAT32_MAX = 3.4028234663852886e38
EMPTY_DATA: Digest = "0" * 64  # data digest of record 0: no data consumed yet
MAX_EVAL_METRICS = 8  # as many as a spec's evaluation may name
MAX_METRIC_NAME = 300  # a metric's name: "loss", "accuracy" or a module:callable


@dataclass(frozen=True, slots=True)
class Record:
    """The state at checkpoint `step`, the data consumed since the previous checkpoint, the mean loss there, the
    norm of the parameter update since the previous checkpoint (`update`, `compute_update_norm`; None at step 0),
    and the evaluation metrics of that state (metric name -> value) when the spec names an evaluation
    (pol.evaluate).

    `update` lets a verifier rank segments by update size without reading a checkpoint (largest-update sampling);
    it is the solver's claim, checked for every segment the verifier replays. `eval` is part of the Merkle leaf; a
    record without one (a spec without evaluation) has no "eval" key at all."""

    step: int
    state: Digest
    data: Digest
    loss: float | None
    eval: Mapping[str, float] | None = None
    update: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "state": self.state, "data": self.data, "loss": self.loss,
                               "update": self.update}
        if self.eval is not None:
            out["eval"] = dict(self.eval)
        return out

    def leaf(self, job_id: Digest) -> bytes:
        """The Merkle leaf bytes: the canonical record, bound to its job."""
        return canonical_bytes({"job_id": job_id, **self.to_dict()})


def record_from_dict(value: Any, where: str) -> Record:
    """Parse one record strictly. Raises ManifestError naming the field."""
    if not isinstance(value, Mapping) or set(value) - {"eval"} != {"step", "state", "data", "loss", "update"}:
        raise ManifestError(where, "a record needs exactly the keys step, state, data, loss, update (and eval, if "
                                   "evaluated)")
    step, state, data, loss = value["step"], value["state"], value["data"], value["loss"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 10**9:
        raise ManifestError(f"{where}.step", "expected an integer step in [0, 1e9]")
    for name, digest in (("state", state), ("data", data)):
        if not is_digest(digest):
            raise ManifestError(f"{where}.{name}", "expected 64 lowercase hex characters")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise ManifestError(f"{where}.loss", "expected a finite number or null")
    update = value["update"]
    if update is not None and (isinstance(update, bool) or not isinstance(update, (int, float)) or not math.isfinite(update)
                               or update < 0):
        raise ManifestError(f"{where}.update", "expected a finite non-negative number or null")
    evaluation = _eval_from_value(value["eval"], f"{where}.eval") if "eval" in value else None
    return Record(step, state, data, None if loss is None else float(loss), evaluation,
                  None if update is None else float(update))


_KEYS = frozenset({"step", "state", "data", "loss", "update"})
_KEYS_EVAL = _KEYS | {"eval"}
_FLOAT_OR_NONE = {float, type(None)}
_COLUMNS = ("step", "state", "data", "loss", "update")


def _is_plain_numbers(values: list[Any], minimum: float) -> bool:
    """True if every value is None or a finite float of at least `minimum` (checked by C-level iteration)."""
    if not set(map(type, values)) <= _FLOAT_OR_NONE:
        return False
    numbers = list(compress(values, map(is_not, values, repeat(None))))
    return all(map(math.isfinite, numbers)) and (not numbers or min(numbers) >= minimum)


def _is_plain_eval(value: Any) -> bool:
    return (type(value) is dict and 0 < len(value) <= MAX_EVAL_METRICS
            and all(type(k) is str and 0 < len(k) <= MAX_METRIC_NAME for k in value)
            and _is_plain_numbers(list(value.values()), -math.inf) and None not in value.values())


def records_from_dicts(values: Sequence[Any], where: str = "records") -> tuple[Record, ...]:
    """Parse a list of records strictly: `tuple(record_from_dict(v, f"{where}[{i}]") ...)`, checked column by
    column for records of the common shape (exact keys, int steps, float or null losses and updates, float
    metrics, all digests at once). Anything else (an int loss, a wrong type, a bad digest) goes to
    `record_from_dict` for every record, which accepts it or raises the same ManifestError the reference would,
    for the same record and field."""
    values = list(values)
    if set(map(type, values)) <= {dict}:
        keys = list(map(dict.keys, values))
        plain = all(map(eq, keys, repeat(_KEYS)))
        with_eval = not plain and all(map(eq, keys, repeat(_KEYS_EVAL)))
        if plain or with_eval:
            steps, states, datas, losses, updates = (list(map(itemgetter(k), values)) for k in _COLUMNS)
            evals = list(map(itemgetter("eval"), values)) if with_eval else []
            if (set(map(type, steps)) <= {int} and (not steps or 0 <= min(steps) and max(steps) <= 10**9)
                    and is_digest_list(states + datas) and _is_plain_numbers(losses, -math.inf)
                    and _is_plain_numbers(updates, 0.0) and all(map(_is_plain_eval, evals))):
                copies = list(map(dict, evals)) if with_eval else repeat(None)
                return tuple(map(Record, steps, states, datas, losses, copies, updates))
    return tuple(record_from_dict(v, f"{where}[{i}]") for i, v in enumerate(values))


def compute_leaves(job_id: Digest, records: Sequence[Record]) -> list[bytes]:
    """The Merkle leaf bytes of each record, `[r.leaf(job_id) for r in records]`, written column by column for the
    fixed shape: keys in RFC 8785 order (data, eval, job_id, loss, state, step, update), digests that need no
    escaping, int steps, floats or nulls (`canonical_floats`). Records of any other shape go to `Record.leaf`,
    which raises what it raises."""
    steps = [r.step for r in records]
    states = [r.state for r in records]
    datas = [r.data for r in records]
    losses = [r.loss for r in records]
    updates = [r.update for r in records]
    plain = (type(job_id) is str and job_id.isascii() and job_id.isalnum() and is_digest_list(states + datas)
             and set(map(type, steps)) <= {int} and (not steps or 0 <= min(steps) and max(steps) <= MAX_SAFE_INTEGER)
             and set(map(type, losses)) <= _FLOAT_OR_NONE and set(map(type, updates)) <= _FLOAT_OR_NONE)
    if not plain:
        return [r.leaf(job_id) for r in records]
    evals = ["" if r.eval is None else ',"eval":' + canonical_json(dict(r.eval)) for r in records]
    leaf = '{{"data":"{}"{},"job_id":"' + job_id + '","loss":{},"state":"{}","step":{},"update":{}}}'
    texts = map(leaf.format, datas, evals, canonical_floats(losses), states, steps, canonical_floats(updates))
    return list(map(str.encode, texts))


def _eval_from_value(value: Any, where: str) -> dict[str, float]:
    """A record's metrics: 1 to MAX_EVAL_METRICS names, each a finite number. Which names is the spec's to say
    (the manifest checks them against its evaluation)."""
    if not isinstance(value, Mapping) or not 0 < len(value) <= MAX_EVAL_METRICS:
        raise ManifestError(where, f"expected a table of 1 to {MAX_EVAL_METRICS} metrics")
    out = {}
    for name, metric in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            raise ManifestError(where, f"metric names are strings of 1 to {MAX_METRIC_NAME} characters")
        if isinstance(metric, bool) or not isinstance(metric, (int, float)) or not math.isfinite(metric):
            raise ManifestError(f"{where}.{name[:80]}", "expected a finite number")
        out[name] = float(metric)
    return out


def compute_update_norm(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """The committed update norm ||theta_after - theta_before|| over the parameters (the `param/...` tensors).

    Defined bit for bit, from the two states' bytes alone: each element's difference is taken in float64 and
    rounded to float32, squared in float32, the squares summed exactly and rounded once
    (`pol.exact.reduce.exact_sum`), and the square root taken in float64. So it is the same number on any machine,
    thread count or device, in both numerics, and a verifier recomputes it exactly from the checkpoints it reads.
    A norm beyond float32's range (or not a number) is recorded as float32's largest value. A parameter `before` lacks (or holds in
    another shape) counts in full, as if it were zeros before: the norm is defined for any two states (a verifier
    rejects a checkpoint that does not fit the spec anyway, before this matters).
    """
    from .exact.reduce import exact_sum

    squares = []
    for name in sorted(n for n in after if n.startswith("param/") and after[n].is_floating_point()):
        a, b = after[name].detach().cpu().double(), before.get(name)
        d = (a - b.detach().cpu().double() if b is not None and b.shape == a.shape else a).float()
        squares.append((d * d).reshape(-1))
    if not squares:
        return 0.0
    total = float(exact_sum(torch.cat(squares)))
    return math.sqrt(total) if math.isfinite(total) else FLOAT32_MAX


def compute_trace_commitment(job_id: Digest, records: Sequence[Record]) -> tuple[Digest, Digest]:
    """(Merkle root, commitment) over the records of a job."""
    root = merkle_root(compute_leaves(job_id, records))
    return root.hex(), compute_commitment(job_id, root, len(records))
