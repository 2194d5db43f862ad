"""The ledger: the only place money moves. A narrow interface plus the rules every backend shares.

A ledger holds *accounts* (opened explicitly) and *escrows* (named records created by the first lock), each with an
integer balance in base units. Six operations change it, each a frozen `Operation` applied under a caller-given op id:

    open(account)                    a new account with balance 0
    mint(account, amount)            the only operation that changes total supply
    transfer(src, dst, amount)       account -> account
    lock(account, escrow, amount)    account -> escrow
    release(escrow, account, amount) escrow -> any account
    slash(escrow, account, amount)   escrow -> any account (a treasury, the jackpot, the whistleblower), as a penalty

Rules every backend keeps (checked by `compute_effects`, which is shared, and by the property tests):
- atomic: an operation is validated before anything is written; a refused one changes nothing;
- one kind of number: every amount is an int (not a bool, not a float) in [1, MAX_AMOUNT], and a mint that would take
  the total supply above MAX_AMOUNT is refused (`SupplyOverflow`). Every balance is at most the supply, so every
  number a ledger stores or sums fits a signed 64-bit integer: SQLite's INTEGER, which silently turns an overflowing
  sum into a float;
- idempotent: a retry under the same op id with the same operation returns the original `Event` and changes
  nothing; the same op id with a different operation raises `OperationConflict`;
- no balance is ever negative; `total_supply()` == sum of accounts + sum of escrows == sum of all mints;
- every applied operation and every beacon draw appends an `Event` to a hash chain:
  `hash = blake3(EVENT_DOMAIN || prev_hash || canonical_json(body))`, starting from `GENESIS`;
- `beacon(round_id)` is 32 bytes nobody can know before it is drawn: blake3 of the ledger's secret seed, the round id
  and the event-log head at the moment of the first draw; later calls return the stored value.

The `Ledger` Protocol is deliberately small (one mutating method, `apply`, plus `beacon` and reads); the helpers
`open_account`, `mint`, `transfer`, `lock`, `release`, `slash` build the operation and call `apply`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from blake3 import blake3

from games.errors import (
    AccountExists,
    InsufficientFunds,
    InvalidAmount,
    InvalidIdentifier,
    LedgerCorrupt,
    OperationConflict,
    SupplyOverflow,
    UnknownAccount,
    UnknownEscrow,
)

__all__ = [
    "EVENT_DOMAIN",
    "GENESIS",
    "MAX_AMOUNT",
    "MAX_ID_LENGTH",
    "OP_KINDS",
    "AccountId",
    "Amount",
    "Digest",
    "Effect",
    "EscrowId",
    "Event",
    "Ledger",
    "LedgerView",
    "OpId",
    "Operation",
    "RoundId",
    "compute_beacon",
    "compute_effects",
    "compute_event",
    "compute_event_hash",
    "compute_op_key",
    "event_to_dict",
    "get_retry_event",
    "is_amount",
    "lock",
    "mint",
    "open_account",
    "release",
    "slash",
    "transfer",
    "verify_event_chain",
    "verify_identifier",
    "verify_ledger",
]

Amount = int  # base units, never negative, never above MAX_AMOUNT
AccountId = str
EscrowId = str
OpId = str
RoundId = str
Digest = bytes

OP_KINDS = ("open", "mint", "transfer", "lock", "release", "slash")
GENESIS: Digest = blake3(b"pol.games.ledger.genesis.v1").digest()
EVENT_DOMAIN = b"pol.games.ledger.event.v1\x00"
BEACON_DOMAIN = b"pol.games.ledger.beacon.v1\x00"
MAX_ID_LENGTH = 256
# The largest amount, balance or total supply: SQLite's largest INTEGER (signed 64-bit), so that the SQLite backend
# stores every number exactly and both backends refuse the same operations. About 9.2e18 base units (9.2e9 whole
# units at 9 decimals), far beyond any fee or stake a market posts.
MAX_AMOUNT: int = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Operation:
    """One ledger operation. `src`/`dst` are account or escrow ids depending on `kind` (see module docstring)."""

    kind: str
    src: str = ""
    dst: str = ""
    amount: Amount = 0
    memo: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the append-only, hash-chained event log. Beacon draws have kind 'beacon', dst = round id and
    memo = the beacon value in hex."""

    seq: int
    kind: str
    op_id: OpId
    src: str
    dst: str
    amount: Amount
    memo: str
    prev: Digest
    hash: Digest


@dataclass(frozen=True, slots=True)
class Effect:
    """One change an operation makes: `table` is 'open', 'account', 'escrow' or 'supply' (key ''); `delta` is
    signed."""

    table: str
    key: str
    delta: Amount


class LedgerView(Protocol):
    """The reads `compute_effects` needs."""

    def has_account(self, account: AccountId) -> bool: ...
    def balance(self, account: AccountId) -> Amount: ...
    def escrow_balance(self, escrow: EscrowId) -> Amount: ...
    def total_supply(self) -> Amount: ...


