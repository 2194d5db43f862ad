"""The parties of a dispute: a solver answering from its own checkpoints and recomputation, a challenger replaying
honestly, their faulty and lying variants, and training a bundle with one corrupted operator.

A party is anything with `observe(at, message)`, `next_message(state, timeout) -> Message | None` (None: it stays
silent, and its clock runs; `timeout`: wall seconds left on its clock) and `refused(reason)` (its last message was
refused and cost it time). In-process parties read the shared state; `pinpoint.party` runs one as a separate
process that rebuilds the state from the messages alone.

Parties build their bundle's model and data with the user code their `CodePolicy` allows (default pol's built-ins
only; CodeNotAllowed before anything is imported).

Misbehaviour is data (`Behaviour`): a fault in the solver's computation (a corrupted operator, as a buggy or
cheating machine would compute it), a lie about a midpoint digest, a challenger that answers falsely, and a party
that goes silent from a given phase on. The challenger's answer behaviours are `ANSWERS`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pol.bundle import Bundle
from pol.canonical import Digest, compute_hash
from pol.components import CodePolicy
from pol.digest import state_digest, tensor_digests
from pol.engine import (
    Runtime,
    StepHooks,
    build_runtime,
    capture_state,
    restore_state,
    run_steps,
)
from pol.merkle import get_proof
from pol.prove import train_and_prove
from pol.spec import JobSpec

from .capture import CaptureMode, Fault, capture_hooks, capture_step_from_state, run_captured_step, verify_fault_applied
from .errors import CaptureError
from .graph import LEAF_OP, StepGraph, compute_structure, compute_structure_leaves, get_frontier, get_prefix_proof
from .messages import (
    GraphAnswer,
    GraphCommit,
    Message,
    NodeAnswer,
    NodeClaim,
    Open,
    Point,
    Reveal,
    StateReveal,
    StepAnswer,
    StepClaim,
    decode_blob,
    encode_blob,
)
from .protocol import DisputeState, Millis
from .referee import is_pointable, is_state_leaf

__all__ = ["ANSWERS", "Behaviour", "PartyLike", "Solver", "Challenger", "train_with_fault", "HONEST"]

ANSWERS = ("honest", "disagree", "agree", "random", "dispute-structure")  # how a challenger answers (Behaviour.answers)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a party departs from the protocol. The default is honest."""

    fault: Fault | None = None  # solver: its computation corrupts this operator (and its bundle was trained so)
    lie_step: int | None = None  # solver: claims a wrong digest if asked about this step
    answers: str = "honest"  # challenger: one of ANSWERS: "honest", "disagree"/"agree" (always), "random", "dispute-structure"
    silent_from: str | None = None  # either: stops moving when the dispute reaches this phase
    seed: int = 0  # challenger: the draws of "random" answers (keyed by the message number)


HONEST = Behaviour()


class PartyLike(Protocol):
    def observe(self, at: Millis, message: Message) -> None:
        """An accepted message (any party's), at venue time `at`."""

    def next_message(self, state: DisputeState, timeout: float | None = None) -> Message | None:
        """This party's move in `state` (None: silent). `timeout`: wall seconds left on its clock (None: no limit)."""

    def refused(self, reason: str) -> None:
        """The venue refused this party's last message (the state is unchanged; its clock kept running)."""


class _Replayer:
    """States and graphs of one job, computed from a trusted starting state, with an optional fault."""

    def __init__(self, spec: JobSpec, device: str, fault: Fault | None, code: CodePolicy) -> None:
        self.spec = spec
        self.fault = fault
        self.rt: Runtime = build_runtime(spec, device=device, code=code)
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.graphs: dict[int, StepGraph] = {}
        self.steps_run = 0  # training steps computed (plain, captured or re-run to reveal): this party's work

    def seed(self, step: int, state: dict[str, torch.Tensor]) -> None:
        self.states[step] = state

    def state_at(self, step: int) -> dict[str, torch.Tensor]:
        if step not in self.states:
            start = max(s for s in self.states if s <= step)
            restore_state(self.rt, self.states[start])
            while self.rt.step < step:
                _advance(self.rt, self.fault)
                self.steps_run += 1
                self.states[self.rt.step] = capture_state(self.rt)
        return self.states[step]

    def graph(self, step: int) -> StepGraph:
        if step not in self.graphs:
            self.steps_run += 1
            self.graphs[step] = capture_step_from_state(self.spec, self.state_at(step), fault=self.fault, runtime=self.rt)
        return self.graphs[step]


def _advance(rt: Runtime, fault: Fault | None) -> None:
    """One step, through the capture (with the fault) at the faulty step, through pol.engine elsewhere."""
    if fault is not None and fault.step == rt.step:
        run_captured_step(rt, fault)
    else:
        run_steps(rt, rt.step + 1)


