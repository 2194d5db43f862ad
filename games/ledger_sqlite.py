"""The SQLite ledger: the default persistent backend. One file; every operation is one `BEGIN IMMEDIATE`
transaction (WAL journal, `synchronous=FULL`), so a process killed at any instant leaves either all of an operation
or none of it, and a retried op id is answered from the `ops` table. Rules are the shared `compute_effects`.

Schema (version 1):
    meta(key PRIMARY KEY, value)                 'version', 'seed' (hex), 'supply'
    accounts(id PRIMARY KEY, balance >= 0)
    escrows(id PRIMARY KEY, balance >= 0)
    events(seq PRIMARY KEY, kind, op_id, src, dst, amount, memo, prev, hash)
    ops(op_id PRIMARY KEY, key, seq)             key = canonical text of the operation
    beacons(round_id PRIMARY KEY, value)
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from games.errors import InvalidIdentifier, LedgerCorrupt
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

__all__ = ["SCHEMA_VERSION", "SqliteLedger"]

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts(id TEXT PRIMARY KEY, balance INTEGER NOT NULL CHECK (balance >= 0));
CREATE TABLE IF NOT EXISTS escrows(id TEXT PRIMARY KEY, balance INTEGER NOT NULL CHECK (balance >= 0));
CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, op_id TEXT NOT NULL,
    src TEXT NOT NULL, dst TEXT NOT NULL, amount INTEGER NOT NULL, memo TEXT NOT NULL,
    prev BLOB NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ops(op_id TEXT PRIMARY KEY, key TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS beacons(round_id TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


class _View:
    """The reads `compute_effects` needs, inside the open transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def has_account(self, account: AccountId) -> bool:
        return self._conn.execute("SELECT 1 FROM accounts WHERE id=?", (account,)).fetchone() is not None

    def balance(self, account: AccountId) -> Amount:
        row = self._conn.execute("SELECT balance FROM accounts WHERE id=?", (account,)).fetchone()
        return int(row[0]) if row else 0

    def escrow_balance(self, escrow: EscrowId) -> Amount:
        row = self._conn.execute("SELECT balance FROM escrows WHERE id=?", (escrow,)).fetchone()
        return int(row[0]) if row else 0


def _row_to_event(row: tuple) -> Event:
    seq, kind, op_id, src, dst, amount, memo, prev, digest = row
    return Event(int(seq), kind, op_id, src, dst, int(amount), memo, bytes(prev), bytes(digest))


class SqliteLedger:
    """A `Ledger` in one SQLite file. Opening an existing file keeps its seed; `seed` (for tests) is used only
    when the file is created. Raises LedgerCorrupt if the file has an unknown schema version."""

    def __init__(self, path: str | Path, seed: bytes | None = None, *, synchronous: str = "FULL") -> None:
        if seed is not None and (not isinstance(seed, bytes) or not seed):
            raise InvalidIdentifier("ledger seed", seed)
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise InvalidIdentifier("synchronous mode", synchronous)
        self.path = Path(path)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (SCHEMA_VERSION,))
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('seed', ?)", ((seed or os.urandom(32)).hex(),))
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('supply', '0')")
        version = self._meta("version")
        if version != SCHEMA_VERSION:
            self.close()
            raise LedgerCorrupt(f"unknown schema version {version!r}")
        self._seed = bytes.fromhex(self._meta("seed"))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _meta(self, key: str) -> str:
        return str(self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def _append(self, op_id: OpId, op: Operation) -> Event:
        event = compute_event(self._count(), op_id, op, self.head())
        self._conn.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)",
                           (event.seq, event.kind, op_id, op.src, op.dst, op.amount, op.memo, event.prev,
                            event.hash))
        return event

    def _count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def apply(self, op_id: OpId, op: Operation) -> Event:
        """Apply `op` once under `op_id`, in one transaction; a retry returns the original event. Raises as
        `compute_effects`, and OperationConflict for a reused op id."""
        verify_identifier("op id", op_id)
        with self._transaction():
            row = self._conn.execute("SELECT key, seq FROM ops WHERE op_id=?", (op_id,)).fetchone()
            if row is not None:
                recorded = self._conn.execute("SELECT * FROM events WHERE seq=?", (row[1],)).fetchone()
                return get_retry_event(op_id, op, row[0], _row_to_event(recorded))
            for eff in compute_effects(op, _View(self._conn)):
                if eff.table == "open":
                    self._conn.execute("INSERT INTO accounts VALUES (?, 0)", (eff.key,))
                elif eff.table == "account":
                    self._conn.execute("UPDATE accounts SET balance = balance + ? WHERE id=?",
                                       (eff.delta, eff.key))
                else:
                    self._conn.execute("INSERT INTO escrows VALUES (?, 0) ON CONFLICT(id) DO NOTHING", (eff.key,))
                    self._conn.execute("UPDATE escrows SET balance = balance + ? WHERE id=?", (eff.delta, eff.key))
            if op.kind == "mint":
                self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key='supply'",
                                   (op.amount,))
            event = self._append(op_id, op)
            self._conn.execute("INSERT INTO ops VALUES (?,?,?)", (op_id, compute_op_key(op), event.seq))
            return event

    def beacon(self, round_id: RoundId) -> bytes:
        """The beacon for `round_id`, drawn (and logged) on first use. Raises InvalidIdentifier."""
        verify_identifier("round id", round_id)
        with self._transaction():
            row = self._conn.execute("SELECT value FROM beacons WHERE round_id=?", (round_id,)).fetchone()
            if row is not None:
                return bytes(row[0])
            value = compute_beacon(self._seed, round_id, self.head())
            self._append(f"beacon/{round_id}", Operation("beacon", dst=round_id, memo=value.hex()))
            self._conn.execute("INSERT INTO beacons VALUES (?, ?)", (round_id, value))
            return value

    def has_account(self, account: AccountId) -> bool:
        return _View(self._conn).has_account(account)

    def balance(self, account: AccountId) -> Amount:
        return _View(self._conn).balance(account)

    def escrow_balance(self, escrow: EscrowId) -> Amount:
        return _View(self._conn).escrow_balance(escrow)

    def get_accounts(self) -> dict[AccountId, Amount]:
        return {k: int(v) for k, v in self._conn.execute("SELECT id, balance FROM accounts ORDER BY id")}

    def get_escrows(self) -> dict[EscrowId, Amount]:
        return {k: int(v) for k, v in self._conn.execute("SELECT id, balance FROM escrows ORDER BY id")}

    def total_supply(self) -> Amount:
        return int(self._meta("supply"))

    def events(self, start: int = 0) -> list[Event]:
        rows = self._conn.execute("SELECT * FROM events WHERE seq >= ? ORDER BY seq", (start,))
        return [_row_to_event(r) for r in rows]

    def head(self) -> Digest:
        row = self._conn.execute("SELECT hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return bytes(row[0]) if row else GENESIS
