"""Trace records: one per checkpoint, committed as the leaves of the Merkle tree."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .canonical import Digest, canonical_bytes, is_digest
from .errors import ManifestError
from .merkle import compute_commitment, merkle_root

__all__ = ["Record", "record_from_dict", "compute_trace_commitment", "EMPTY_DATA", "MAX_EVAL_METRICS"]

EMPTY_DATA: Digest = "0" * 64  # data digest of record 0: no data consumed yet
MAX_EVAL_METRICS = 8  # as many as a spec's evaluation may name
MAX_METRIC_NAME = 300  # a metric's name: "loss", "accuracy" or a module:callable


@dataclass(frozen=True, slots=True)
class Record:
    """The state at checkpoint `step`, the data consumed since the previous checkpoint, the mean loss there, and
    the evaluation metrics of that state (metric name -> value) when the spec names an evaluation (pol.evaluate).

    `eval` is part of the Merkle leaf; a record without one (a spec without evaluation) has no "eval" key at all,
    so such bundles are the bytes they were before evaluation existed."""

    step: int
    state: Digest
    data: Digest
    loss: float | None
    eval: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "state": self.state, "data": self.data, "loss": self.loss}
        if self.eval is not None:
            out["eval"] = dict(self.eval)
        return out

    def leaf(self, job_id: Digest) -> bytes:
        """The Merkle leaf bytes: the canonical record, bound to its job."""
        return canonical_bytes({"job_id": job_id, **self.to_dict()})


def record_from_dict(value: Any, where: str) -> Record:
    """Parse one record strictly. Raises ManifestError naming the field."""
    if not isinstance(value, Mapping) or set(value) - {"eval"} != {"step", "state", "data", "loss"}:
        raise ManifestError(where, "a record needs exactly the keys step, state, data, loss (and eval, if evaluated)")
    step, state, data, loss = value["step"], value["state"], value["data"], value["loss"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 10**9:
        raise ManifestError(f"{where}.step", "expected an integer step in [0, 1e9]")
    for name, digest in (("state", state), ("data", data)):
        if not is_digest(digest):
            raise ManifestError(f"{where}.{name}", "expected 64 lowercase hex characters")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise ManifestError(f"{where}.loss", "expected a finite number or null")
    evaluation = _eval_from_value(value["eval"], f"{where}.eval") if "eval" in value else None
    return Record(step, state, data, None if loss is None else float(loss), evaluation)


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


def compute_trace_commitment(job_id: Digest, records: Sequence[Record]) -> tuple[Digest, Digest]:
    """(Merkle root, commitment) over the records of a job."""
    root = merkle_root([r.leaf(job_id) for r in records])
    return root.hex(), compute_commitment(job_id, root, len(records))
