"""Running a dispute: the venue loop (clock, referee, transcript), in one process or with parties as processes.

`run_dispute(bundle, segment)` plays an honest challenger against the solver of a bundle (both configurable with
`Behaviour`), feeds every accepted message to both parties, asks the referee for the ruling, and returns a
`DisputeResult`. The venue's clock is simulated: each move is charged the wall time its party really spent
computing it, and a silent party's clock is run to its deadline, after which the other party claims the timeout.

`check_transcript(path)` re-checks a written transcript as a third party would: it replays every message through
the state machine, recomputes the referee's ruling (one operator) and compares the outcome and the head hash.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pol.bundle import Bundle, open_bundle
from pol.canonical import Digest, parse_json_strict
from pol.verify import check_versions

from .capture import capture_step
from .errors import PinpointError, ProtocolError, TranscriptError
from .graph import summarize, write_graph
from .messages import CHALLENGER, REFEREE, SOLVER, Message, Ruling, Timeout, message_from_dict
from .parties import HONEST, Behaviour, Challenger, PartyLike, Solver
from .party import ProcessParty
from .protocol import DisputeState, Millis, Outcome, Params, apply_message, compute_ruling, get_deadline, get_other, new_dispute

__all__ = [
    "Event",
    "DisputeResult",
    "CheckResult",
    "run_dispute",
    "run_parties",
    "export_graph",
    "check_transcript",
    "write_transcript",
    "describe_event",
    "TRANSCRIPT_FORMAT",
]

TRANSCRIPT_FORMAT = "pinpoint-transcript"
EventCallback = Callable[["Event"], None]


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted message, for printing: who sent what at what time, and the state after it."""

    at: Millis
    message: Message
    state: DisputeState

    def describe(self) -> str:
        return describe_event(self)


@dataclass(frozen=True, slots=True)
class DisputeResult:
    outcome: Outcome
    rounds: int
    messages: int
    bytes: int
    step: int | None  # the disputed step t
    node: int | None  # the disputed node
    op: str | None
    n_nodes: int
    k: int  # steps in the disputed segment
    referee_executed: int  # aten operators the referee ran
    referee_flops: int
    referee_seconds: float
    solver_seconds: float
    challenger_seconds: float
    transcript: Path | None
    head: Digest
    states: tuple[DisputeState, ...] = field(default=(), repr=False)  # the state after every message

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.to_dict(), "rounds": self.rounds, "messages": self.messages, "bytes": self.bytes,
            "step": self.step, "node": self.node, "op": self.op, "n_nodes": self.n_nodes, "k": self.k,
            "referee": {"executed": self.referee_executed, "flops": self.referee_flops, "seconds": self.referee_seconds},
            "solver_seconds": self.solver_seconds, "challenger_seconds": self.challenger_seconds,
            "transcript": str(self.transcript) if self.transcript else None, "head": self.head,
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    outcome: Outcome
    messages: int
    rounds: int
    bytes: int
    head: Digest
    referee_executed: int

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "outcome": self.outcome.to_dict(), "messages": self.messages, "rounds": self.rounds,
                "bytes": self.bytes, "head": self.head, "referee_executed": self.referee_executed}


def describe_event(event: Event) -> str:
    """A one-line, human-readable account of an accepted message."""
    m, s = event.message, event.state
    d = m.to_dict()
    text = {
        "open": lambda: f"challenger disputes segment {d['segment']}: steps {d['start']['step']}..{d['end']['step']}",
        "step_claim": lambda: f"solver: S_{d['step']} = {d['digest'][:12]}",
        "step_answer": lambda: f"challenger {'agrees' if d['agree'] else 'disagrees'} at step {d['step']} -> steps {s.lo_step}..{s.hi_step}",
        "graph_commit": lambda: f"solver: graph of step {d['step']}: {d['n_nodes']} nodes, structure {d['structure_root'][:12]}",
        "graph_answer": lambda: f"challenger {'agrees with' if d['agree'] else 'disputes'} the structure",
        "node_claim": lambda: f"solver: P_{d['length']} = {d['commitment'][:12]}",
        "node_answer": lambda: f"challenger {'agrees' if d['agree'] else 'disagrees'} at {d['length']} -> nodes {s.lo_node}..{s.hi_node}",
        "reveal": lambda: f"solver reveals node {d['node']} ({d['record'].get('op')}), {m.encoded_size()} bytes",
        "point": lambda: f"challenger points at output element {d['element']}",
        "state_reveal": lambda: f"solver reveals the start state ({m.encoded_size()} bytes)",
        "ruling": lambda: f"referee ran {d['op']} ({d['executed']} op, {d['flops']} FLOPs): {d['loser']} loses: {d['reason']}",
        "timeout": lambda: f"{d['claimant']} claims a timeout: {s.outcome.loser if s.outcome else '?'} loses",
    }[m.kind]()
    return f"[{event.at / 1000:9.3f}s #{m.seq:02d}] {text}"