def _lie(digest: Digest) -> Digest:
    return compute_hash("pinpoint/lie", bytes.fromhex(digest)).hex()


class Solver:
    """Answers from its bundle's checkpoints and its own recomputation (with its fault, if it has one).
    Raises CodeNotAllowed, CodeDiffers (before importing anything) and what `pol.engine.build_runtime` raises."""

    def __init__(self, bundle: Bundle, behaviour: Behaviour = HONEST, *, device: str = "cpu",
                 code: CodePolicy = CodePolicy()) -> None:
        self.bundle = bundle
        self.behaviour = behaviour
        self.replayer = _Replayer(bundle.spec, device, behaviour.fault, code)
        self._checkpoints = {r.step for r in bundle.records}

    def observe(self, at: Millis, message: Message) -> None:
        return None

    def refused(self, reason: str) -> None:
        return None

    def _state_at(self, step: int) -> dict[str, torch.Tensor]:
        start = max(s for s in self._checkpoints if s <= step)
        if start not in self.replayer.states:
            self.replayer.seed(start, self.bundle.load_state(start))
        return self.replayer.state_at(step)

    def _digest_at(self, step: int) -> Digest:
        digest = state_digest(self._state_at(step))
        return _lie(digest) if step == self.behaviour.lie_step else digest

    def _graph(self, step: int) -> StepGraph:
        self._state_at(step)
        return self.replayer.graph(step)

    def next_message(self, state: DisputeState, timeout: float | None = None) -> Message | None:
        if state.phase == self.behaviour.silent_from:
            return None
        seq, prev = state.seq, state.head
        if state.phase == "steps":
            mid = (state.lo_step + state.hi_step) // 2
            return StepClaim(seq, prev, step=mid, digest=self._digest_at(mid))
        graph = self._graph(state.lo_step)
        if state.phase == "graph":
            return GraphCommit(seq, prev, step=state.lo_step, n_nodes=graph.n, structure_root=graph.structure_hash,
                               final=graph.prefix_commitment(graph.n))
        if state.phase == "nodes":
            mid = (state.lo_node + state.hi_node) // 2
            return NodeClaim(seq, prev, length=mid, commitment=graph.prefix_commitment(mid))
        if state.phase == "reveal":
            return _build_reveal(state, graph, self._state_at(state.lo_step), self.replayer, self.bundle.spec.numerics)
        if state.phase == "state_reveal":
            return StateReveal(seq, prev, tensors=encode_blob(save_safetensors(_contiguous(self._state_at(state.lo_step)))))
        return None


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}


def _node_tensors(replayer: _Replayer, graph: StepGraph, index: int) -> dict[str, torch.Tensor]:
    """Node `index`'s input and output tensors, recomputed by running the step once more, watching that node."""
    restore_state(replayer.rt, replayer.state_at(graph.step))
    replayer.steps_run += 1
    return dict(run_captured_step(replayer.rt, replayer.fault, watch=index).watched)


def _build_reveal(state: DisputeState, graph: StepGraph, start: dict[str, torch.Tensor], replayer: _Replayer,
                 numerics: str) -> Reveal:
    """The solver's Reveal of node `state.lo_node` of its graph."""
    i = state.lo_node
    node = graph.nodes[i]
    leaves = graph.value_leaves
    record = {**compute_structure(node), "digests": list(node.digests)}
    sources = []
    for j in sorted({ref.node for ref in node.inputs}):
        src = graph.nodes[j]
        sources.append({"node": j, "digests": list(src.digests),
                        "proof": list(get_prefix_proof(leaves, j, i).siblings)})
    tensors: dict[str, torch.Tensor] = {}
    start_digests: dict[str, Digest] = {}
    if node.op == LEAF_OP and is_state_leaf(str(node.args["name"])):
        tensors["leaf"] = start[str(node.args["name"])]
        start_digests = tensor_digests(start)
    elif node.op != LEAF_OP:
        tensors.update(_node_tensors(replayer, graph, i))
        if numerics == "exact":  # outputs are compared by digest; a matrix product's output is revealed for pointing
            keep = ("input/", "output/0") if is_pointable(node.op) else ("input/",)
            tensors = {n: t for n, t in tensors.items() if n.startswith(keep)}
    structure_proof = get_proof(compute_structure_leaves(graph.nodes), i).siblings
    return Reveal(state.seq, state.head, node=i, record=record, structure_proof=tuple(structure_proof),
                  frontier=get_frontier(leaves[:i]), sources=tuple(sources), start_digests=start_digests,
                  tensors=encode_blob(save_safetensors(_contiguous(tensors))))