@runtime_checkable
class Ledger(Protocol):
    """The interface every backend implements (in-memory, SQLite; a chain adapter later)."""

    def apply(self, op_id: OpId, op: Operation) -> Event: ...
    def beacon(self, round_id: RoundId) -> bytes: ...
    def has_account(self, account: AccountId) -> bool: ...
    def balance(self, account: AccountId) -> Amount: ...
    def escrow_balance(self, escrow: EscrowId) -> Amount: ...
    def get_accounts(self) -> dict[AccountId, Amount]: ...
    def get_escrows(self) -> dict[EscrowId, Amount]: ...
    def total_supply(self) -> Amount: ...
    def events(self, start: int = 0) -> list[Event]: ...
    def head(self) -> Digest: ...


# ---------------------------------------------------------------------------------------------------- pure rules


def verify_identifier(what: str, value: object) -> None:
    """Raises InvalidIdentifier unless `value` is a non-empty str of at most MAX_ID_LENGTH characters."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidIdentifier(what, value)


def is_amount(amount: object) -> bool:
    """Whether `amount` is an int (not a bool) in [1, MAX_AMOUNT]."""
    return type(amount) is int and 1 <= amount <= MAX_AMOUNT


def _verify_amount(amount: object) -> None:
    if not is_amount(amount):
        raise InvalidAmount(amount, MAX_AMOUNT)


def _verify_no_source(op: Operation) -> None:
    if op.src != "":
        raise InvalidIdentifier(f"source of {op.kind}", op.src, "must be empty")


def _verify_account(view: LedgerView, account: AccountId) -> None:
    verify_identifier("account", account)
    if not view.has_account(account):
        raise UnknownAccount(account)


def _verify_covers(holder: str, available: Amount, amount: Amount) -> None:
    if available < amount:
        raise InsufficientFunds(holder, amount, available)


def compute_effects(op: Operation, view: LedgerView) -> tuple[Effect, ...]:
    """The changes `op` makes to the ledger seen through `view`. Pure: reads only.

    Raises InvalidIdentifier, InvalidAmount (its subclass SupplyOverflow for a mint that would take the total supply
    above MAX_AMOUNT), UnknownAccount, AccountExists, UnknownEscrow, InsufficientFunds.
    """
    if op.kind not in OP_KINDS:
        raise InvalidIdentifier("operation kind", op.kind, f"one of {', '.join(OP_KINDS)}")
    if not isinstance(op.memo, str) or len(op.memo) > MAX_ID_LENGTH:
        raise InvalidIdentifier("memo", op.memo, f"a str of at most {MAX_ID_LENGTH} characters")
    if op.kind == "open":
        verify_identifier("account", op.dst)
        _verify_no_source(op)
        if type(op.amount) is not int or op.amount != 0:
            raise InvalidAmount(op.amount, message="open takes no amount: its amount must be the int 0")
        if view.has_account(op.dst):
            raise AccountExists(op.dst)
        return (Effect("open", op.dst, 0),)
    _verify_amount(op.amount)
    if op.kind == "mint":
        _verify_no_source(op)
        _verify_account(view, op.dst)
        supply = view.total_supply()
        if op.amount > MAX_AMOUNT - supply:
            raise SupplyOverflow(op.amount, supply, MAX_AMOUNT)
        return (Effect("account", op.dst, op.amount), Effect("supply", "", op.amount))
    if op.kind in ("transfer", "lock"):
        _verify_account(view, op.src)
        _verify_covers(op.src, view.balance(op.src), op.amount)
        if op.kind == "transfer":
            _verify_account(view, op.dst)
            if op.src == op.dst:
                raise InvalidIdentifier("transfer destination", op.dst, "must differ from the source")
            return (Effect("account", op.src, -op.amount), Effect("account", op.dst, op.amount))
        verify_identifier("escrow", op.dst)
        return (Effect("account", op.src, -op.amount), Effect("escrow", op.dst, op.amount))
    # release / slash: escrow -> account
    verify_identifier("escrow", op.src)
    held = view.escrow_balance(op.src)
    if held == 0:
        raise UnknownEscrow(op.src)
    _verify_covers(op.src, held, op.amount)
    _verify_account(view, op.dst)
    return (Effect("escrow", op.src, -op.amount), Effect("account", op.dst, op.amount))


def compute_op_key(op: Operation) -> str:
    """Canonical text of an operation: what a retry under the same op id must match exactly."""
    return json.dumps([op.kind, op.src, op.dst, op.amount, op.memo], separators=(",", ":"))


def _event_body(seq: int, kind: str, op_id: str, src: str, dst: str, amount: int, memo: str) -> bytes:
    body = {"seq": seq, "kind": kind, "op_id": op_id, "src": src, "dst": dst, "amount": amount, "memo": memo}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_event_hash(prev: Digest, seq: int, kind: str, op_id: str, src: str, dst: str, amount: int,
                       memo: str) -> Digest:
    """blake3(EVENT_DOMAIN || prev || canonical JSON body)."""
    return blake3(EVENT_DOMAIN + prev + _event_body(seq, kind, op_id, src, dst, amount, memo)).digest()


def compute_event(seq: int, op_id: OpId, op: Operation, prev: Digest) -> Event:
    """The event recording `op` at position `seq` after head `prev`."""
    digest = compute_event_hash(prev, seq, op.kind, op_id, op.src, op.dst, op.amount, op.memo)
    return Event(seq, op.kind, op_id, op.src, op.dst, op.amount, op.memo, prev, digest)


def compute_beacon(seed: bytes, round_id: RoundId, head: Digest) -> bytes:
    """The beacon value for `round_id` drawn when the event log's head is `head`."""
    return blake3(BEACON_DOMAIN + seed + len(round_id).to_bytes(4, "big") + round_id.encode() + head).digest()