def _ms(seconds: float) -> Millis:
    return max(1, math.ceil(seconds * 1000))


def run_parties(
    solver: PartyLike,
    challenger: PartyLike,
    *,
    params: Params = Params(),
    on_event: EventCallback | None = None,
    data_dir: str | None = None,
    max_messages: int = 10_000,
) -> tuple[DisputeState, list[tuple[Millis, Message]], dict[str, float], Any]:
    """Drive two parties to an outcome. Returns the final state, the accepted (time, message) entries, the seconds
    each party spent, and the referee's Verdict (None if the dispute ended by timeout).

    Raises ProtocolError if a party sends a message the state machine refuses (a bug in that party).
    """
    now: Millis = 0
    state = new_dispute(params, now)
    entries: list[tuple[Millis, Message]] = []
    spent = {SOLVER: 0.0, CHALLENGER: 0.0, REFEREE: 0.0}
    parties = {SOLVER: solver, CHALLENGER: challenger}
    verdict = None
    while state.outcome is None and len(entries) < max_messages:
        mover = state.turn
        started = time.perf_counter()
        if mover == REFEREE:
            message, verdict = compute_ruling(state, data_dir=data_dir)
            spent[REFEREE] += time.perf_counter() - started
            at = now
        else:
            message = parties[mover].next_message(state)
            elapsed = time.perf_counter() - started
            spent[mover] += elapsed
            if message is None:  # silent: its clock runs out, the other party claims the timeout
                at = get_deadline(state)
                message = Timeout(state.seq, state.head, claimant=get_other(mover))
            else:
                at = now + _ms(elapsed)
        state = apply_message(state, message, at)
        now = at
        entries.append((at, message))
        for party in parties.values():
            party.observe(at, message)
        if on_event is not None:
            on_event(Event(at, message, state))
    if state.outcome is None:
        raise ProtocolError(f"the dispute did not end within {max_messages} messages")
    return state, entries, spent, verdict


def run_dispute(
    bundle: str | Path | Bundle,
    segment: int,
    *,
    solver: Behaviour = HONEST,
    challenger: Behaviour = HONEST,
    solver_party: PartyLike | None = None,
    challenger_party: PartyLike | None = None,
    solver_cmd: Sequence[str] | None = None,
    challenger_cmd: Sequence[str] | None = None,
    params: Params | None = None,
    on_event: EventCallback | None = None,
    transcript: str | Path | None = None,
    device: str = "cpu",
    data_dir: str | None = None,
    keep_states: bool = False,
) -> DisputeResult:
    """Dispute segment `segment` (0-based) of a bundle between a solver and a challenger.

    By default both parties run in this process (`solver`/`challenger` say how they behave); `solver_cmd` and
    `challenger_cmd` run a party as a separate process speaking `pinpoint.party`'s line protocol (see
    `pinpoint.party.party_command`); `solver_party`/`challenger_party` plug in any object with observe/next_message.
    Raises BundleError (bad bundle), VersionMismatch (made by another pol), PinpointError (bad segment, a party's
    protocol bug).
    """
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    check_versions(b.manifest.spec)  # a referee of another version would re-execute another step definition
    if not 0 <= segment < len(b.records) - 1:
        raise PinpointError(f"segment {segment} is not one of the bundle's {len(b.records) - 1} segments (0-based)")
    params = params or Params(commitment=b.manifest.root)
    processes: list[ProcessParty] = []
    if solver_cmd is not None:
        processes.append(ProcessParty(solver_cmd, params))
        solver_party = processes[-1]
    if challenger_cmd is not None:
        processes.append(ProcessParty(challenger_cmd, params))
        challenger_party = processes[-1]
    try:
        return _run(b, segment, solver_party or Solver(b, solver, device=device),
                    challenger_party or Challenger(b, segment, challenger, device=device),
                    params, on_event, transcript, data_dir, keep_states)
    finally:
        for process in processes:
            process.close()


def _run(b: Bundle, segment: int, s_party: PartyLike, c_party: PartyLike, params: Params, on_event: EventCallback | None,
         transcript: str | Path | None, data_dir: str | None, keep_states: bool) -> DisputeResult:
    states: list[DisputeState] = []

    def observe(event: Event) -> None:
        if keep_states:
            states.append(event.state)
        if on_event is not None:
            on_event(event)

    state, entries, spent, verdict = run_parties(s_party, c_party, params=params, on_event=observe, data_dir=data_dir)
    path = write_transcript(transcript, params, entries, state) if transcript is not None else None
    assert state.outcome is not None
    ruling = entries[-1][1] if isinstance(entries[-1][1], Ruling) else None
    return DisputeResult(
        outcome=state.outcome, rounds=state.rounds, messages=state.messages, bytes=state.bytes,
        step=state.lo_step if state.spec is not None else None, node=ruling.node if ruling else state.outcome.node,
        op=ruling.op if ruling else None, n_nodes=state.n_nodes, k=b.records[segment + 1].step - b.records[segment].step,
        referee_executed=ruling.executed if ruling else 0, referee_flops=ruling.flops if ruling else 0,
        referee_seconds=verdict.seconds if verdict is not None else 0.0, solver_seconds=spent[SOLVER],
        challenger_seconds=spent[CHALLENGER], transcript=path, head=state.head, states=tuple(states),
    )


