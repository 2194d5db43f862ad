"""Dispute messages: typed frozen records with a strict canonical-JSON form.

Every message carries `seq` (its position in the dispute: a replay is refused) and `prev` (the transcript head it
answers: a message cannot be moved to another dispute or another point of this one). `sender` follows from the
kind, except for `Timeout`, which names its claimant.

    challenger: Open -> StepAnswer* -> GraphAnswer -> NodeAnswer* [-> Point]   (and Timeout)
    solver:     StepClaim* -> GraphCommit -> NodeClaim* -> Reveal | StateReveal   (and Timeout)
    referee:    Ruling

`message_from_dict` raises MalformedMessage naming the field. Every integer is at most `MAX_SAFE_INTEGER` (transcript
heads hash the RFC 8785 encoding, which has no larger integers), every list and text is bounded, and digests are
read by `pol.canonical.is_digest` (exact, no trailing newline). Parse JSON from outside with
`pol.canonical.parse_json_strict` first: it bounds nesting, so nothing here recurses deeper than 64 levels.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pol.canonical import MAX_SAFE_INTEGER, Digest, canonical_bytes, is_digest

from .errors import MalformedMessage

__all__ = [
    "Party",
    "SOLVER",
    "CHALLENGER",
    "REFEREE",
    "PARTIES",
    "Message",
    "Open",
    "StepClaim",
    "StepAnswer",
    "GraphCommit",
    "GraphAnswer",
    "NodeClaim",
    "NodeAnswer",
    "Reveal",
    "Point",
    "StateReveal",
    "Ruling",
    "Timeout",
    "MESSAGE_KINDS",
    "message_from_dict",
    "encode_blob",
    "decode_blob",
]

Party = str  # "solver", "challenger" or "referee"
SOLVER: Party = "solver"
CHALLENGER: Party = "challenger"
REFEREE: Party = "referee"
PARTIES = (SOLVER, CHALLENGER)

_MAX_INT = MAX_SAFE_INTEGER
_MAX_LIST = 1 << 16
_MAX_TEXT = 1 << 12


def encode_blob(data: bytes) -> str:
    """Bytes inside a message: standard base64."""
    return base64.b64encode(data).decode("ascii")


def decode_blob(text: str, field: str) -> bytes:
    """Raises MalformedMessage."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedMessage(field, "not base64") from None


