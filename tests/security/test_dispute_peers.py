"""Hostile dispute peers: a real subprocess speaking pinpoint's line protocol badly. Whatever it does (nothing,
garbage, replays, moves out of turn, a 50 MB line, JSON nested 100,000 deep), the dispute ends within the clocks
with the peer losing on time, its refused lines cost it, and the venue never holds more than its line bound."""

from __future__ import annotations

import dataclasses
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from pinpoint.errors import MalformedMessage, ProtocolError
from pinpoint.messages import CHALLENGER, SOLVER, message_from_dict
from pinpoint.party import ENVELOPE_BYTES, ProcessParty
from pinpoint.protocol import Params, compute_message_limit, new_dispute
from pinpoint.runner import check_transcript, run_dispute
from pol.bundle import open_bundle

BUDGET_MS = 2_000
SLACK_S = 6.0  # process start, the in-process challenger's set-up, a loaded machine

PEER = r'''
import json, sys, time

mode = sys.argv[1]
last = None  # the last message the venue reported as accepted
moves = 0
for line in sys.stdin:
    request = json.loads(line)
    if request["type"] == "entry":
        last = request["message"]
    elif request["type"] == "end":
        break
    elif request["type"] == "move":
        moves += 1
        if mode == "silent":
            continue
        if mode == "garbage":
            out = "this is not JSON {"
        elif mode == "slow_garbage":
            time.sleep(0.3)
            out = "this is not JSON {"
        elif mode == "replay":
            out = json.dumps({"message": last})
        elif mode == "out_of_turn":  # claims the other side timed out while it is its own move; answers for the other side
            if moves % 2:
                message = {"kind": "timeout", "seq": request["seq"], "prev": request["head"], "claimant": "solver"}
            else:
                message = {"kind": "step_answer", "seq": request["seq"], "prev": request["head"], "step": 2, "agree": True}
            out = json.dumps({"message": message})
        elif mode == "long":
            out = '{"message": "' + "x" * 50_000_000 + '"}'
        elif mode == "deep":
            out = '{"message": ' + "[" * 100_000 + "]" * 100_000 + "}"
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
'''


@pytest.fixture(scope="module")
def peer_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("peer") / "peer.py"
    path.write_text(PEER)
    return path


def _dispute(bundle: Path, peer: Path, mode: str, tmp_path: Path, **params: int):  # type: ignore[no-untyped-def]
    with open_bundle(bundle) as b:
        root = b.manifest.root
    started = time.monotonic()
    result = run_dispute(bundle, 0, solver_cmd=[sys.executable, str(peer), mode], transcript=tmp_path / "t.json",
                         params=Params(budget_ms=BUDGET_MS, commitment=root, **params), keep_states=True)
    return result, time.monotonic() - started