def export_graph(bundle: str | Path | Bundle, step: int, out: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Capture step `step -> step + 1` of a bundle and write it (JSON, GraphML, DOT). Returns the summary plus
    `files` (the paths written). What `pol graph BUNDLE --step T --out FILE` calls.

    Raises BundleError, CaptureError.
    """
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    try:
        graph = capture_step(b, step, device=device)
    finally:
        if not isinstance(bundle, Bundle):
            b.close()
    paths = write_graph(graph, out)
    return {**summarize(graph), "files": {kind: str(p) for kind, p in paths.items()}}


# --- transcripts ------------------------------------------------------------------------------------------------


def write_transcript(path: str | Path, params: Params, entries: list[tuple[Millis, Message]], state: DisputeState) -> Path:
    """Write a transcript as JSON: params, every (time, message), the outcome and the head hash."""
    assert state.outcome is not None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": TRANSCRIPT_FORMAT, "version": 1, "params": params.to_dict(), "start": 0,
        "entries": [{"at": at, "message": m.to_dict()} for at, m in entries],
        "outcome": state.outcome.to_dict(), "head": state.head, "rounds": state.rounds, "bytes": state.bytes,
    }
    path.write_text(json.dumps(body, sort_keys=True, indent=1) + "\n", encoding="ascii")
    return path


def _params_from_dict(value: Any) -> Params:
    if not isinstance(value, dict) or set(value) != {"budget_ms", "commitment", "max_reveal_bytes"}:
        raise TranscriptError("transcript params must have exactly budget_ms, commitment, max_reveal_bytes")
    budget, commitment, limit = value["budget_ms"], value["commitment"], value["max_reveal_bytes"]
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0 or isinstance(limit, bool) or not isinstance(limit, int):
        raise TranscriptError("transcript params: budget_ms and max_reveal_bytes must be integers")
    if commitment is not None and not isinstance(commitment, str):
        raise TranscriptError("transcript params: commitment must be a digest or null")
    return Params(budget, commitment, limit)


def check_transcript(path: str | Path, *, data_dir: str | None = None) -> CheckResult:
    """Re-check a transcript as a third party: replay every message, recompute the ruling, compare the outcome.

    Raises TranscriptError naming the first problem.
    """
    try:
        body = parse_json_strict(Path(path).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise TranscriptError(f"cannot read transcript {path}: {exc}") from None
    expected_keys = {"format", "version", "params", "start", "entries", "outcome", "head", "rounds", "bytes"}
    if not isinstance(body, dict) or body.get("format") != TRANSCRIPT_FORMAT or body.get("version") != 1:
        raise TranscriptError(f"not a {TRANSCRIPT_FORMAT} version 1 file")
    if set(body) != expected_keys:
        raise TranscriptError(f"transcript keys must be exactly {sorted(expected_keys)}")
    start = body["start"]
    if isinstance(start, bool) or not isinstance(start, int) or not isinstance(body["entries"], list):
        raise TranscriptError("transcript start must be an integer and entries a list")
    state = new_dispute(_params_from_dict(body["params"]), start)
    executed = 0
    for i, entry in enumerate(body["entries"]):
        if not isinstance(entry, dict) or set(entry) != {"at", "message"} or isinstance(entry["at"], bool) or not isinstance(entry["at"], int):
            raise TranscriptError(f"entry {i}: expected exactly an integer 'at' and a 'message'")
        try:
            message = message_from_dict(entry["message"])
            if isinstance(message, Ruling):
                expected, verdict = compute_ruling(state, data_dir=data_dir)
                if expected.to_dict() != message.to_dict():
                    raise TranscriptError(f"entry {i}: the referee's ruling recomputes differently: {expected.loser} loses ({expected.reason})")
                executed = verdict.executed
            state = apply_message(state, message, entry["at"])
        except (ProtocolError, PinpointError) as exc:
            if isinstance(exc, TranscriptError):
                raise
            raise TranscriptError(f"entry {i} is refused: {exc}") from None
    if state.outcome is None:
        raise TranscriptError("the transcript ends before the dispute is settled")
    recorded = {"outcome": body["outcome"], "head": body["head"], "rounds": body["rounds"], "bytes": body["bytes"]}
    replayed = {"outcome": state.outcome.to_dict(), "head": state.head, "rounds": state.rounds, "bytes": state.bytes}
    for key in recorded:
        if recorded[key] != replayed[key]:
            raise TranscriptError(f"the transcript's {key} does not match the replay: {recorded[key]!r} != {replayed[key]!r}")
    return CheckResult(state.outcome, state.messages, state.rounds, state.bytes, state.head, executed)
