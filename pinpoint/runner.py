"""Running a dispute: the venue loop (clock, referee, transcript), in one process or with parties as processes.

`run_dispute(bundle, segment)` plays an honest challenger against the solver of a bundle (both configurable with
`Behaviour`), feeds every accepted message to both parties, asks the referee for the ruling, and returns a
`DisputeResult`. The venue's clock is simulated: each move is charged the wall time its party really spent
computing it, and a silent party's clock is run to its deadline, after which the other party claims the timeout.

The venue's rules for misbehaviour (`run_parties`; see pinpoint.protocol): a party process is read only while its
clock runs (`ProcessParty` polls with that deadline and a byte cap), so a peer that does not answer is silent and
loses on time. A message the state machine refuses (or a line that is no message, or one claiming to come from the
other party) changes nothing and costs its sender: its clock keeps running, the refusal is reported to it, and it
may try again; after `params.max_refused` refusals the venue stops listening, and it loses on time at its deadline.
A late message (ClockExpired) is such a refusal too. Every dispute therefore ends within the two clocks (in-process
parties are the venue's own code and are not interrupted while they compute).

Trust (DESIGN section 8): a `CodePolicy` (default pol's built-ins only) says which user code the parties and the
referee may import; `pol.engine.verify_code` is checked before anything is built (CodeNotAllowed, CodeDiffers).

`check_transcript(path)` re-checks a written transcript as a third party would: it replays every message through
the state machine, recomputes the referee's ruling (one operator) and compares the outcome and the head hash. It
reads at most `max_bytes` (MAX_TRANSCRIPT_BYTES) of a regular file and builds model or data only when the ruling
re-derives a leaf or traces a step, and then only code its policy allows.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pol.bundle import Bundle, open_bundle
from pol.canonical import Digest, parse_json_strict
from pol.components import CodePolicy
from pol.engine import verify_code
from pol.verify import check_versions

from .capture import capture_step
from .errors import InvalidParams, OutOfTurn, PinpointError, ProtocolError, TranscriptError
from .graph import summarize, write_graph
from .messages import CHALLENGER, REFEREE, SOLVER, Message, Open, Party, Ruling, Timeout, message_from_dict
from .parties import HONEST, Behaviour, Challenger, PartyLike, Solver
from .party import CLOSE_GRACE_S, ProcessParty
from .protocol import DisputeState, Millis, Outcome, Params, apply_message, get_deadline, get_other, new_dispute, params_from_dict
from .referee import Verdict, compute_ruling

__all__ = [
    "Event",
    "Refusal",
    "Played",
    "DisputeResult",
    "CheckResult",
    "run_dispute",
    "run_parties",
    "export_graph",
    "check_transcript",
    "write_transcript",
    "describe_event",
    "TRANSCRIPT_FORMAT",
    "MAX_TRANSCRIPT_BYTES",
]

TRANSCRIPT_FORMAT = "pinpoint-transcript"
MAX_TRANSCRIPT_BYTES = 1 << 30  # a transcript larger than this is refused before it is read
EventCallback = Callable[["Event"], None]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message (or a line that is none) the venue refused: the state did not change, the sender's clock ran."""

    at: Millis
    party: Party
    reason: str  # the error's class and text

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "party": self.party, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted message, for printing: who sent what at what time, and the state after it; or, with `refusal`
    set, a refused one (`message` is what was refused, None for a line that was no message; `state` unchanged)."""

    at: Millis
    message: Message | None
    state: DisputeState
    refusal: Refusal | None = None

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
    states: tuple[DisputeState, ...] = field(default=(), repr=False)  # the state after every accepted message
    refusals: tuple[Refusal, ...] = ()  # what the venue refused, in order

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.to_dict(), "rounds": self.rounds, "messages": self.messages, "bytes": self.bytes,
            "step": self.step, "node": self.node, "op": self.op, "n_nodes": self.n_nodes, "k": self.k,
            "referee": {"executed": self.referee_executed, "flops": self.referee_flops, "seconds": self.referee_seconds},
            "solver_seconds": self.solver_seconds, "challenger_seconds": self.challenger_seconds,
            "transcript": str(self.transcript) if self.transcript else None, "head": self.head,
            "refused": [r.to_dict() for r in self.refusals],
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
    """A one-line, human-readable account of an accepted (or refused) message."""
    m, s = event.message, event.state
    if event.refusal is not None or m is None:
        r = event.refusal
        who, why = (r.party, r.reason) if r is not None else ("?", "?")
        return f"[{event.at / 1000:9.3f}s    ] refused {who}'s {m.kind if m is not None else 'line'}: {why[:200]}"
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
    """Venue milliseconds charged for `seconds` of wall time: rounded up, at least 1 (every move costs time)."""
    return max(1, math.ceil(seconds * 1000))


@dataclass(frozen=True, slots=True)
class Played:
    """What `run_parties` returns: the final state, the accepted (time, message) entries, the wall seconds each
    party (and the referee) spent, the referee's Verdict (None if the dispute ended by timeout) and the refusals."""

    state: DisputeState
    entries: tuple[tuple[Millis, Message], ...]
    spent: Mapping[Party, float]
    verdict: Verdict | None
    refusals: tuple[Refusal, ...]