def _check(kind: str, field: str, value: Any) -> Any:
    """Validate one field by its declared kind; return the value in its frozen form."""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
            raise MalformedMessage(field, "expected a non-negative integer")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise MalformedMessage(field, "expected true or false")
        return value
    if kind == "digest":
        if not is_digest(value):
            raise MalformedMessage(field, "expected 64 lowercase hex characters")
        return value
    if kind == "text":
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            raise MalformedMessage(field, f"expected a string of at most {_MAX_TEXT} characters")
        return value
    if kind == "blob":
        if not isinstance(value, str):
            raise MalformedMessage(field, "expected base64 text")
        return value
    if kind == "digests":
        if not isinstance(value, (list, tuple)) or len(value) > _MAX_LIST:
            raise MalformedMessage(field, "expected a list of digests")
        return tuple(_check("digest", f"{field}[{i}]", v) for i, v in enumerate(value))
    if kind == "table":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise MalformedMessage(field, "expected a JSON object")
        try:
            canonical_bytes(dict(value))
        except (TypeError, ValueError, RecursionError) as exc:
            raise MalformedMessage(field, f"not canonical JSON: {exc}") from None
        return dict(value)
    if kind == "tables":
        if not isinstance(value, (list, tuple)) or len(value) > _MAX_LIST:
            raise MalformedMessage(field, "expected a list of JSON objects")
        return tuple(_check("table", f"{field}[{i}]", v) for i, v in enumerate(value))
    if kind == "digest_table":
        if not isinstance(value, Mapping) or len(value) > _MAX_LIST:
            raise MalformedMessage(field, "expected an object of digests")
        if not all(isinstance(k, str) and len(k) <= _MAX_TEXT for k in value):
            raise MalformedMessage(field, f"expected names of at most {_MAX_TEXT} characters")
        return {k: _check("digest", f"{field}.{k[:80]}", v) for k, v in value.items()}
    raise AssertionError(f"unknown field kind {kind}")


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message. Subclasses declare KIND, SENDER and FIELDS (name -> field kind)."""

    seq: int
    prev: Digest
    KIND: ClassVar[str] = ""
    SENDER: ClassVar[Party] = ""
    FIELDS: ClassVar[dict[str, str]] = {}

    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def sender(self) -> Party:
        return self.SENDER

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": self.KIND, "seq": self.seq, "prev": self.prev}
        for f in dataclasses.fields(self):
            if f.name not in ("seq", "prev"):
                value = getattr(self, f.name)
                body[f.name] = list(value) if isinstance(value, tuple) else value
        return body

    def encoded_size(self) -> int:
        """Bytes of the canonical encoding: what crosses the wire."""
        return len(canonical_bytes(self.to_dict()))


@dataclass(frozen=True, slots=True)
class Open(Message):
    """The challenger disputes segment `segment` of a commitment: records `segment` (agreed) and `segment + 1`."""

    spec: Mapping[str, Any]
    commitment: Digest
    merkle_root: Digest
    n_records: int
    segment: int
    start: Mapping[str, Any]
    end: Mapping[str, Any]
    start_proof: tuple[Digest, ...]
    end_proof: tuple[Digest, ...]
    KIND: ClassVar[str] = "open"
    SENDER: ClassVar[Party] = CHALLENGER
    FIELDS: ClassVar[dict[str, str]] = {
        "spec": "table", "commitment": "digest", "merkle_root": "digest", "n_records": "int", "segment": "int",
        "start": "table", "end": "table", "start_proof": "digests", "end_proof": "digests",
    }


@dataclass(frozen=True, slots=True)
class StepClaim(Message):
    """The solver states the state digest at the midpoint step."""

    step: int
    digest: Digest
    KIND: ClassVar[str] = "step_claim"
    SENDER: ClassVar[Party] = SOLVER
    FIELDS: ClassVar[dict[str, str]] = {"step": "int", "digest": "digest"}


@dataclass(frozen=True, slots=True)
class StepAnswer(Message):
    """The challenger agrees or disagrees with the claimed midpoint digest."""

    step: int
    agree: bool
    KIND: ClassVar[str] = "step_answer"
    SENDER: ClassVar[Party] = CHALLENGER
    FIELDS: ClassVar[dict[str, str]] = {"step": "int", "agree": "bool"}


@dataclass(frozen=True, slots=True)
class GraphCommit(Message):
    """The solver commits to step `step`'s graph: node count, structure root and the value commitment P_n."""

    step: int
    n_nodes: int
    structure_root: Digest
    final: Digest
    KIND: ClassVar[str] = "graph_commit"
    SENDER: ClassVar[Party] = SOLVER
    FIELDS: ClassVar[dict[str, str]] = {"step": "int", "n_nodes": "int", "structure_root": "digest", "final": "digest"}


@dataclass(frozen=True, slots=True)
class GraphAnswer(Message):
    """The challenger agrees with the graph's structure (then values are bisected) or disputes it."""

    agree: bool
    KIND: ClassVar[str] = "graph_answer"
    SENDER: ClassVar[Party] = CHALLENGER
    FIELDS: ClassVar[dict[str, str]] = {"agree": "bool"}


@dataclass(frozen=True, slots=True)
class NodeClaim(Message):
    """The solver states the prefix commitment P_length over the first `length` node values."""

    length: int
    commitment: Digest
    KIND: ClassVar[str] = "node_claim"
    SENDER: ClassVar[Party] = SOLVER
    FIELDS: ClassVar[dict[str, str]] = {"length": "int", "commitment": "digest"}


