"""Every error `games` raises on bad input. One hierarchy, so callers can catch as broadly or narrowly as they need.

    GameError
    ├── LedgerError                 a ledger operation was refused; the ledger is left exactly as it was
    │   ├── InvalidAmount           an amount that is not a positive integer
    │   ├── InvalidIdentifier       an account, escrow, op or round id that is empty, too long or not a str
    │   ├── UnknownAccount          the account was never opened
    │   ├── AccountExists           opening an account that already exists (under a new op id)
    │   ├── UnknownEscrow           releasing or slashing from an escrow that holds nothing
    │   ├── InsufficientFunds       the account or escrow holds less than the amount
    │   ├── OperationConflict       an op id reused with a different operation or different arguments
    │   └── LedgerCorrupt           a stored ledger fails its own invariants (supply, signs, event chain)
    ├── RuleViolation(rule)         a game move breaks a rule of the task lifecycle; names the rule
    │   ├── WrongPhase              the move is not allowed in the task's current phase (out of order)
    │   ├── DeadlineMissed          the move came at or after its deadline (or a timeout before it)
    │   ├── NotAuthorized           the party may not make this move (not the submitter, solver, ...)
    │   ├── DuplicateMove           the party already made this move (second bid, second verdict, ...)
    │   ├── BidRejected             a bid above the maximum price or not meeting the requirements
    │   ├── BadMove                 a malformed move (weight out of range, unknown ruling, bad commitment)
    │   └── SaltMismatch            the revealed salt does not hash to the digest given with the bid
    └── MarketError(rule)           `games.market` cannot go on: its journal belongs to another market or diverged

Every raise is reached by a test. `assert` is kept for our own bugs only.
"""

from __future__ import annotations

__all__ = [
    "AccountExists",
    "BadMove",
    "BidRejected",
    "DeadlineMissed",
    "DuplicateMove",
    "GameError",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidIdentifier",
    "LedgerCorrupt",
    "LedgerError",
    "MarketError",
    "NotAuthorized",
    "OperationConflict",
    "RuleViolation",
    "SaltMismatch",
    "UnknownAccount",
    "UnknownEscrow",
    "WrongPhase",
]


class GameError(Exception):
    """Root of every error raised by `games`."""


class LedgerError(GameError):
    """A ledger operation was refused; nothing changed."""


class InvalidAmount(LedgerError):
    def __init__(self, amount: object) -> None:
        super().__init__(f"amount must be a positive int, got {amount!r}")
        self.amount = amount


class InvalidIdentifier(LedgerError):
    def __init__(self, what: str, value: object) -> None:
        super().__init__(f"invalid {what}: {value!r} (a non-empty str of at most 256 characters)")
        self.what = what
        self.value = value


class UnknownAccount(LedgerError):
    def __init__(self, account: str) -> None:
        super().__init__(f"unknown account {account!r}")
        self.account = account


class AccountExists(LedgerError):
    def __init__(self, account: str) -> None:
        super().__init__(f"account {account!r} already exists")
        self.account = account


class UnknownEscrow(LedgerError):
    def __init__(self, escrow: str) -> None:
        super().__init__(f"escrow {escrow!r} holds nothing")
        self.escrow = escrow


class InsufficientFunds(LedgerError):
    def __init__(self, holder: str, needed: int, available: int) -> None:
        super().__init__(f"{holder!r} holds {available}, needs {needed}")
        self.holder = holder
        self.needed = needed
        self.available = available


class OperationConflict(LedgerError):
    def __init__(self, op_id: str, recorded: str, given: str) -> None:
        super().__init__(f"op id {op_id!r} was already used for {recorded}; refusing {given}")
        self.op_id = op_id
        self.recorded = recorded
        self.given = given


class LedgerCorrupt(LedgerError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"ledger corrupt: {reason}")
        self.reason = reason


class RuleViolation(GameError):
    """A move broke a rule of the task lifecycle. `rule` names it (e.g. 'commit.deadline')."""

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"rule {rule!r} violated" + (f": {detail}" if detail else ""))
        self.rule = rule
        self.detail = detail


class WrongPhase(RuleViolation):
    pass


class DeadlineMissed(RuleViolation):
    pass


class NotAuthorized(RuleViolation):
    pass


class DuplicateMove(RuleViolation):
    pass


class BidRejected(RuleViolation):
    pass


class BadMove(RuleViolation):
    pass


class SaltMismatch(RuleViolation):
    pass


class MarketError(GameError):
    """`games.market.run_market` cannot go on (a journal of another market, or a replay that diverged from it).
    `rule` names what was broken (e.g. 'market.journal')."""

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"market rule {rule!r} violated" + (f": {detail}" if detail else ""))
        self.rule = rule
        self.detail = detail
