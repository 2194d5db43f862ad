"""Every error `games` raises on bad input. One hierarchy, so callers can catch as broadly or narrowly as they need.

GameError hangs below `pol.errors.PolError` (games may import pol, never the reverse), so each class carries the
exit code the `pol` command gives for it (`exit_code`): 1 for "rejected or failed", 2 for "usage error or cannot
verify". A refused move or ledger operation reaches a user as bad input, so the default is 2; a stored ledger that
fails its own invariants is a failure (1).

    PolError                          exit
    └── GameError                       2
        ├── LedgerError                 2   a ledger refused an operation (and is left exactly as it was), or a file
        │                                   cannot be read as one
        │   ├── InvalidAmount           2   an amount that is not an int in [1, MAX_AMOUNT]
        │   │   └── SupplyOverflow      2   a mint that would take the total supply above MAX_AMOUNT
        │   ├── InvalidIdentifier       2   an account, escrow, op or round id that is empty, too long or not a str
        │   ├── UnknownAccount          2   the account was never opened
        │   ├── AccountExists           2   opening an account that already exists (under a new op id)
        │   ├── UnknownEscrow           2   releasing or slashing from an escrow that holds nothing
        │   ├── InsufficientFunds       2   the account or escrow holds less than the amount
        │   ├── OperationConflict       2   an op id reused with a different operation or different arguments
        │   ├── LedgerCorrupt           1   a stored ledger fails its own invariants (supply, signs, types, chain)
        │   └── NotALedger(path)        2   the file is not a pol ledger this pol can open (missing, not a database,
        │                                   another schema or schema version, unreadable); the file is left untouched
        ├── RuleViolation(rule)         2   a game move breaks a rule of the task lifecycle; names the rule
        │   ├── WrongPhase              2   the move is not allowed in the task's current phase (out of order)
        │   ├── DeadlineMissed          2   the move came at or after its deadline (or a timeout before it)
        │   ├── NotAuthorized           2   the party may not make this move (not the submitter, solver, ...)
        │   ├── DuplicateMove           2   the party already made this move (second bid, second verdict, ...)
        │   ├── BidRejected             2   a bid above the maximum price or not meeting the requirements
        │   ├── BadMove                 2   a malformed move (weight out of range, unknown ruling, bad commitment)
        │   │   └── CostError           2   a figure of the cost model out of range (games.cost; rule 'cost.*')
        │   └── SaltMismatch            2   the revealed salt does not hash to the digest given with the bid
        └── MarketError(rule)           2   `games.market` cannot go on: its journal belongs to another market or
                                            diverged

Every raise is reached by a test. `assert` is kept for our own bugs only.
"""

from __future__ import annotations

from pathlib import Path

from pol.errors import EXIT_FAILED, EXIT_USAGE, PolError

__all__ = [
    "AccountExists",
    "BadMove",
    "BidRejected",
    "CostError",
    "DeadlineMissed",
    "DuplicateMove",
    "GameError",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidIdentifier",
    "LedgerCorrupt",
    "LedgerError",
    "MarketError",
    "NotALedger",
    "NotAuthorized",
    "OperationConflict",
    "RuleViolation",
    "SaltMismatch",
    "SupplyOverflow",
    "UnknownAccount",
    "UnknownEscrow",
    "WrongPhase",
]


class GameError(PolError):
    """Root of every error raised by `games`."""

    exit_code = EXIT_USAGE


class LedgerError(GameError):
    """A ledger operation was refused; nothing changed."""


class InvalidAmount(LedgerError):
    """An amount that is not an int (bool and float are refused) in [1, maximum]. `maximum` is the ledger's
    MAX_AMOUNT; given by the caller because this module cannot import `games.ledger`."""

    def __init__(self, amount: object, maximum: int | None = None, *, message: str | None = None) -> None:
        bound = f" of at most {maximum}" if maximum is not None else ""
        super().__init__(message or f"amount must be a positive int{bound}, got {_short(amount)}")
        self.amount = amount
        self.maximum = maximum


class SupplyOverflow(InvalidAmount):
    """A mint that would take the total supply above `maximum` (MAX_AMOUNT). Since every balance is at most the
    supply, this bound is what keeps every stored number a 64-bit integer."""

    def __init__(self, amount: int, supply: int, maximum: int) -> None:
        super().__init__(amount, maximum, message=f"minting {amount} would take the total supply from {supply} "
                                                  f"above the ledger's maximum {maximum}")
        self.supply = supply


class InvalidIdentifier(LedgerError):
    def __init__(self, what: str, value: object, expected: str = "a non-empty str of at most 256 characters") -> None:
        super().__init__(f"invalid {what}: {_short(value)} ({expected})")
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
    exit_code = EXIT_FAILED

    def __init__(self, reason: str) -> None:
        super().__init__(f"ledger corrupt: {reason}")
        self.reason = reason


class NotALedger(LedgerError):
    """The file cannot be opened as a pol ledger: missing, not an SQLite database, a database of another schema or
    of an unknown schema version, or unreadable here. Raised before anything is written to it. One line."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"not a pol ledger: {path}: {' '.join(problem.split())}")
        self.path = str(path)
        self.problem = problem


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


class CostError(BadMove):
    """A figure of the cost model (`games.cost`) out of range; `rule` is 'cost.<field>'."""


class SaltMismatch(RuleViolation):
    pass


class MarketError(GameError):
    """`games.market.run_market` cannot go on (a journal of another market, or a replay that diverged from it).
    `rule` names what was broken (e.g. 'market.journal')."""

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"market rule {rule!r} violated" + (f": {detail}" if detail else ""))
        self.rule = rule
        self.detail = detail


def _short(value: object) -> str:
    """`repr(value)` cut to 80 characters; an int too long to print whole (a refused amount may be one) is named by
    its size, since Python refuses to print ints of more than 4300 digits."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
