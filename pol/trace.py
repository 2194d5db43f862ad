"""Trace records: one per checkpoint, committed as the leaves of the Merkle tree."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .canonical import Digest, canonical_bytes, is_digest
from .errors import ManifestError
from .merkle import compute_commitment, merkle_root

__all__ = ["Record", "record_from_dict", "compute_trace_commitment", "EMPTY_DATA"]

EMPTY_DATA: Digest = "0" * 64  # data digest of record 0: no data consumed yet


@dataclass(frozen=True, slots=True)
class Record:
    """The state at checkpoint `step`, the data consumed since the previous checkpoint, and the mean loss there."""

    step: int
    state: Digest
    data: Digest
    loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "state": self.state, "data": self.data, "loss": self.loss}

    def leaf(self, job_id: Digest) -> bytes:
        """The Merkle leaf bytes: the canonical record, bound to its job."""
        return canonical_bytes({"job_id": job_id, **self.to_dict()})


def record_from_dict(value: Any, where: str) -> Record:
    """Parse one record strictly. Raises ManifestError naming the field."""
    if not isinstance(value, Mapping) or set(value) != {"step", "state", "data", "loss"}:
        raise ManifestError(where, "a record needs exactly the keys step, state, data, loss")
    step, state, data, loss = value["step"], value["state"], value["data"], value["loss"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 10**9:
        raise ManifestError(f"{where}.step", "expected an integer step in [0, 1e9]")
    for name, digest in (("state", state), ("data", data)):
        if not is_digest(digest):
            raise ManifestError(f"{where}.{name}", "expected 64 lowercase hex characters")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise ManifestError(f"{where}.loss", "expected a finite number or null")
    return Record(step, state, data, None if loss is None else float(loss))


def compute_trace_commitment(job_id: Digest, records: Sequence[Record]) -> tuple[Digest, Digest]:
    """(Merkle root, commitment) over the records of a job."""
    root = merkle_root([r.leaf(job_id) for r in records])
    return root.hex(), compute_commitment(job_id, root, len(records))