def get_retry_event(op_id: OpId, op: Operation, recorded_key: str, recorded: Event) -> Event:
    """The original event for a retried op id. Raises OperationConflict if the operation differs."""
    try:
        given = compute_op_key(op)
    except (TypeError, ValueError):
        # a field JSON cannot hold (an object, an int of over 4300 digits): the operation differs from every
        # recorded one, since only valid operations are recorded
        given = "an operation with a field that is not text or a number"
    if given != recorded_key:
        raise OperationConflict(op_id, recorded_key, given)
    return recorded


def verify_event_chain(events: list[Event]) -> Digest:
    """Recompute every hash from GENESIS; return the head. Raises LedgerCorrupt on a gap or a wrong hash."""
    head = GENESIS
    for i, ev in enumerate(events):
        want = compute_event_hash(head, ev.seq, ev.kind, ev.op_id, ev.src, ev.dst, ev.amount, ev.memo)
        if ev.seq != i or ev.prev != head or ev.hash != want:
            raise LedgerCorrupt(f"event {i} does not chain")
        head = ev.hash
    return head


def verify_ledger(ledger: Ledger) -> None:
    """Check a ledger's invariants. Raises LedgerCorrupt naming the first one broken."""
    accounts, escrows = ledger.get_accounts(), ledger.get_escrows()
    negative = [k for k, v in (*accounts.items(), *escrows.items()) if v < 0]
    if negative:
        raise LedgerCorrupt(f"negative balance in {negative[0]!r}")
    held = sum(accounts.values()) + sum(escrows.values())
    events = ledger.events()
    minted = sum(ev.amount for ev in events if ev.kind == "mint")
    if held != ledger.total_supply() or minted != held:
        raise LedgerCorrupt(f"supply {ledger.total_supply()} minted {minted} held {held}")
    if verify_event_chain(events) != ledger.head():
        raise LedgerCorrupt("head is not the last event's hash")


def event_to_dict(ev: Event) -> dict[str, object]:
    """A JSON-ready view of an event (digests in hex)."""
    return {"seq": ev.seq, "kind": ev.kind, "op_id": ev.op_id, "src": ev.src, "dst": ev.dst,
            "amount": ev.amount, "memo": ev.memo, "prev": ev.prev.hex(), "hash": ev.hash.hex()}


# ---------------------------------------------------------------------------------------------------- helpers


def open_account(ledger: Ledger, op_id: OpId, account: AccountId) -> Event:
    """Open `account` with balance 0. Raises AccountExists, InvalidIdentifier, OperationConflict."""
    return ledger.apply(op_id, Operation("open", dst=account))


def mint(ledger: Ledger, op_id: OpId, account: AccountId, amount: Amount) -> Event:
    """Create `amount` new units in `account`. Raises UnknownAccount, InvalidAmount, SupplyOverflow (the supply
    would pass MAX_AMOUNT), OperationConflict."""
    return ledger.apply(op_id, Operation("mint", dst=account, amount=amount))


def transfer(ledger: Ledger, op_id: OpId, src: AccountId, dst: AccountId, amount: Amount) -> Event:
    """Move `amount` between accounts. Raises UnknownAccount, InsufficientFunds, InvalidAmount, OperationConflict."""
    return ledger.apply(op_id, Operation("transfer", src=src, dst=dst, amount=amount))


def lock(ledger: Ledger, op_id: OpId, account: AccountId, escrow: EscrowId, amount: Amount) -> Event:
    """Move `amount` from `account` into `escrow`. Raises UnknownAccount, InsufficientFunds, InvalidAmount,
    OperationConflict."""
    return ledger.apply(op_id, Operation("lock", src=account, dst=escrow, amount=amount))


def release(ledger: Ledger, op_id: OpId, escrow: EscrowId, account: AccountId, amount: Amount) -> Event:
    """Pay `amount` out of `escrow` to `account`. Raises UnknownEscrow, InsufficientFunds, UnknownAccount,
    OperationConflict."""
    return ledger.apply(op_id, Operation("release", src=escrow, dst=account, amount=amount))


def slash(ledger: Ledger, op_id: OpId, escrow: EscrowId, account: AccountId, amount: Amount,
          reason: str = "") -> Event:
    """Take `amount` of a locked stake from `escrow` and give it to `account` as a penalty. Raises as `release`."""
    return ledger.apply(op_id, Operation("slash", src=escrow, dst=account, amount=amount, memo=reason))
