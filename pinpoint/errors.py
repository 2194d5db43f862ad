"""Every error `pinpoint` raises on bad input. One hierarchy, drawn here:

    PinpointError                     (a pol.errors.PolError, so callers catching PolError see it too)
    ├── CaptureError                  a step cannot be captured as an operator graph (untracked tensor, bad fault)
    ├── GraphError                    a serialised graph or node record is malformed
    ├── InvalidParams                 the venue's rules (Params) are out of range (exit 2: a usage error)
    ├── ProtocolError                 a dispute message is rejected; the dispute state is left exactly as it was
    │   ├── MalformedMessage          wrong kind, field, type or value (or a line that is no message); names it
    │   ├── OutOfTurn                 the sender is not the party whose move it is
    │   ├── ReplayedMessage           a sequence number already used (or skipped ahead)
    │   ├── ClockExpired              the mover's chess clock ran out before the message arrived
    │   ├── PrematureTimeout          a timeout claimed before the other party's clock ran out
    │   ├── InvalidClaim              a claim contradicts what is already agreed (bad Merkle proof, wrong step)
    │   └── DisputeOver               the dispute is already settled
    └── TranscriptError               a transcript does not re-check (edited, truncated or inconsistent)

Errors raised while *building* what a ruling needs come from `pol.errors` unchanged: CodeNotAllowed and
CodeDiffers (the checker does not run that code: "cannot check", exit 2), DataDiffers (other data here, exit 2).

Every raise is reached by a test. `assert` is kept for our own bugs only.
"""

from __future__ import annotations

from pol.errors import EXIT_USAGE, PolError

__all__ = [
    "PinpointError",
    "CaptureError",
    "GraphError",
    "InvalidParams",
    "ProtocolError",
    "MalformedMessage",
    "OutOfTurn",
    "ReplayedMessage",
    "ClockExpired",
    "PrematureTimeout",
    "InvalidClaim",
    "DisputeOver",
    "TranscriptError",
]


class PinpointError(PolError):
    """Base class of every error raised by `pinpoint` on bad input."""


class CaptureError(PinpointError):
    """A training step cannot be captured as an operator graph."""


class GraphError(PinpointError):
    """A serialised operator graph or node record is malformed."""


class InvalidParams(PinpointError):
    """The venue's rules for a dispute (`pinpoint.protocol.Params`) are out of range."""

    exit_code = EXIT_USAGE


class ProtocolError(PinpointError):
    """A dispute message was rejected. The dispute state is unchanged."""


class MalformedMessage(ProtocolError):
    """A message has the wrong kind, a missing or extra field, or a value of the wrong type or range."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"malformed message field {field!r}: {problem}")
        self.field = field


class OutOfTurn(ProtocolError):
    """The sender is not the party whose move it is."""

    def __init__(self, sender: str, expected: str) -> None:
        super().__init__(f"out of turn: {sender} sent a message but it is {expected}'s move")
        self.sender = sender
        self.expected = expected


class ReplayedMessage(ProtocolError):
    """The message's sequence number is not the next one (a replay or a skipped message)."""

    def __init__(self, seq: int, expected: int) -> None:
        super().__init__(f"message sequence number {seq} is not the next one ({expected}): replayed or out of order")
        self.seq = seq
        self.expected = expected


class ClockExpired(ProtocolError):
    """The mover's chess clock ran out before its message arrived; the other party may claim a timeout."""

    def __init__(self, party: str, deadline: int, now: int) -> None:
        super().__init__(f"{party}'s clock expired at {deadline} ms; its message arrived at {now} ms")
        self.party = party
        self.deadline = deadline
        self.now = now


class PrematureTimeout(ProtocolError):
    """A timeout was claimed before the other party's clock ran out."""

    def __init__(self, party: str, deadline: int, now: int) -> None:
        super().__init__(f"{party}'s clock runs until {deadline} ms; a timeout at {now} ms is premature")
        self.party = party
        self.deadline = deadline
        self.now = now


class InvalidClaim(ProtocolError):
    """A claim contradicts what is already agreed (a Merkle proof, a step, a digest or a node that does not fit)."""


class DisputeOver(ProtocolError):
    """The dispute is already settled; no further message is accepted."""


class TranscriptError(PinpointError):
    """A dispute transcript does not re-check: it was edited, truncated or is inconsistent."""