def run_parties(
    solver: PartyLike,
    challenger: PartyLike,
    *,
    params: Params = Params(),
    on_event: EventCallback | None = None,
    data_dir: str | None = None,
    code: CodePolicy = CodePolicy(),
    max_messages: int = 10_000,
) -> Played:
    """Drive two parties to an outcome under the venue's rules (see the module docstring): every move is bounded by
    the mover's clock, refused messages cost their sender, and the dispute ends by a ruling or a timeout.

    Raises CodeNotAllowed or CodeDiffers (the Open names code the referee may not run), what `compute_ruling`
    raises when the referee cannot rule here, and ProtocolError if more than `max_messages` are accepted (a bug).
    """
    now: Millis = 0
    state = new_dispute(params, now)
    entries: list[tuple[Millis, Message]] = []
    refusals: list[Refusal] = []
    spent = {SOLVER: 0.0, CHALLENGER: 0.0, REFEREE: 0.0}
    parties = {SOLVER: solver, CHALLENGER: challenger}
    verdict = None
    while state.outcome is None:
        if len(entries) >= max_messages:
            raise ProtocolError(f"the dispute did not end within {max_messages} messages")
        if state.turn == REFEREE:
            started = time.perf_counter()
            message, verdict = compute_ruling(state, data_dir=data_dir, code=code)
            spent[REFEREE] += time.perf_counter() - started
            at, state = now, apply_message(state, message, now)
        else:
            at, message, state = _play_turn(parties[state.turn], state, now, refusals, spent, on_event)
        if isinstance(message, Open):
            assert state.spec is not None
            verify_code(state.spec, code)  # before the referee (or anyone) builds what the Open names
        now = at
        entries.append((at, message))
        for party in parties.values():
            party.observe(at, message)
        if on_event is not None:
            on_event(Event(at, message, state))
    return Played(state, tuple(entries), spent, verdict, tuple(refusals))


