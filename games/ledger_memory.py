"""The in-memory ledger: the reference backend, used by tests and the simulation. Plain dicts and a list.

Validation happens in the shared `compute_effects` (amounts and the supply bound `MAX_AMOUNT` included) before
anything is written, and the event is computed before the first write too, so a refused operation changes nothing;
effects cannot fail once validated.
"""

from __future__ import annotations

import os

from games.errors import InvalidIdentifier
from games.ledger import (
    GENESIS,
    AccountId,
    Amount,
    Digest,
    EscrowId,
    Event,
    Operation,
    OpId,
    RoundId,
    compute_beacon,
    compute_effects,
    compute_event,
    compute_op_key,
    get_retry_event,
    verify_identifier,
)

__all__ = ["MemoryLedger"]


class MemoryLedger:
    """A `Ledger` held in memory. `seed` is the secret behind `beacon`; random unless given (tests pin it)."""

    def __init__(self, seed: bytes | None = None) -> None:
        if seed is not None and (not isinstance(seed, bytes) or not seed):
            raise InvalidIdentifier("ledger seed", seed, "non-empty bytes")
        self._seed = seed if seed is not None else os.urandom(32)
        self._accounts: dict[AccountId, Amount] = {}
        self._escrows: dict[EscrowId, Amount] = {}
        self._supply: Amount = 0
        self._events: list[Event] = []
        self._ops: dict[OpId, tuple[str, int]] = {}
        self._beacons: dict[RoundId, bytes] = {}

    def apply(self, op_id: OpId, op: Operation) -> Event:
        """Apply `op` once under `op_id`; a retry returns the original event. Raises as `compute_effects`, and
        OperationConflict for a reused op id."""
        verify_identifier("op id", op_id)
        if op_id in self._ops:
            key, seq = self._ops[op_id]
            return get_retry_event(op_id, op, key, self._events[seq])
        effects = compute_effects(op, self)  # raises before any write
        event = compute_event(len(self._events), op_id, op, self.head())
        key = compute_op_key(op)
        for eff in effects:
            if eff.table == "open":
                self._accounts[eff.key] = 0
            elif eff.table == "account":
                self._accounts[eff.key] += eff.delta
            elif eff.table == "escrow":
                self._escrows[eff.key] = self._escrows.get(eff.key, 0) + eff.delta
            else:
                self._supply += eff.delta
        self._events.append(event)
        self._ops[op_id] = (key, event.seq)
        return event

    def beacon(self, round_id: RoundId) -> bytes:
        """The beacon for `round_id`, drawn (and logged) on first use. Raises InvalidIdentifier."""
        verify_identifier("round id", round_id)
        if round_id not in self._beacons:
            value = compute_beacon(self._seed, round_id, self.head())
            op = Operation("beacon", dst=round_id, memo=value.hex())
            self._events.append(compute_event(len(self._events), f"beacon/{round_id}", op, self.head()))
            self._beacons[round_id] = value
        return self._beacons[round_id]

    def has_account(self, account: AccountId) -> bool:
        return account in self._accounts

    def balance(self, account: AccountId) -> Amount:
        return self._accounts.get(account, 0)

    def escrow_balance(self, escrow: EscrowId) -> Amount:
        return self._escrows.get(escrow, 0)

    def get_accounts(self) -> dict[AccountId, Amount]:
        return dict(self._accounts)

    def get_escrows(self) -> dict[EscrowId, Amount]:
        return dict(self._escrows)

    def total_supply(self) -> Amount:
        return self._supply

    def events(self, start: int = 0) -> list[Event]:
        return self._events[start:]

    def head(self) -> Digest:
        return self._events[-1].hash if self._events else GENESIS