class Challenger:
    """Replays the disputed segment honestly from its agreed start (or answers falsely, as `behaviour` says).
    Raises CodeNotAllowed, CodeDiffers (before importing anything) and what `pol.engine.build_runtime` raises."""

    def __init__(self, bundle: Bundle, segment: int, behaviour: Behaviour = HONEST, *, device: str = "cpu",
                 code: CodePolicy = CodePolicy()) -> None:
        self.bundle = bundle
        self.segment = segment
        self.behaviour = behaviour
        self.replayer = _Replayer(bundle.spec, device, None, code)

    def observe(self, at: Millis, message: Message) -> None:
        return None

    def refused(self, reason: str) -> None:
        return None

    def open_message(self, state: DisputeState) -> Open:
        b = self.bundle
        start, end = b.records[self.segment], b.records[self.segment + 1]
        return Open(state.seq, state.head, spec=b.spec.to_dict(), commitment=b.manifest.root,
                    merkle_root=b.manifest.merkle_root, n_records=len(b.records), segment=self.segment,
                    start=start.to_dict(), end=end.to_dict(), start_proof=b.proof(self.segment).siblings,
                    end_proof=b.proof(self.segment + 1).siblings)

    def _state_at(self, step: int) -> dict[str, torch.Tensor]:
        if not self.replayer.states:
            start = self.bundle.records[self.segment].step
            self.replayer.seed(start, self.bundle.load_state(start))
        return self.replayer.state_at(step)

    def _answer(self, honest: bool, seq: int) -> bool:
        if self.behaviour.answers == "random":
            return random.Random(f"{self.behaviour.seed}/{seq}").random() < 0.5
        return {"honest": honest, "disagree": False, "agree": True}.get(self.behaviour.answers, honest)

    def next_message(self, state: DisputeState, timeout: float | None = None) -> Message | None:
        if state.phase == self.behaviour.silent_from:
            return None
        seq, prev = state.seq, state.head
        if state.phase == "open":
            return self.open_message(state)
        if state.phase == "steps_answer":
            mid = (state.lo_step + state.hi_step) // 2
            return StepAnswer(seq, prev, step=mid, agree=self._answer(state_digest(self._state_at(mid)) == state.claim, seq))
        if state.phase in ("graph_answer", "nodes_answer"):
            self._state_at(state.lo_step)
            graph = self.replayer.graph(state.lo_step)
            if state.phase == "graph_answer":
                same = graph.structure_hash == state.structure_root and graph.n == state.n_nodes
                return GraphAnswer(seq, prev, agree=same and self.behaviour.answers != "dispute-structure")
            mid = (state.lo_node + state.hi_node) // 2
            return NodeAnswer(seq, prev, length=mid, agree=self._answer(graph.prefix_commitment(mid) == state.claim, seq))
        if state.phase == "point":
            return Point(seq, prev, output=0, element=self._first_difference(state) if self.behaviour.answers == "honest" else 0)
        return None

    def _first_difference(self, state: DisputeState) -> int:
        """The first element where the solver's revealed output differs from this challenger's own."""
        assert isinstance(state.reveal, Reveal)
        theirs = load_safetensors(decode_blob(state.reveal.tensors, "tensors"))["output/0"].reshape(-1)
        mine = _node_tensors(self.replayer, self.replayer.graph(state.lo_step), state.lo_node)["output/0"].reshape(-1)
        differs = torch.nonzero(mine.view(torch.int32) != theirs.view(torch.int32)).reshape(-1)
        return int(differs[0]) if differs.numel() else 0


def train_with_fault(spec: JobSpec, out: str | Path, fault: Fault, *, device: str = "cpu", force: bool = False,
                     code: CodePolicy | None = None) -> Path:
    """Train `spec` into a bundle at `out` whose computation corrupts operator `fault.node` at step `fault.step`.

    `pol.prove.train_and_prove` with that one step run under a faulting capture: the bundle is internally consistent
    (digests, records, Merkle root, commitment), so only replay can catch it. `code` as in train_and_prove (the
    trainer trusts the spec it chose to train).
    Raises CaptureError if the fault does not name an operator of that step, and what pol.prove raises.
    """
    if not 0 <= fault.step < spec.steps:
        raise CaptureError(f"fault step {fault.step} is outside the job's steps 0..{spec.steps - 1}")
    if Path(out).exists() and not force:
        raise CaptureError(f"output {out} exists")
    modes: list[list[CaptureMode]] = []

    def hooks(rt: Runtime, step: int) -> StepHooks | None:
        if step != fault.step:
            return None
        step_hooks, step_modes = capture_hooks(rt, fault)
        modes.append(step_modes)
        return step_hooks

    result = train_and_prove(spec, out, device=device, force=force, hooks=hooks, code=code,
                             env_note=f"FAULTY: step {fault.step} node {fault.node}")
    verify_fault_applied(modes[0][0], fault.step)
    return result.path