@dataclass(frozen=True, slots=True)
class NodeAnswer(Message):
    """The challenger agrees or disagrees with the claimed prefix commitment."""

    length: int
    agree: bool
    KIND: ClassVar[str] = "node_answer"
    SENDER: ClassVar[Party] = CHALLENGER
    FIELDS: ClassVar[dict[str, str]] = {"length": "int", "agree": "bool"}


@dataclass(frozen=True, slots=True)
class Reveal(Message):
    """The solver opens the disputed node: its record (with a structure proof), the peaks of the agreed prefix,
    the values of the nodes its inputs come from (with proofs against that prefix) and the input tensors."""

    node: int
    record: Mapping[str, Any]
    structure_proof: tuple[Digest, ...]
    frontier: tuple[Digest, ...]
    sources: tuple[Mapping[str, Any], ...]
    start_digests: Mapping[str, Digest]
    tensors: str  # base64 of a safetensors file: input/<slot>, leaf, output/<k>
    KIND: ClassVar[str] = "reveal"
    SENDER: ClassVar[Party] = SOLVER
    FIELDS: ClassVar[dict[str, str]] = {
        "node": "int", "record": "table", "structure_proof": "digests", "frontier": "digests", "sources": "tables",
        "start_digests": "digest_table", "tensors": "blob",
    }


@dataclass(frozen=True, slots=True)
class Point(Message):
    """After a matrix product's Reveal, the challenger names one output element it says is wrong."""

    output: int
    element: int  # flat (row-major) index into that output
    KIND: ClassVar[str] = "point"
    SENDER: ClassVar[Party] = CHALLENGER
    FIELDS: ClassVar[dict[str, str]] = {"output": "int", "element": "int"}


@dataclass(frozen=True, slots=True)
class StateReveal(Message):
    """After a structure dispute, the solver reveals the whole agreed start state so the referee can trace it."""

    tensors: str
    KIND: ClassVar[str] = "state_reveal"
    SENDER: ClassVar[Party] = SOLVER
    FIELDS: ClassVar[dict[str, str]] = {"tensors": "blob"}


@dataclass(frozen=True, slots=True)
class Ruling(Message):
    """The referee's decision and what it executed to reach it."""

    loser: Party
    reason: str
    node: int
    op: str
    executed: int
    flops: int
    KIND: ClassVar[str] = "ruling"
    SENDER: ClassVar[Party] = REFEREE
    FIELDS: ClassVar[dict[str, str]] = {"loser": "text", "reason": "text", "node": "int", "op": "text", "executed": "int", "flops": "int"}


@dataclass(frozen=True, slots=True)
class Timeout(Message):
    """`claimant` says the other party's clock has run out."""

    claimant: Party
    KIND: ClassVar[str] = "timeout"
    FIELDS: ClassVar[dict[str, str]] = {"claimant": "text"}

    @property
    def sender(self) -> Party:
        return self.claimant


MESSAGE_KINDS: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (Open, StepClaim, StepAnswer, GraphCommit, GraphAnswer, NodeClaim, NodeAnswer, Reveal, Point, StateReveal,
                Ruling, Timeout)
}


def message_from_dict(value: Any) -> Message:
    """Parse a message strictly: known kind, exactly its fields, each of the right type. Raises MalformedMessage."""
    if not isinstance(value, Mapping):
        raise MalformedMessage("message", "expected a JSON object")
    kind = value.get("kind")
    cls = MESSAGE_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedMessage("kind", f"unknown message kind {str(value.get('kind'))[:40]!r}")
    expected = {"kind", "seq", "prev", *cls.FIELDS}
    if set(value) != expected:
        missing, extra = sorted(expected - set(value)), sorted(set(value) - expected)
        raise MalformedMessage("message", f"{cls.KIND}: missing fields {missing}, unknown fields {extra}")
    fields = {name: _check(kind, name, value[name]) for name, kind in cls.FIELDS.items()}
    return cls(seq=_check("int", "seq", value["seq"]), prev=_check("digest", "prev", value["prev"]), **fields)
