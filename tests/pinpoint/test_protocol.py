"""The state machine, one test per rejection rule: every refused message raises a typed error and changes nothing.

Clock arithmetic is checked at the last millisecond before expiry and at expiry, for moves and for timeout claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from pinpoint.errors import (
    ClockExpired,
    DisputeOver,
    InvalidClaim,
    MalformedMessage,
    OutOfTurn,
    PrematureTimeout,
    ProtocolError,
    ReplayedMessage,
)
from pinpoint.messages import (
    CHALLENGER,
    SOLVER,
    GraphCommit,
    Message,
    NodeClaim,
    Open,
    Reveal,
    Ruling,
    StepAnswer,
    StepClaim,
    Timeout,
    encode_blob,
    message_from_dict,
)
from pinpoint.parties import Behaviour, Challenger, Solver
from pinpoint.protocol import DisputeState, Params, apply_message, new_dispute
from pinpoint.referee import compute_ruling
from pol.bundle import open_bundle

from .conftest import FaultCase

BUDGET = 1_000


def refused(state: DisputeState, message: Message, now: int, error: type[ProtocolError]) -> None:
    """Apply a message that must be refused, and check the state is exactly as it was."""
    before = dataclasses.replace(state)
    with pytest.raises(error):
        apply_message(state, message, now)
    assert state == before


def drive(solver: Solver, challenger: Challenger, state: DisputeState, until: Callable[[DisputeState], bool],
          step_ms: int = 1) -> DisputeState:
    now = state.turn_started
    while not until(state):
        party = solver if state.turn == SOLVER else challenger
        message = party.next_message(state)
        assert message is not None
        now += step_ms
        state = apply_message(state, message, now)
    return state


@pytest.fixture
def mlp(honest_bundles: dict[str, Path]):  # type: ignore[no-untyped-def]
    with open_bundle(honest_bundles["mlp"]) as b:
        yield b


def test_open_clock_last_instant_and_expiry(mlp) -> None:  # type: ignore[no-untyped-def]
    state = new_dispute(Params(budget_ms=BUDGET), 100)
    opening = Challenger(mlp, 1).open_message(state)
    refused(state, opening, 100 + BUDGET, ClockExpired)
    after = apply_message(state, opening, 100 + BUDGET - 1)
    assert after.remaining == (BUDGET, 1) and after.turn == SOLVER and after.turn_started == 100 + BUDGET - 1
    claim = Timeout(0, state.head, claimant=SOLVER)
    refused(state, claim, 100 + BUDGET - 1, PrematureTimeout)
    over = apply_message(state, claim, 100 + BUDGET)
    assert over.outcome is not None and over.outcome.loser == CHALLENGER and over.outcome.by == "timeout"
    refused(over, Timeout(1, over.head, claimant=SOLVER), 10**6, DisputeOver)


def test_solver_clock_is_charged_exactly(mlp) -> None:  # type: ignore[no-untyped-def]
    state = apply_message(new_dispute(Params(budget_ms=BUDGET), 0), Challenger(mlp, 1).open_message(new_dispute(Params(budget_ms=BUDGET), 0)), 10)
    claim = Solver(mlp).next_message(state)
    assert isinstance(claim, StepClaim)
    refused(state, claim, 10 + BUDGET, ClockExpired)
    moved = apply_message(state, claim, 10 + 400)
    assert moved.remaining == (BUDGET - 400, BUDGET - 10)
    timeout = Timeout(moved.seq, moved.head, claimant=SOLVER)
    refused(moved, timeout, 410 + BUDGET - 10 - 1, PrematureTimeout)
    assert apply_message(moved, timeout, 410 + BUDGET - 10).outcome.loser == CHALLENGER  # type: ignore[union-attr]


def test_out_of_turn_replayed_and_misaddressed(mlp) -> None:  # type: ignore[no-untyped-def]
    state = new_dispute(Params(), 0)
    refused(state, StepClaim(0, state.head, step=2, digest="0" * 64), 1, OutOfTurn)
    opening = Challenger(mlp, 1).open_message(state)
    refused(state, dataclasses.replace(opening, prev="1" * 64), 1, MalformedMessage)
    refused(state, StepAnswer(0, state.head, step=2, agree=True), 1, MalformedMessage)  # right party, wrong kind
    refused(state, Timeout(0, state.head, claimant=CHALLENGER), 10**9, OutOfTurn)  # the mover cannot time itself out
    refused(state, Timeout(0, state.head, claimant="referee"), 10**9, MalformedMessage)
    refused(state, dataclasses.replace(opening, seq=5), 1, ReplayedMessage)
    after = apply_message(state, opening, 5)
    refused(after, opening, 6, ReplayedMessage)
    claim = Solver(mlp).next_message(after)
    assert claim is not None
    refused(after, claim, 4, MalformedMessage)  # time runs backwards
    refused(after, dataclasses.replace(claim, step=3), 6, InvalidClaim)  # not the midpoint


@pytest.mark.parametrize("field, value, error", [
    ("start_proof", ["ab" * 32], InvalidClaim),
    ("segment", 7, MalformedMessage),
    ("merkle_root", "cd" * 32, InvalidClaim),
    ("end", {"step": 8, "state": "00" * 32, "data": "00" * 32, "loss": 1.0, "update": 1.0}, InvalidClaim),
    ("spec", {"model": "mlp"}, MalformedMessage),
    ("start", {"step": 4}, MalformedMessage),
])
def test_bad_openings_are_refused(mlp, field: str, value: object, error: type[ProtocolError]) -> None:  # type: ignore[no-untyped-def]
    state = new_dispute(Params(), 0)
    opening = Challenger(mlp, 1).open_message(state)
    refused(state, dataclasses.replace(opening, **{field: value}), 1, error)


def test_opening_must_name_the_posted_commitment(mlp) -> None:  # type: ignore[no-untyped-def]
    state = new_dispute(Params(commitment="ef" * 32), 0)
    refused(state, Challenger(mlp, 1).open_message(state), 1, InvalidClaim)


@pytest.mark.parametrize("value, field", [
    ("not an object", "message"),
    ({"kind": "nope", "seq": 0, "prev": "0" * 64}, "kind"),
    ({"kind": "step_claim", "seq": 0, "prev": "0" * 64, "step": 1}, "message"),
    ({"kind": "step_claim", "seq": 0, "prev": "0" * 64, "step": 1, "digest": "0" * 64, "extra": 1}, "message"),
    ({"kind": "step_claim", "seq": -1, "prev": "0" * 64, "step": 1, "digest": "0" * 64}, "seq"),
    ({"kind": "step_claim", "seq": 0, "prev": "0" * 64, "step": True, "digest": "0" * 64}, "step"),
    ({"kind": "step_claim", "seq": 0, "prev": "0" * 64, "step": 1, "digest": "XYZ"}, "digest"),
    ({"kind": "step_answer", "seq": 0, "prev": "0" * 64, "step": 1, "agree": "yes"}, "agree"),
    ({"kind": "open", "seq": 0, "prev": "0" * 64, "spec": [], "commitment": "0" * 64, "merkle_root": "0" * 64,
      "n_records": 1, "segment": 0, "start": {}, "end": {}, "start_proof": [], "end_proof": []}, "spec"),
    ({"kind": "open", "seq": 0, "prev": "0" * 64, "spec": {}, "commitment": "0" * 64, "merkle_root": "0" * 64,
      "n_records": 1, "segment": 0, "start": {}, "end": {}, "start_proof": "x", "end_proof": []}, "start_proof"),
    ({"kind": "reveal", "seq": 0, "prev": "0" * 64, "node": 0, "record": {}, "structure_proof": [], "frontier": [],
      "sources": [1], "start_digests": {}, "tensors": ""}, "sources[0]"),
    ({"kind": "reveal", "seq": 0, "prev": "0" * 64, "node": 0, "record": {}, "structure_proof": [], "frontier": [],
      "sources": [], "start_digests": [], "tensors": ""}, "start_digests"),
    ({"kind": "state_reveal", "seq": 0, "prev": "0" * 64, "tensors": 5}, "tensors"),
    ({"kind": "ruling", "seq": 0, "prev": "0" * 64, "loser": "x" * 5000, "reason": "", "node": 0, "op": "", "executed": 0,
      "flops": 0}, "loser"),
    ({"kind": "graph_answer", "seq": 0, "prev": "0" * 64, "agree": True, "x": {1: 2}}, "message"),
    ({"kind": ["step_claim"], "seq": 0}, "kind"),
    ({"kind": "reveal", "seq": 0, "prev": "0" * 64, "node": 0, "record": {}, "structure_proof": [], "frontier": [],
      "sources": [], "start_digests": {"k" * 5000: "0" * 64}, "tensors": ""}, "start_digests"),
    ({"kind": "step_claim", "seq": 0, "prev": "0" * 64 + "\n", "step": 1, "digest": "0" * 64}, "prev"),
])
def test_malformed_messages_name_the_field(value: object, field: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        message_from_dict(value)
    assert info.value.field == field


def test_messages_round_trip(mlp) -> None:  # type: ignore[no-untyped-def]
    state = new_dispute(Params(), 0)
    opening = Challenger(mlp, 2).open_message(state)
    assert message_from_dict(opening.to_dict()) == opening
    t = Timeout(3, "0" * 64, claimant=SOLVER)
    assert message_from_dict(t.to_dict()) == t and t.sender == SOLVER


def test_graph_and_node_phases_refuse_wrong_positions(mlp) -> None:  # type: ignore[no-untyped-def]
    solver, challenger = Solver(mlp), Challenger(mlp, 0)
    state = drive(solver, challenger, new_dispute(Params(), 0), lambda s: s.phase == "graph")
    commit = solver.next_message(state)
    assert isinstance(commit, GraphCommit)
    refused(state, dataclasses.replace(commit, step=commit.step + 1), 10**4, InvalidClaim)
    refused(state, dataclasses.replace(commit, n_nodes=0), 10**4, MalformedMessage)
    state = drive(solver, challenger, state, lambda s: s.phase == "nodes")
    claim = solver.next_message(state)
    assert isinstance(claim, NodeClaim)
    refused(state, dataclasses.replace(claim, length=claim.length + 1), 10**4, InvalidClaim)
    answer_state = apply_message(state, claim, 10**4)
    answer = challenger.next_message(answer_state)
    refused(answer_state, dataclasses.replace(answer, length=0), 10**4 + 1, InvalidClaim)  # type: ignore[arg-type]
    with pytest.raises(OutOfTurn):
        compute_ruling(answer_state)


def test_reveals_must_bind_to_what_is_agreed(fault_cases: dict[tuple[str, int], FaultCase]) -> None:
    case = fault_cases[("mlp", 0)]
    with open_bundle(case.path) as b:
        solver, challenger = Solver(b, Behaviour(fault=case.fault)), Challenger(b, case.segment)
        state = drive(solver, challenger, new_dispute(Params(), 0), lambda s: s.phase == "reveal")
        reveal = solver.next_message(state)
        assert isinstance(reveal, Reveal) and reveal.node == case.fault.node
        now = 10**5
        refused(state, dataclasses.replace(reveal, node=reveal.node + 1), now, InvalidClaim)
        refused(state, dataclasses.replace(reveal, record={**reveal.record, "op": "aten.add.Tensor"}), now, InvalidClaim)
        refused(state, dataclasses.replace(reveal, record={**reveal.record, "digests": ["0" * 64]}), now, InvalidClaim)
        refused(state, dataclasses.replace(reveal, record={"index": reveal.node}), now, MalformedMessage)
        refused(state, dataclasses.replace(reveal, frontier=reveal.frontier[1:]), now, InvalidClaim)
        bad_sources = tuple({**s, "digests": ["1" * 64] * len(s["digests"])} for s in reveal.sources)
        refused(state, dataclasses.replace(reveal, sources=bad_sources), now, InvalidClaim)
        refused(state, dataclasses.replace(reveal, sources=()), now, InvalidClaim)
        refused(state, dataclasses.replace(reveal, sources=({"node": 0},)), now, MalformedMessage)
        refused(state, dataclasses.replace(reveal, tensors="!!"), now, MalformedMessage)
        refused(state, dataclasses.replace(reveal, tensors=encode_blob(b"junk")), now, MalformedMessage)
        refused(state, dataclasses.replace(reveal, tensors=_retensor(reveal, lambda t: {**t, "input/0": t["input/0"] + 1})), now, InvalidClaim)
        refused(state, dataclasses.replace(reveal, tensors=_retensor(reveal, lambda t: {k: v for k, v in t.items() if k != "input/0"})), now, InvalidClaim)
        refused(state, dataclasses.replace(reveal, tensors=_retensor(reveal, lambda t: {**t, "extra": t["input/0"].clone()})), now, MalformedMessage)
        refused(state, dataclasses.replace(reveal, tensors=_retensor(reveal, lambda t: {**t, "output/0": t["output/0"] * 3})), now, InvalidClaim)
        small = dataclasses.replace(state, params=dataclasses.replace(state.params, max_reveal_bytes=10))
        refused(small, reveal, now, MalformedMessage)
        ruled = apply_message(state, reveal, now)
        ruling, verdict = compute_ruling(ruled)
        assert ruling.loser == SOLVER and verdict.executed == 1
        refused(ruled, dataclasses.replace(ruling, loser="nobody"), now, MalformedMessage)
        refused(ruled, Timeout(ruled.seq, ruled.head, claimant=SOLVER), 10**9, OutOfTurn)  # the referee has no clock
        done = apply_message(ruled, ruling, now)
        assert done.outcome is not None and done.outcome.node == case.fault.node
        refused(done, ruling, now, DisputeOver)


def test_pointing_at_one_element_of_a_product(honest_bundles: dict[str, Path], tmp_path: Path) -> None:
    from pinpoint.capture import Fault, capture_step
    from pinpoint.messages import Point
    from pinpoint.parties import train_with_fault

    with open_bundle(honest_bundles["mlp"]) as hb:
        graph = capture_step(hb, 1)
        spec = hb.spec
    node = next(n.index for n in graph.nodes if n.op == "aten.addmm.default")
    fault = Fault(1, node, 5)
    with open_bundle(train_with_fault(spec, tmp_path / "b", fault)) as b:
        solver, challenger = Solver(b, Behaviour(fault=fault)), Challenger(b, 0)
        state = drive(solver, challenger, new_dispute(Params(), 0), lambda s: s.phase == "point")
        assert state.lo_node == node
        point = challenger.next_message(state)
        assert isinstance(point, Point) and point.element == 5, "the honest challenger points at the corrupted element"
        size = 16 * 32
        refused(state, dataclasses.replace(point, element=size), 10**5, MalformedMessage)
        refused(state, dataclasses.replace(point, output=1), 10**5, MalformedMessage)
        wrong = apply_message(state, dataclasses.replace(point, element=6), 10**5)
        ruling, verdict = compute_ruling(wrong)
        assert ruling.loser == CHALLENGER and verdict.executed == 1 and verdict.flops == 2 * 32 + 1
        right = apply_message(state, point, 10**5)
        assert compute_ruling(right)[0].loser == SOLVER
        no_output = _retensor(state.reveal, lambda t: {k: v for k, v in t.items() if k != "output/0"})  # type: ignore[arg-type]
        before = dataclasses.replace(state, phase="reveal", turn=SOLVER, reveal=None)
        stripped = dataclasses.replace(state.reveal, seq=state.seq, prev=state.head, tensors=no_output)  # type: ignore[type-var]
        refused(before, stripped, 10**5, InvalidClaim)


def _retensor(reveal: Reveal, change):  # type: ignore[no-untyped-def]
    from safetensors.torch import load, save

    from pinpoint.messages import decode_blob

    tensors = dict(load(decode_blob(reveal.tensors, "tensors")))
    return encode_blob(save({k: v.contiguous() for k, v in change(tensors).items()}))


def test_ruling_message_is_checked_against_referee_recompute() -> None:
    assert Ruling(0, "0" * 64, loser=SOLVER, reason="", node=0, op="", executed=0, flops=0).sender == "referee"
    assert Open.SENDER == CHALLENGER


@pytest.mark.parametrize("fields", [{"budget_ms": 0}, {"budget_ms": 2**53}, {"max_reveal_bytes": -1}, {"max_refused": 0},
                                    {"max_refused": 10**6}, {"commitment": "x"}, {"budget_ms": True}])
def test_params_are_bounded(fields: dict[str, object]) -> None:
    from pinpoint.errors import InvalidParams
    from pinpoint.protocol import params_from_dict

    with pytest.raises(InvalidParams) as info:
        Params(**fields)  # type: ignore[arg-type]
    assert info.value.exit_code == 2
    with pytest.raises(InvalidParams):
        params_from_dict({**Params().to_dict(), **fields})
    assert params_from_dict(Params(max_refused=7).to_dict()) == Params(max_refused=7)


def test_message_sizes_are_bounded_before_decoding(mlp) -> None:  # type: ignore[no-untyped-def]
    from pinpoint.protocol import MESSAGE_MARGIN_BYTES, compute_message_limit, decode_tensors

    tight = Params(max_reveal_bytes=0)
    assert compute_message_limit(tight) == MESSAGE_MARGIN_BYTES
    state = new_dispute(tight, 0)
    opening = Challenger(mlp, 1).open_message(state)
    refused(state, dataclasses.replace(opening, start_proof=("0" * 64,) * 70_000), 1, MalformedMessage)  # > 4 MiB
    refused(state, dataclasses.replace(opening, spec={"x": float("nan")}), 1, MalformedMessage)  # no canonical form
    with pytest.raises(MalformedMessage, match="larger than 0 bytes"):
        decode_tensors(state, encode_blob(b"1234"))
    assert apply_message(state, opening, 1).bytes == opening.encoded_size()


def test_a_start_state_that_does_not_fit_the_model_loses_the_structure_dispute(mlp) -> None:  # type: ignore[no-untyped-def]
    """The referee traces the step from the revealed start state; one that hashes to the agreed S_t but is not a
    state of the job's model is the solver's claim failing, not an error."""
    import torch
    from safetensors.torch import save

    from pinpoint.messages import REFEREE, StateReveal
    from pol.digest import state_digest

    tensors = {"param/nonsense": torch.zeros(3), "meta/step": torch.tensor(4)}
    reveal = StateReveal(9, "0" * 64, tensors=encode_blob(save(tensors)))
    state = dataclasses.replace(new_dispute(Params(), 0), phase="ruling", turn=REFEREE, spec=mlp.spec, lo_step=4,
                                lo_digest=state_digest(tensors), n_nodes=5, reveal=reveal, seq=9)
    ruling, verdict = compute_ruling(state)
    assert ruling.loser == SOLVER and "cannot be traced" in ruling.reason and ruling.op == "pol.trace"
    assert verdict.executed == 0