def _assert_solver_lost_on_time(result, wall: float, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert (result.outcome.loser, result.outcome.by) == (SOLVER, "timeout")
    assert wall < 2 * BUDGET_MS / 1000 + SLACK_S, f"the dispute took {wall:.1f}s, beyond both clocks"
    assert result.states[-1].remaining[0] == 0, "the solver's whole clock was spent"
    assert check_transcript(tmp_path / "t.json").outcome == result.outcome, "the transcript holds the Timeout"


def test_a_silent_peer_loses_on_time_at_its_deadline(honest_bundles, peer_script, tmp_path):
    result, wall = _dispute(honest_bundles["mlp"], peer_script, "silent", tmp_path)
    _assert_solver_lost_on_time(result, wall, tmp_path)
    assert wall >= BUDGET_MS / 1000, "a peer still within its clock is waited for, up to its deadline"
    assert not result.refusals


@pytest.mark.parametrize("mode, error", [
    ("garbage", "MalformedMessage"),
    ("replay", "ReplayedMessage"),
    ("out_of_turn", "OutOfTurn"),
    ("deep", "MalformedMessage"),
])
def test_a_peer_refused_max_refused_times_is_no_longer_heard(honest_bundles, peer_script, tmp_path, mode, error):
    result, wall = _dispute(honest_bundles["mlp"], peer_script, mode, tmp_path)
    _assert_solver_lost_on_time(result, wall, tmp_path)
    assert [r.party for r in result.refusals] == [SOLVER] * 3, "each refused line is counted against the peer"
    assert all(r.reason.startswith(error) for r in result.refusals), result.refusals
    assert wall < BUDGET_MS / 1000, "after max_refused refusals the venue stops listening: no need to wait"
    assert result.messages == 2 and result.states[0].phase == "steps", "only the Open and the Timeout were accepted"
    if mode == "deep":
        assert "deeper than 64" in result.refusals[0].reason


def test_refusals_cost_the_sender_its_clock(honest_bundles, peer_script, tmp_path):
    """A peer allowed many refusals keeps paying for each (0.3 s apiece here) until its clock runs out."""
    result, wall = _dispute(honest_bundles["mlp"], peer_script, "slow_garbage", tmp_path, max_refused=1000)
    _assert_solver_lost_on_time(result, wall, tmp_path)
    assert 3 < len(result.refusals) < 10 and wall >= BUDGET_MS / 1000
    times = [r.at for r in result.refusals]
    assert times == sorted(times) and times[-1] - times[0] >= 0.3 * (len(times) - 1) * 1000 - 50
    deadline = result.states[-1].turn_started
    assert times[-1] < deadline and deadline == result.states[0].turn_started + BUDGET_MS


def test_a_50mb_line_is_refused_without_being_held(honest_bundles, peer_script, tmp_path):
    small = 1 << 16
    limit = compute_message_limit(Params(max_reveal_bytes=small)) + ENVELOPE_BYTES
    assert limit < 5_000_000
    tracemalloc.start()
    try:
        result, wall = _dispute(honest_bundles["mlp"], peer_script, "long", tmp_path, max_reveal_bytes=small)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_solver_lost_on_time(result, wall, tmp_path)
    assert result.refusals and all(f"longer than {limit} bytes" in r.reason for r in result.refusals)
    assert peak < 4 * limit < 50_000_000, f"the venue held {peak} bytes reading a 50 MB line"


def test_a_clock_of_one_millisecond_ends_by_timeout_not_an_exception(honest_bundles):
    """`pol dispute --budget-ms 1`: every move costs at least 1 ms, so no Open can arrive in time: the challenger is
    silent and loses on time (a message that does arrive late is refused: the next test)."""
    result = run_dispute(honest_bundles["mlp"], 0, params=Params(budget_ms=1), keep_states=True)
    assert (result.outcome.loser, result.outcome.by) == (CHALLENGER, "timeout")
    assert result.refusals == ()
    assert result.messages == 1 and result.states[-1].remaining == (1, 0)


class _Late:
    """An honest in-process challenger that takes 0.4 s over its Open."""

    def __init__(self, bundle: Path) -> None:
        from pinpoint.parties import Challenger

        self.bundle = open_bundle(bundle)
        self.inner = Challenger(self.bundle, 0)
        self.asked = 0

    def observe(self, at: int, message: object) -> None:
        return None

    def refused(self, reason: str) -> None:
        self.refusal = reason

    def next_message(self, state, timeout=None):  # type: ignore[no-untyped-def]
        self.asked += 1
        time.sleep(0.4)
        return self.inner.next_message(state, timeout)


def test_a_late_in_process_message_is_refused_and_loses_on_time(honest_bundles):
    late = _Late(honest_bundles["mlp"])
    try:
        result = run_dispute(honest_bundles["mlp"], 0, challenger_party=late, params=Params(budget_ms=200))
    finally:
        late.bundle.close()
    assert (result.outcome.loser, result.outcome.by) == (CHALLENGER, "timeout") and late.asked == 1
    assert [r.reason.split(":")[0] for r in result.refusals] == ["ClockExpired"] and "ClockExpired" in late.refusal
    assert result.refusals[0].at >= 400, "the late Open was charged the 0.4 s it took"


def test_process_party_reads_with_a_deadline_and_a_cap(tmp_path):
    """The handle itself: a line in pieces, two lines at once, an overlong line dropped, a deadline, EOF."""
    script = tmp_path / "lines.py"
    script.write_text(
        "import sys, time\n"
        "sys.stdin.readline()\n"
        "w = sys.stdout.buffer\n"
        "w.write(b'{\"mess'); w.flush(); time.sleep(0.2)\n"
        "w.write(b'age\": null}\\n{\"message\": null}\\n'); w.flush()\n"
        "w.write(b'x' * (8 << 20) + b'\\n{\"message\": 1}\\n'); w.flush()\n"
        "time.sleep(1.5)\n"
    )
    party = ProcessParty([sys.executable, str(script)], Params(max_reveal_bytes=1))
    try:
        state = new_dispute(Params(), 0)
        assert party.read_line(5.0) == b'{"message": null}'
        assert party.next_message(state, 5.0) is None
        with pytest.raises(MalformedMessage, match="longer than"):
            party.read_line(5.0)
        with pytest.raises(MalformedMessage, match="expected a JSON object"):
            party.next_message(state, 5.0)
        started = time.monotonic()
        assert party.read_line(0.3) is None and 0.25 < time.monotonic() - started < 1.0, "the deadline holds"
        assert party.read_line(5.0) is None, "the peer exited: silent"
        assert len(party._partial) == 0 and not party._lines
    finally:
        assert party.close(0.0) in (0, -9)


def test_deep_nesting_built_in_process_is_a_typed_error() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    opening = {"kind": "open", "seq": 0, "prev": "0" * 64, "spec": {"x": deep}, "commitment": "0" * 64,
               "merkle_root": "0" * 64, "n_records": 2, "segment": 0, "start": {}, "end": {}, "start_proof": [],
               "end_proof": []}
    with pytest.raises(MalformedMessage) as info:
        message_from_dict(opening)
    assert info.value.field == "spec"


def test_message_integers_and_times_are_bounded(honest_bundles) -> None:
    from pinpoint.parties import Challenger
    from pinpoint.protocol import apply_message
    from pol.canonical import MAX_SAFE_INTEGER

    for field in ("seq", "step"):
        value = {"kind": "step_claim", "seq": 0, "prev": "0" * 64, "step": 1, "digest": "0" * 64, field: MAX_SAFE_INTEGER + 1}
        with pytest.raises(MalformedMessage) as info:
            message_from_dict(value)
        assert info.value.field == field
    with pytest.raises(MalformedMessage, match="digest"):
        message_from_dict({"kind": "step_claim", "seq": 0, "prev": "0" * 64, "step": 1, "digest": "0" * 64 + "\n"})
    state = new_dispute(Params(), 0)
    with open_bundle(honest_bundles["mlp"]) as b:
        opening = Challenger(b, 0).open_message(state)
    for at in (-1, 2**64, True):
        with pytest.raises(MalformedMessage, match="time"):
            apply_message(state, opening, at)  # type: ignore[arg-type]
    huge = dataclasses.replace(opening, n_records=MAX_SAFE_INTEGER)
    with pytest.raises(MalformedMessage, match="segment"):
        apply_message(state, huge, 1)
    assert apply_message(state, opening, 1).phase == "steps"
    with pytest.raises(ProtocolError):
        new_dispute(Params(), -5)


class _ClaimsForTheOther:
    """An in-process challenger that, instead of opening, claims the solver's timeout on the solver's behalf."""

    def observe(self, at: int, message: object) -> None:
        return None

    def refused(self, reason: str) -> None:
        self.reason = reason

    def next_message(self, state, timeout=None):  # type: ignore[no-untyped-def]
        from pinpoint.messages import Timeout

        time.sleep(0.01)
        return Timeout(state.seq, state.head, claimant=SOLVER)


def test_a_message_forged_for_the_other_party_is_refused(honest_bundles):
    """Late, the state machine would accept the solver's Timeout claim; coming from the challenger it is a forgery."""
    forger = _ClaimsForTheOther()
    result = run_dispute(honest_bundles["mlp"], 0, challenger_party=forger, params=Params(budget_ms=5))
    assert (result.outcome.loser, result.outcome.by) == (CHALLENGER, "timeout")
    assert [r.reason.split(":")[0] for r in result.refusals] == ["OutOfTurn"] and forger.reason.startswith("OutOfTurn")


class _Quiet:
    def observe(self, at: int, message: object) -> None:
        self.seen = message

    def refused(self, reason: str) -> None:
        self.refusal = reason

    def next_message(self, state, timeout=None):  # type: ignore[no-untyped-def]
        self.timeout = timeout
        return None


@pytest.mark.parametrize("line", [b"x" * (2 << 20) + b"\n", b"not json\n", b'{"no": "type"}\n',
                                  b'{"type": "entry", "at": 0, "message": {}}\n', b'{"type": "init"}\n'])
def test_a_party_refuses_a_broken_venue(line: bytes) -> None:
    import io

    from pinpoint.party import serve

    with pytest.raises(ProtocolError):
        serve(_Quiet(), io.BytesIO(line), io.BytesIO())


def test_a_party_answers_the_venue_line_by_line() -> None:
    import io
    import json

    from pinpoint.party import parse_party_line, serve

    state = new_dispute(Params(), 0)
    lines = [{"type": "init", "params": Params().to_dict(), "now": 0},
             {"type": "move", "seq": 0, "head": state.head, "ms_left": 1500}, {"type": "refused", "reason": "late"},
             {"type": "end"}, {"type": "move", "seq": 0, "head": state.head, "ms_left": 1}]
    party, out = _Quiet(), io.BytesIO()
    serve(party, io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines)), out)
    assert out.getvalue() == b'{"message":null}\n', "one answer, nothing after end"
    assert party.timeout == 1.5 and party.refusal == "late"
    assert parse_party_line(out.getvalue().strip()) is None
    with pytest.raises(MalformedMessage, match="exactly"):
        parse_party_line(b'{"x": 1}')
