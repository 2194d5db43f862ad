"""The dispute protocol as a pure state machine: `apply_message(state, message, now) -> state`.

Phases (the party to move in brackets):

    open [challenger]        Open: segment i of the commitment, records i and i+1 with Merkle proofs.
                             S_lo := record i (agreed), S_hi := record i+1 (disputed).
    steps [solver]           StepClaim(m = (lo+hi)//2, digest)
    steps_answer [challenger] StepAnswer(m, agree): agree -> lo := m, else hi := m. Until hi = lo + 1 = t + 1.
    graph [solver]           GraphCommit(t, n, structure root, P_n): the graph of step t.
    graph_answer [challenger] GraphAnswer(agree): structure agreed -> nodes; disputed -> state_reveal.
    nodes [solver]           NodeClaim(m = (lo+hi)//2, P_m) over node positions, P_0 = the base (agreed).
    nodes_answer [challenger] NodeAnswer(m, agree). Until hi = lo + 1: node i = lo has agreed inputs (P_i) and a
                             disputed value (P_i+1).
    reveal [solver]          Reveal: node i's record and input tensors, bound to the agreed prefix (checked here).
    point [challenger]       Point(element): for a matrix product only, the output element the challenger says is
                             wrong (the solver revealed its whole output); the referee then computes that element
                             alone: one K-long dot product instead of the whole product.
    state_reveal [solver]    StateReveal: the whole start state, for the referee to trace the structure.
    ruling [referee]         Ruling: computed by `pinpoint.referee.compute_ruling` (one operator), re-checked by a
                             third party. This module executes no operator: it checks bindings, digests and clocks.
    over                     the outcome is set.

Clocks: each party has `params.budget_ms`; the clock of the party to move runs from `turn_started`. A move at
`now < turn_started + remaining` is accepted and charged; at or after that deadline it is refused (ClockExpired) and
the other party may claim a Timeout, which is accepted exactly from the deadline on (earlier: PrematureTimeout).

Refused messages cost their sender. A message the state machine refuses (a line that is no message, a replayed or
skipped `seq`, the wrong `prev`, out of turn, an invalid claim, or a late message: ClockExpired) changes nothing, and
the sender's clock keeps running while it was sent and checked. After `params.max_refused` refused messages from one
party the venue stops listening to that party: it is then silent, and the other party claims the Timeout at its
deadline. So misbehaviour never aborts a dispute: it ends by a ruling or by a timeout, within the two clocks (the
venue's loop is `pinpoint.runner.run_parties`). Only accepted messages, and that Timeout, enter the transcript.

Bounds: a message's canonical encoding is at most `compute_message_limit(params)` bytes (base64 of at most
`max_reveal_bytes` of tensors, 4/3 of them, plus MESSAGE_MARGIN_BYTES for the rest); times and every integer are at
most MAX_SAFE_INTEGER (heads hash RFC 8785 JSON); the Open's record count and steps are computed from its spec
(`n_records`, `checkpoint_step`), never enumerated.

Rounds are counted as solver moves: ceil(log2 k) step claims + 1 graph commit + ceil(log2 n) node claims + 1 reveal.

Every rejected message raises a ProtocolError and leaves the (immutable) state as it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from pol.canonical import MAX_SAFE_INTEGER, Digest, canonical_bytes, compute_hash, is_digest
from pol.digest import combine_digests, state_digest, tensor_digest
from pol.errors import CommitmentError, ManifestError, SpecError
from pol.merkle import InclusionProof, compute_commitment, verify_proof
from pol.spec import JobSpec, spec_from_dict
from pol.trace import record_from_dict

from .capture import compute_uninitialized_digest, compute_value_digest
from .errors import (
    ClockExpired,
    DisputeOver,
    GraphError,
    InvalidClaim,
    InvalidParams,
    MalformedMessage,
    OutOfTurn,
    PrematureTimeout,
    ReplayedMessage,
)
from .graph import (
    EMPTY_ROOT,
    LEAF_OP,
    STATE_OP,
    Node,
    TensorMeta,
    compute_append_root,
    compute_base,
    compute_frontier_root,
    compute_prefix_commit,
    compute_structure,
    compute_value_leaf,
    is_pointable,
    is_state_leaf,
    node_from_dict,
    verify_prefix_proof,
)
from .messages import (
    CHALLENGER,
    PARTIES,
    REFEREE,
    SOLVER,
    GraphAnswer,
    GraphCommit,
    Message,
    NodeAnswer,
    NodeClaim,
    Open,
    Party,
    Point,
    Reveal,
    Ruling,
    StateReveal,
    StepAnswer,
    StepClaim,
    Timeout,
    decode_blob,
)

__all__ = [
    "Millis",
    "MESSAGE_MARGIN_BYTES",
    "MAX_REFUSED_LIMIT",
    "Params",
    "params_from_dict",
    "Outcome",
    "DisputeState",
    "new_dispute",
    "apply_message",
    "get_deadline",
    "get_other",
    "is_over",
    "verify_reveal",
    "compute_head",
    "compute_blob_limit",
    "compute_message_limit",
    "decode_tensors",
    "max_rounds",
]

Millis = int  # milliseconds on the venue's clock
MESSAGE_MARGIN_BYTES = 4 << 20  # a message's bytes besides its base64 tensors (spec, record, proofs, digests)
MAX_REFUSED_LIMIT = 1000  # the largest max_refused a venue may set


@dataclass(frozen=True, slots=True)
class Params:
    """The venue's rules for one dispute. Raises InvalidParams when a value is out of range."""

    budget_ms: Millis = 600_000  # each party's chess clock
    commitment: Digest | None = None  # the commitment the solver posted (None: any the Open proves)
    max_reveal_bytes: int = 1 << 30  # bytes of revealed tensors (a safetensors file) in one message
    max_refused: int = 3  # refused messages a party may send before the venue stops listening to it

    def __post_init__(self) -> None:
        for name, low, high in (("budget_ms", 1, MAX_SAFE_INTEGER), ("max_reveal_bytes", 0, MAX_SAFE_INTEGER // 2),
                                ("max_refused", 1, MAX_REFUSED_LIMIT)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidParams(f"params: {name} must be an integer in [{low}, {high}], got {str(value)[:40]!r}")
        if self.commitment is not None and not is_digest(self.commitment):
            raise InvalidParams("params: commitment must be 64 lowercase hex characters or None")

    def to_dict(self) -> dict[str, Any]:
        return {"budget_ms": self.budget_ms, "commitment": self.commitment, "max_reveal_bytes": self.max_reveal_bytes,
                "max_refused": self.max_refused}


def params_from_dict(value: Any) -> Params:
    """Params from their `to_dict` form (a transcript, a party's init line). Raises InvalidParams."""
    names = ("budget_ms", "commitment", "max_reveal_bytes", "max_refused")
    if not isinstance(value, Mapping) or set(value) != set(names):
        raise InvalidParams(f"params must have exactly {', '.join(names)}")
    return Params(**{name: value[name] for name in names})


def compute_blob_limit(params: Params) -> int:
    """Characters of base64 text that carry at most `params.max_reveal_bytes` bytes (4 per 3, rounded up)."""
    return 4 * -(-params.max_reveal_bytes // 3)


def compute_message_limit(params: Params) -> int:
    """The most bytes one message may take (its canonical encoding, or one line from a party process): the base64
    of the largest reveal plus MESSAGE_MARGIN_BYTES for everything else."""
    return compute_blob_limit(params) + MESSAGE_MARGIN_BYTES


@dataclass(frozen=True, slots=True)
class Outcome:
    loser: Party
    reason: str
    by: str  # "ruling" or "timeout"
    step: int | None
    node: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"loser": self.loser, "reason": self.reason, "by": self.by, "step": self.step, "node": self.node}


@dataclass(frozen=True, slots=True)
class DisputeState:
    params: Params
    seq: int
    head: Digest
    phase: str
    turn: Party
    turn_started: Millis
    remaining: tuple[Millis, Millis]  # (solver, challenger)
    spec: JobSpec | None = None
    segment: int = -1
    lo_step: int = 0
    hi_step: int = 0
    lo_digest: Digest = ""
    hi_digest: Digest = ""
    claim: Digest = ""  # the pending step digest or prefix commitment
    n_nodes: int = 0
    structure_root: Digest = ""
    lo_node: int = 0
    hi_node: int = 0
    lo_commit: Digest = ""
    hi_commit: Digest = ""
    reveal: Message | None = None
    point: int = -1  # the output element the challenger pointed at (matrix products), -1 for none
    outcome: Outcome | None = None
    rounds: int = 0
    bytes: int = 0
    messages: int = 0

    @property
    def base(self) -> Digest:
        assert self.spec is not None
        return compute_base(self.spec.job_id, self.lo_step, self.lo_digest)


def get_other(party: Party) -> Party:
    return CHALLENGER if party == SOLVER else SOLVER


def is_over(state: DisputeState) -> bool:
    return state.outcome is not None


def max_rounds(k: int, n: int) -> int:
    """The bound on rounds for k steps per segment and n graph nodes: ceil(log2 k) + ceil(log2 n) + 2."""
    return math.ceil(math.log2(max(k, 1))) + math.ceil(math.log2(max(n, 1))) + 2


def compute_head(head: Digest, at: Millis, message: Message) -> Digest:
    """The transcript head after `message` arrives at `at`."""
    return compute_hash("pinpoint/entry/v1", bytes.fromhex(head), at.to_bytes(8, "little"), canonical_bytes(message.to_dict())).hex()


def _verify_time(now: Any) -> None:
    if isinstance(now, bool) or not isinstance(now, int) or not 0 <= now <= MAX_SAFE_INTEGER:
        raise MalformedMessage("at", f"a time must be an integer in [0, 2**53 - 1] ms, got {str(now)[:40]!r}")


def new_dispute(params: Params, now: Millis) -> DisputeState:
    """A dispute waiting for the challenger's Open; both clocks full, the challenger's running from `now`.
    Raises MalformedMessage if `now` is not a time in [0, 2**53 - 1]."""
    _verify_time(now)
    head = compute_hash("pinpoint/transcript/v1", canonical_bytes(params.to_dict()), now.to_bytes(8, "little")).hex()
    return DisputeState(params, 0, head, "open", CHALLENGER, now, (params.budget_ms, params.budget_ms))


def get_deadline(state: DisputeState) -> Millis:
    """When the clock of the party to move runs out. Raises OutOfTurn when the referee is to move."""
    if state.turn not in PARTIES:
        raise OutOfTurn("clock", state.turn)
    return state.turn_started + state.remaining[PARTIES.index(state.turn)]


_PHASE_KINDS = {
    "open": Open, "steps": StepClaim, "steps_answer": StepAnswer, "graph": GraphCommit, "graph_answer": GraphAnswer,
    "nodes": NodeClaim, "nodes_answer": NodeAnswer, "reveal": Reveal, "point": Point, "state_reveal": StateReveal,
    "ruling": Ruling,
}


def apply_message(state: DisputeState, message: Message, now: Millis) -> DisputeState:
    """The state after `message` arrives at `now`. Pure: the input state is never changed.

    Raises DisputeOver, ReplayedMessage, OutOfTurn, MalformedMessage, ClockExpired, PrematureTimeout, InvalidClaim.
    """
    _verify_time(now)
    if state.outcome is not None:
        raise DisputeOver(f"the dispute is over: {state.outcome.loser} lost ({state.outcome.reason})")
    if message.seq != state.seq:
        raise ReplayedMessage(message.seq, state.seq)
    size = _verify_size(state, message)
    if isinstance(message, Timeout):
        return _apply_timeout(state, message, now, size)
    if message.sender != state.turn:
        raise OutOfTurn(message.sender, state.turn)
    if message.prev != state.head:
        raise MalformedMessage("prev", "does not name the current transcript head")
    if now < state.turn_started:
        raise MalformedMessage("at", f"time {now} is before the turn began ({state.turn_started})")
    remaining = state.remaining
    if state.turn in PARTIES:
        deadline = get_deadline(state)
        if now >= deadline:
            raise ClockExpired(state.turn, deadline, now)
        i = PARTIES.index(state.turn)
        remaining = tuple(r - (now - state.turn_started) if j == i else r for j, r in enumerate(state.remaining))  # type: ignore[assignment]
    expected = _PHASE_KINDS[state.phase]
    if not isinstance(message, expected):
        raise MalformedMessage("kind", f"phase {state.phase} expects {expected.KIND}, got {message.KIND}")
    changed = _PROCESS[expected](state, message)
    rounds = state.rounds + (1 if message.sender == SOLVER else 0)
    return dataclasses.replace(
        changed, seq=state.seq + 1, head=compute_head(state.head, now, message), turn_started=now, remaining=remaining,
        rounds=rounds, bytes=state.bytes + size, messages=state.messages + 1,
    )


def _verify_size(state: DisputeState, message: Message) -> int:
    """The message's encoded size, if within the venue's limit (tensors first, before encoding). Raises
    MalformedMessage."""
    blob = getattr(message, "tensors", None)
    if isinstance(blob, str) and len(blob) > compute_blob_limit(state.params):
        raise MalformedMessage("tensors", f"more than {state.params.max_reveal_bytes} bytes of tensors")
    try:
        size = message.encoded_size()
    except (TypeError, ValueError, RecursionError) as exc:
        raise MalformedMessage("message", f"has no canonical encoding: {str(exc)[:200]}") from None
    limit = compute_message_limit(state.params)
    if size > limit:
        raise MalformedMessage("message", f"{size} bytes, more than the venue's limit of {limit}")
    return size


def _apply_timeout(state: DisputeState, message: Timeout, now: Millis, size: int) -> DisputeState:
    if message.claimant not in PARTIES:
        raise MalformedMessage("claimant", f"expected one of {PARTIES}")
    if state.turn not in PARTIES or message.claimant == state.turn:
        raise OutOfTurn(message.claimant, f"{get_other(message.claimant)} (to be timed out)")
    if message.prev != state.head:
        raise MalformedMessage("prev", "does not name the current transcript head")
    deadline = get_deadline(state)
    if now < deadline:
        raise PrematureTimeout(state.turn, deadline, now)
    node = state.lo_node if state.phase in ("reveal", "point", "state_reveal") else None
    outcome = Outcome(state.turn, f"{state.turn} did not move before its clock ran out at {deadline} ms", "timeout",
                      state.lo_step if state.spec is not None else None, node)
    remaining = tuple(0 if p == state.turn else r for p, r in zip(PARTIES, state.remaining, strict=True))
    return dataclasses.replace(
        state, seq=state.seq + 1, head=compute_head(state.head, now, message), phase="over", turn="", outcome=outcome,
        remaining=remaining, bytes=state.bytes + size, messages=state.messages + 1, turn_started=now,
    )


# --- phase handlers (message already checked for turn, sequence, clock and kind) --------------------------------


def _process_open(state: DisputeState, m: Open) -> DisputeState:
    try:
        spec = spec_from_dict(m.spec, require_resolved=True)
    except SpecError as exc:
        raise MalformedMessage("spec", str(exc)) from None
    try:
        start, end = record_from_dict(m.start, "start"), record_from_dict(m.end, "end")
    except ManifestError as exc:
        raise MalformedMessage("start/end", str(exc)) from None
    if state.params.commitment is not None and m.commitment != state.params.commitment:
        raise InvalidClaim("the Open names a commitment other than the one the solver posted")
    if m.n_records != spec.n_records or not 0 <= m.segment < spec.n_records - 1:
        raise MalformedMessage("segment", f"segment {m.segment} of {m.n_records} records is not one of the job's "
                                          f"{spec.n_records - 1} segments")
    if compute_commitment(spec.job_id, bytes.fromhex(m.merkle_root), m.n_records) != m.commitment:
        raise InvalidClaim("the Merkle root, job and record count do not give the commitment")
    if (start.step, end.step) != (spec.checkpoint_step(m.segment), spec.checkpoint_step(m.segment + 1)):
        raise InvalidClaim(f"records at steps {start.step}, {end.step} are not the ends of segment {m.segment}")
    try:
        verify_proof(bytes.fromhex(m.merkle_root), start.leaf(spec.job_id), InclusionProof(m.segment, m.n_records, m.start_proof), m.n_records)
        verify_proof(bytes.fromhex(m.merkle_root), end.leaf(spec.job_id), InclusionProof(m.segment + 1, m.n_records, m.end_proof), m.n_records)
    except CommitmentError as exc:
        raise InvalidClaim(f"record not in the commitment: {exc}") from None
    changed = dataclasses.replace(state, spec=spec, segment=m.segment, lo_step=start.step, hi_step=end.step,
                                  lo_digest=start.state, hi_digest=end.state, turn=SOLVER)
    return dataclasses.replace(changed, phase="graph" if end.step - start.step == 1 else "steps")


def _process_step_claim(state: DisputeState, m: StepClaim) -> DisputeState:
    mid = (state.lo_step + state.hi_step) // 2
    if m.step != mid:
        raise InvalidClaim(f"the next claim is for step {mid}, not {m.step}")
    return dataclasses.replace(state, claim=m.digest, phase="steps_answer", turn=CHALLENGER)


def _process_step_answer(state: DisputeState, m: StepAnswer) -> DisputeState:
    mid = (state.lo_step + state.hi_step) // 2
    if m.step != mid:
        raise InvalidClaim(f"the open claim is for step {mid}, not {m.step}")
    if m.agree:
        changed = dataclasses.replace(state, lo_step=mid, lo_digest=state.claim)
    else:
        changed = dataclasses.replace(state, hi_step=mid, hi_digest=state.claim)
    phase = "graph" if changed.hi_step - changed.lo_step == 1 else "steps"
    return dataclasses.replace(changed, claim="", phase=phase, turn=SOLVER)


def _process_graph_commit(state: DisputeState, m: GraphCommit) -> DisputeState:
    if m.step != state.lo_step:
        raise InvalidClaim(f"the disputed step is {state.lo_step}, not {m.step}")
    if m.n_nodes < 1:
        raise MalformedMessage("n_nodes", "a step has at least its state node")
    return dataclasses.replace(state, n_nodes=m.n_nodes, structure_root=m.structure_root, hi_commit=m.final,
                               phase="graph_answer", turn=CHALLENGER)


def _process_graph_answer(state: DisputeState, m: GraphAnswer) -> DisputeState:
    if not m.agree:
        return dataclasses.replace(state, phase="state_reveal", turn=SOLVER)
    lo_commit = compute_prefix_commit(state.base, EMPTY_ROOT, 0)
    phase = "reveal" if state.n_nodes == 1 else "nodes"
    return dataclasses.replace(state, lo_node=0, hi_node=state.n_nodes, lo_commit=lo_commit, phase=phase, turn=SOLVER)


def _process_node_claim(state: DisputeState, m: NodeClaim) -> DisputeState:
    mid = (state.lo_node + state.hi_node) // 2
    if m.length != mid:
        raise InvalidClaim(f"the next claim is for the prefix of {mid} nodes, not {m.length}")
    return dataclasses.replace(state, claim=m.commitment, phase="nodes_answer", turn=CHALLENGER)


def _process_node_answer(state: DisputeState, m: NodeAnswer) -> DisputeState:
    mid = (state.lo_node + state.hi_node) // 2
    if m.length != mid:
        raise InvalidClaim(f"the open claim is for the prefix of {mid} nodes, not {m.length}")
    if m.agree:
        changed = dataclasses.replace(state, lo_node=mid, lo_commit=state.claim)
    else:
        changed = dataclasses.replace(state, hi_node=mid, hi_commit=state.claim)
    phase = "reveal" if changed.hi_node - changed.lo_node == 1 else "nodes"
    return dataclasses.replace(changed, claim="", phase=phase, turn=SOLVER)


def _process_reveal(state: DisputeState, m: Reveal) -> DisputeState:
    node, _ = verify_reveal(state, m)
    if is_pointable(node.op):
        return dataclasses.replace(state, reveal=m, phase="point", turn=CHALLENGER)
    return dataclasses.replace(state, reveal=m, phase="ruling", turn=REFEREE)


def _process_point(state: DisputeState, m: Point) -> DisputeState:
    assert isinstance(state.reveal, Reveal)
    node = node_from_dict(state.reveal.record, state.lo_node)
    if m.output != 0:
        raise MalformedMessage("output", "only output 0 of a matrix product can be pointed at")
    size = math.prod(node.outputs[0].shape)
    if not 0 <= m.element < size:
        raise MalformedMessage("element", f"{m.element} is outside the output's {size} elements")
    return dataclasses.replace(state, point=m.element, phase="ruling", turn=REFEREE)


def _process_state_reveal(state: DisputeState, m: StateReveal) -> DisputeState:
    tensors = decode_tensors(state, m.tensors)
    if state_digest(tensors) != state.lo_digest:
        raise InvalidClaim("the revealed start state does not hash to the agreed S_t")
    return dataclasses.replace(state, reveal=m, phase="ruling", turn=REFEREE)


def _process_ruling(state: DisputeState, m: Ruling) -> DisputeState:
    if m.loser not in PARTIES:
        raise MalformedMessage("loser", f"expected one of {PARTIES}")
    outcome = Outcome(m.loser, m.reason, "ruling", state.lo_step, m.node)
    return dataclasses.replace(state, outcome=outcome, phase="over", turn="")


_PROCESS: dict[type[Message], Any] = {
    Open: _process_open, StepClaim: _process_step_claim, StepAnswer: _process_step_answer,
    GraphCommit: _process_graph_commit, GraphAnswer: _process_graph_answer, NodeClaim: _process_node_claim,
    NodeAnswer: _process_node_answer, Reveal: _process_reveal, Point: _process_point, StateReveal: _process_state_reveal,
    Ruling: _process_ruling,
}


# --- the reveal: binding a node and its inputs to what is agreed ----------------------------------------------


def decode_tensors(state: DisputeState, blob: str) -> dict[str, torch.Tensor]:
    """Decode revealed tensors (safetensors, never pickle), refusing more than `max_reveal_bytes` before decoding.
    Raises MalformedMessage."""
    if len(blob) > compute_blob_limit(state.params):
        raise MalformedMessage("tensors", f"larger than {state.params.max_reveal_bytes} bytes")
    data = decode_blob(blob, "tensors")
    if len(data) > state.params.max_reveal_bytes:
        raise MalformedMessage("tensors", f"larger than {state.params.max_reveal_bytes} bytes")
    try:
        return dict(load_safetensors(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise MalformedMessage("tensors", f"not a safetensors file: {exc}") from None


def _proof(index: int, n: int, siblings: Any, field: str) -> InclusionProof:
    if not isinstance(siblings, (list, tuple)) or not all(isinstance(s, str) for s in siblings):
        raise MalformedMessage(field, "expected a list of hex digests")
    return InclusionProof(index, n, tuple(siblings))


def _bound_digests(state: DisputeState, m: Reveal, node: Node, prefix_root: Digest) -> list[Digest]:
    """The agreed digest of each input slot, read from the source nodes' values proven against the prefix."""
    values: dict[int, list[Digest]] = {}
    for k, source in enumerate(m.sources):
        try:
            j, digests = int(source["node"]), list(source["digests"])
            proof = _proof(j, node.index, source["proof"], f"sources[{k}].proof")
            leaf = canonical_bytes({"index": j, "digests": digests})
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"sources[{k}]", f"expected node, digests, proof: {exc!r}") from None
        verify_prefix_proof(prefix_root, leaf, proof, node.index)
        values[j] = digests
    bound = []
    for slot, ref in enumerate(node.inputs):
        if ref.node not in values or not 0 <= ref.output < len(values[ref.node]):
            raise InvalidClaim(f"input {slot} of node {node.index} (from node {ref.node}) has no proven source value")
        bound.append(values[ref.node][ref.output])
    return bound


def verify_reveal(state: DisputeState, m: Reveal) -> tuple[Node, dict[str, torch.Tensor]]:
    """Check a Reveal against the agreed structure root, prefix and start state; return the node and tensors.

    Raises MalformedMessage, InvalidClaim.
    """
    assert state.spec is not None
    i = state.lo_node
    if m.node != i:
        raise InvalidClaim(f"the disputed node is {i}, not {m.node}")
    try:
        node = node_from_dict(m.record, i)
    except GraphError as exc:
        raise MalformedMessage("record", str(exc)) from None
    try:
        verify_proof(bytes.fromhex(state.structure_root), canonical_bytes(compute_structure(node)),
                     _proof(i, state.n_nodes, m.structure_proof, "structure_proof"), state.n_nodes)
    except CommitmentError as exc:
        raise InvalidClaim(f"node {i}'s structure is not the agreed structure: {exc}") from None
    prefix_root = compute_frontier_root(m.frontier)
    if compute_prefix_commit(state.base, prefix_root, i) != state.lo_commit:
        raise InvalidClaim(f"the frontier does not give the agreed prefix commitment P_{i}")
    if compute_prefix_commit(state.base, compute_append_root(m.frontier, compute_value_leaf(node)), i + 1) != state.hi_commit:
        raise InvalidClaim(f"node {i}'s revealed value is not the one the solver committed to in P_{i + 1}")
    bound = _bound_digests(state, m, node, prefix_root)
    tensors = decode_tensors(state, m.tensors)
    allowed = {f"input/{s}" for s in range(len(node.inputs))} | {f"output/{k}" for k in range(len(node.outputs))} | {"leaf"}
    if set(tensors) - allowed:
        raise MalformedMessage("tensors", f"unexpected tensors {sorted(set(tensors) - allowed)[:5]}")
    for slot, digest in enumerate(bound):
        t = tensors.get(f"input/{slot}")
        if t is None:
            raise InvalidClaim(f"input {slot} of node {i} was not revealed")
        meta = TensorMeta("tensor", str(t.dtype).removeprefix("torch."), tuple(t.shape))
        if compute_value_digest(t) != digest and compute_uninitialized_digest(meta) != digest:
            raise InvalidClaim(f"revealed input {slot} of node {i} does not match its agreed digest")
    for k, digest in enumerate(node.digests):
        t = tensors.get(f"output/{k}")
        if t is not None and compute_value_digest(t) != digest:
            raise InvalidClaim(f"revealed output {k} of node {i} does not match the claimed digest")
    if node.op == LEAF_OP and is_state_leaf(str(node.args.get("name", ""))):
        _verify_state_leaf(state, m.start_digests, str(node.args["name"]), tensors.get("leaf"))
    if node.op == STATE_OP and node.index != state.n_nodes - 1:
        raise InvalidClaim("the state node must be the last node")
    if is_pointable(node.op) and "output/0" not in tensors:
        raise InvalidClaim(f"node {i} is a matrix product: its claimed output must be revealed for pointing")
    return node, tensors


def _verify_state_leaf(state: DisputeState, start: Mapping[str, Digest], name: str, leaf: torch.Tensor | None) -> None:
    if combine_digests(start) != state.lo_digest:
        raise InvalidClaim("the revealed per-tensor digests do not combine to the agreed S_t")
    if leaf is None or name not in start or tensor_digest(name, leaf) != start[name]:
        raise InvalidClaim(f"the revealed leaf {name!r} is not that tensor of the agreed S_t")