def _play_turn(party: PartyLike, state: DisputeState, now: Millis, refusals: list[Refusal], spent: dict[Party, float],
               on_event: EventCallback | None) -> tuple[Millis, Message, DisputeState]:
    """The mover's accepted message, or the other party's Timeout at the mover's deadline. Refusals are recorded,
    reported to the mover and charged to its clock; past `max_refused` of them the mover is no longer heard."""
    mover = state.turn
    deadline = get_deadline(state)
    started = time.perf_counter()
    while sum(r.party == mover for r in refusals) < state.params.max_refused:
        elapsed = time.perf_counter() - started
        if now + _ms(elapsed) >= deadline:  # a message now would be stamped at or after the deadline: too late
            break
        message: Message | None = None
        try:
            message = party.next_message(state, (deadline - now) / 1000 - elapsed)
            at = now + _ms(time.perf_counter() - started)
            if message is None:  # silent: its clock runs out
                break
            accepted = apply_message(state, message, at)
            if message.sender != mover:  # accepted only as the other party's (a Timeout it claims): a forgery
                raise OutOfTurn(message.sender, mover)
        except ProtocolError as exc:
            at = now + _ms(time.perf_counter() - started)
            refusal = Refusal(at, mover, f"{type(exc).__name__}: {exc}"[:1000])
            refusals.append(refusal)
            party.refused(refusal.reason)
            if on_event is not None:
                on_event(Event(at, message, state, refusal))
            continue
        spent[mover] += time.perf_counter() - started
        return at, message, accepted
    spent[mover] += time.perf_counter() - started
    claim = Timeout(state.seq, state.head, claimant=get_other(mover))
    return deadline, claim, apply_message(state, claim, deadline)


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
    code: CodePolicy = CodePolicy(),
) -> DisputeResult:
    """Dispute segment `segment` (0-based) of a bundle between a solver and a challenger.

    By default both parties run in this process (`solver`/`challenger` say how they behave); `solver_cmd` and
    `challenger_cmd` run a party as a separate process speaking `pinpoint.party`'s line protocol (see
    `pinpoint.party.party_command`); `solver_party`/`challenger_party` plug in any PartyLike. In-process parties and
    the referee import only the user code `code` allows (default: pol's built-ins only); a party process gets its own
    policy on its command line. A misbehaving party loses (by timeout at the latest); it never aborts the dispute.

    Raises CodeNotAllowed, CodeDiffers (before anything is built or spawned), BundleError (bad bundle),
    VersionMismatch (made by another pol), PinpointError (a segment the bundle does not have), DataDiffers and what
    building the job raises.
    """
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, full=False)
    try:
        verify_code(b.spec, code)
        check_versions(b.manifest.spec)  # a referee of another version would re-execute another step definition
        if not 0 <= segment < len(b.records) - 1:
            raise PinpointError(f"segment {segment} is not one of the bundle's {len(b.records) - 1} segments (0-based)")
        return _run_with_processes(b, segment, solver, challenger, solver_party, challenger_party, solver_cmd,
                                   challenger_cmd, params or Params(commitment=b.manifest.root), on_event, transcript,
                                   device, data_dir, keep_states, code)
    finally:
        if not isinstance(bundle, Bundle):
            b.close()


def _run_with_processes(b: Bundle, segment: int, solver: Behaviour, challenger: Behaviour, solver_party: PartyLike | None,
                        challenger_party: PartyLike | None, solver_cmd: Sequence[str] | None,
                        challenger_cmd: Sequence[str] | None, params: Params, on_event: EventCallback | None,
                        transcript: str | Path | None, device: str, data_dir: str | None, keep_states: bool,
                        code: CodePolicy) -> DisputeResult:
    processes: dict[Party, ProcessParty] = {}
    outcome: Outcome | None = None
    try:
        if solver_cmd is not None:
            solver_party = processes[SOLVER] = ProcessParty(solver_cmd, params)
        if challenger_cmd is not None:
            challenger_party = processes[CHALLENGER] = ProcessParty(challenger_cmd, params)
        result = _run(b, segment, solver_party or Solver(b, solver, device=device, code=code),
                      challenger_party or Challenger(b, segment, challenger, device=device, code=code),
                      params, on_event, transcript, data_dir, keep_states, code)
        outcome = result.outcome
        return result
    finally:  # all are told to end first, then waited for; a party that lost on time (or a failed run) gets no grace
        graces = {role: 0.0 if outcome is None or (outcome.by == "timeout" and outcome.loser == role) else CLOSE_GRACE_S
                  for role in processes}
        for role, process in processes.items():
            process.stop(graces[role])
        for role, process in processes.items():
            process.close(graces[role])


def _run(b: Bundle, segment: int, s_party: PartyLike, c_party: PartyLike, params: Params, on_event: EventCallback | None,
         transcript: str | Path | None, data_dir: str | None, keep_states: bool, code: CodePolicy) -> DisputeResult:
    states: list[DisputeState] = []

    def observe(event: Event) -> None:
        if keep_states and event.refusal is None:
            states.append(event.state)
        if on_event is not None:
            on_event(event)

    played = run_parties(s_party, c_party, params=params, on_event=observe, data_dir=data_dir, code=code)
    state, entries, spent, verdict = played.state, list(played.entries), played.spent, played.verdict
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
        refusals=played.refusals,
    )


def export_graph(bundle: str | Path | Bundle, step: int, out: str | Path, *, device: str = "cpu",
                 data_dir: str | None = None, code: CodePolicy = CodePolicy()) -> dict[str, Any]:
    """Capture step `step -> step + 1` of a bundle and write it (JSON, GraphML, DOT). Returns the summary plus
    `files` (the paths written). What `pol graph BUNDLE --step T --out FILE` calls. Imports only the user code
    `code` allows (default: pol's built-ins only).

    Raises CodeNotAllowed, CodeDiffers (before anything is built), BundleError, CaptureError.
    """
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, full=False)
    try:
        verify_code(b.spec, code)
        graph = capture_step(b, step, device=device, data_dir=data_dir, code=code)
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
    try:
        return params_from_dict(value)
    except InvalidParams as exc:
        raise TranscriptError(f"transcript {exc}") from None


def _read_transcript(path: str | Path, max_bytes: int) -> Any:
    """The parsed JSON of a regular file of at most `max_bytes` bytes, its size checked before reading."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise TranscriptError(f"transcript {path} is not a regular file")
            if info.st_size > max_bytes:
                raise TranscriptError(f"transcript {path} has {info.st_size} bytes, more than the {max_bytes} allowed")
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TranscriptError(f"transcript {path} grew beyond {max_bytes} bytes while being read")
        return parse_json_strict(data)
    except (OSError, ValueError) as exc:
        raise TranscriptError(f"cannot read transcript {path}: {str(exc)[:300]}") from None


def check_transcript(path: str | Path, *, data_dir: str | None = None, code: CodePolicy = CodePolicy(),
                     max_bytes: int = MAX_TRANSCRIPT_BYTES) -> CheckResult:
    """Re-check a transcript as a third party: replay every message, recompute the ruling, compare the outcome.

    It checks a ruling from what the transcript holds (revealed inputs, digests): an operator node (a torch random
    draw included: re-derived from the spec's seed and its key), a state leaf or the state node needs no model, data
    or user code, so a third party without the job's code can check it. Only a leaf the referee re-derives (a batch,
    a built-in model's dropout mask, a model buffer) or a traced step builds the job, and then
    only with code `code` allows, after checking its code digest.
    Raises TranscriptError naming the first problem; CodeNotAllowed, CodeDiffers, DataDiffers (and what building the
    job raises) when this machine cannot check the ruling ("cannot check", exit 2).
    """
    body = _read_transcript(path, max_bytes)
    expected_keys = {"format", "version", "params", "start", "entries", "outcome", "head", "rounds", "bytes"}
    if not isinstance(body, dict) or body.get("format") != TRANSCRIPT_FORMAT or body.get("version") != 1:
        raise TranscriptError(f"not a {TRANSCRIPT_FORMAT} version 1 file")
    if set(body) != expected_keys:
        raise TranscriptError(f"transcript keys must be exactly {sorted(expected_keys)}")
    if not isinstance(body["entries"], list):
        raise TranscriptError("transcript entries must be a list")
    try:
        state = new_dispute(_params_from_dict(body["params"]), body["start"])
    except ProtocolError as exc:
        raise TranscriptError(f"transcript start: {exc}") from None
    executed = 0
    for i, entry in enumerate(body["entries"]):
        if not isinstance(entry, dict) or set(entry) != {"at", "message"}:
            raise TranscriptError(f"entry {i}: expected exactly an integer 'at' and a 'message'")
        try:
            message = message_from_dict(entry["message"])
            if isinstance(message, Ruling):
                expected, verdict = compute_ruling(state, data_dir=data_dir, code=code)
                if expected.to_dict() != message.to_dict():
                    raise TranscriptError(f"entry {i}: the referee's ruling recomputes differently: {expected.loser} loses ({expected.reason})")
                executed = verdict.executed
            state = apply_message(state, message, entry["at"])
        except PinpointError as exc:
            if isinstance(exc, TranscriptError):
                raise
            raise TranscriptError(f"entry {i} is refused: {exc}") from None
    if state.outcome is None:
        raise TranscriptError("the transcript ends before the dispute is settled")
    recorded = {"outcome": body["outcome"], "head": body["head"], "rounds": body["rounds"], "bytes": body["bytes"]}
    replayed = {"outcome": state.outcome.to_dict(), "head": state.head, "rounds": state.rounds, "bytes": state.bytes}
    for key in recorded:
        if recorded[key] != replayed[key]:
            raise TranscriptError(f"the transcript's {key} does not match the replay: {str(recorded[key])[:200]} != {str(replayed[key])[:200]}")
    return CheckResult(state.outcome, state.messages, state.rounds, state.bytes, state.head, executed)
