"""The SQLite ledger: the default persistent backend. One file; every operation is one `BEGIN IMMEDIATE`
transaction (WAL journal, `synchronous=FULL`), so a process killed at any instant leaves either all of an operation
or none of it, and a retried op id is answered from the `ops` table. Rules are the shared `compute_effects`.

Schema (version 1):
    meta(key PRIMARY KEY, value)                 'version', 'seed' (hex), 'supply' (decimal text of an int)
    accounts(id PRIMARY KEY, balance >= 0)
    escrows(id PRIMARY KEY, balance >= 0)
    events(seq PRIMARY KEY, kind, op_id, src, dst, amount, memo, prev, hash)
    ops(op_id PRIMARY KEY, key, seq)             key = canonical text of the operation
    beacons(round_id PRIMARY KEY, value)

Numbers: every amount is at most MAX_AMOUNT (SQLite's largest INTEGER), checked by `compute_effects` before anything
is written, and every new balance and the new supply are computed in Python and stored as they are: no SQL
arithmetic, which would turn an overflowing sum into a float. Reads are strict: a stored number that is not an
integer in [0, MAX_AMOUNT] (or any other mistyped field) raises LedgerCorrupt instead of being coerced.

Opening: a file that exists and is not empty is first probed read-only (its first bytes, then through a read-only
connection); unless it is an SQLite database holding pol's tables, of this schema version, or no tables at all, it
is refused with NotALedger and left untouched. Only `create=True` (the default) makes a new ledger: in a missing or
empty file, or an SQLite database without tables; `create=False` refuses those too.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Self

from games.errors import InvalidIdentifier, LedgerCorrupt, NotALedger
from games.ledger import (
    GENESIS,
    MAX_AMOUNT,
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
_STATEMENTS = [statement for statement in _SCHEMA.split(";") if statement.strip()]
_SQLITE_HEADER = b"SQLite format 3\x00"
_TIMEOUT = 60.0  # seconds to wait for another connection's lock
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


def _get_tables(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Each table of the database (SQLite's own left out) and its column names, in order."""
    names = [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")]
    return {name: [row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (name,))] for name in names}


def _compute_schema_columns() -> dict[str, list[str]]:
    with closing(sqlite3.connect(":memory:")) as conn:
        for statement in _STATEMENTS:
            conn.execute(statement)
        return _get_tables(conn)


_COLUMNS = _compute_schema_columns()


def _verify_schema(path: Path, conn: sqlite3.Connection, tables: dict[str, list[str]]) -> None:
    """Raises NotALedger unless `tables` (those of `conn`'s database) holds every table of pol's schema with its
    columns, and the database says it is of this schema version."""
    missing = sorted(set(_COLUMNS) - set(tables))
    if missing:
        raise NotALedger(path, f"an SQLite database of another schema (no table {', '.join(missing)})")
    for name, columns in _COLUMNS.items():
        if tables[name] != columns:
            raise NotALedger(path, f"table {name} has columns {tables[name]}, a pol ledger's has {columns}")
    row = conn.execute("SELECT value FROM meta WHERE key='version'").fetchone()
    version = None if row is None else row[0]
    if version != SCHEMA_VERSION:
        raise NotALedger(path, f"schema version {version!r}; this pol reads version {SCHEMA_VERSION!r}")


def _get_header(path: Path) -> bytes | None:
    """The first 20 bytes of the file at `path` (SQLite's magic string, page size, format versions), or None if
    there is no file. Raises NotALedger if it is not a regular file (a directory, a pipe) or cannot be read (a name
    too long, no permission)."""
    try:
        if not path.exists():
            return None
        if not path.is_file():
            raise NotALedger(path, "not a regular file")
        with path.open("rb") as file:
            return file.read(20)
    except OSError as exc:
        raise NotALedger(path, f"cannot read it ({exc.strerror or exc})") from exc


def _is_blank(path: Path, header: bytes) -> bool:
    """Whether the file at `path`, which starts with `header`, is an SQLite database without any table (a ledger
    may be made in it); if it has tables, checks that they are a pol ledger's, of this schema version. Reads through
    a read-only connection, closed again. Raises NotALedger (an sqlite3 error included: not a database, locked,
    unreadable)."""
    if header[:len(_SQLITE_HEADER)] != _SQLITE_HEADER:
        raise NotALedger(path, "not an SQLite database (it does not start with SQLite's header)")
    uri = f"{path.absolute().as_uri()}?mode=ro"
    if header[18:20] == b"\x02\x02" and not Path(f"{path}-wal").exists():
        # a WAL database nobody has open: read the file alone, so that no -wal/-shm is left beside it
        uri += "&immutable=1"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=_TIMEOUT)) as conn:
            tables = _get_tables(conn)
            if tables:
                _verify_schema(path, conn, tables)
    except sqlite3.Error as exc:
        raise NotALedger(path, f"cannot read it as an SQLite database ({exc})") from exc
    return not tables


def _set_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the database in WAL mode (a no-op when it is). Switching needs the database to itself for a moment, and
    SQLite answers 'database is locked' at once, without waiting, while another connection is writing (as when
    several processes create one ledger together); so it retries for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def _get_amount(value: object, where: str) -> Amount:
    """A stored number, exactly as stored. Raises LedgerCorrupt unless it is an int in [0, MAX_AMOUNT]."""
    if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
        raise LedgerCorrupt(f"{where} holds {value!r:.40}, not an integer amount")
    return value


def _get_digest(value: object, where: str) -> bytes:
    if type(value) is not bytes:
        raise LedgerCorrupt(f"{where} holds {value!r:.40}, not bytes")
    return value


def _row_to_event(row: tuple) -> Event:
    seq, kind, op_id, src, dst, amount, memo, prev, digest = row
    where = f"event {seq!r:.20}"
    if type(seq) is not int or not all(type(v) is str for v in (kind, op_id, src, dst, memo)):
        raise LedgerCorrupt(f"{where} has a mistyped field")
    return Event(seq, kind, op_id, src, dst, _get_amount(amount, where), memo, _get_digest(prev, where),
                 _get_digest(digest, where))


class _View:
    """The reads `compute_effects` needs, inside the open transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def has_account(self, account: AccountId) -> bool:
        return self._conn.execute("SELECT 1 FROM accounts WHERE id=?", (account,)).fetchone() is not None

    def balance(self, account: AccountId) -> Amount:
        row = self._conn.execute("SELECT balance FROM accounts WHERE id=?", (account,)).fetchone()
        return _get_amount(row[0], f"account {account!r}") if row else 0

    def escrow_balance(self, escrow: EscrowId) -> Amount:
        row = self._conn.execute("SELECT balance FROM escrows WHERE id=?", (escrow,)).fetchone()
        return _get_amount(row[0], f"escrow {escrow!r}") if row else 0

    def total_supply(self) -> Amount:
        row = self._conn.execute("SELECT value FROM meta WHERE key='supply'").fetchone()
        text = None if row is None else row[0]
        if not isinstance(text, str) or not _DECIMAL.fullmatch(text) or int(text) > MAX_AMOUNT:
            raise LedgerCorrupt(f"the stored supply is {text!r:.40}, not the decimal text of an integer amount")
        return int(text)


class SqliteLedger:
    """A `Ledger` in one SQLite file. Opening an existing file keeps its seed; `seed` (for tests) is used only
    when the file is created. With `create=False` only an existing ledger is opened (`pol ledger show`): nothing is
    created, and a file that is not a ledger is left untouched.

    Raises NotALedger if the file is not a pol ledger of this schema version (with `create=False`, also if it is
    missing, empty or a database without tables; any sqlite3 error while opening becomes one), LedgerCorrupt if its
    stored seed or supply is malformed, InvalidIdentifier for a bad `seed` or `synchronous`."""

    def __init__(self, path: str | Path, seed: bytes | None = None, *, synchronous: str = "FULL",
                 create: bool = True) -> None:
        if seed is not None and (not isinstance(seed, bytes) or not seed):
            raise InvalidIdentifier("ledger seed", seed, "non-empty bytes")
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise InvalidIdentifier("synchronous mode", synchronous, "OFF, NORMAL, FULL or EXTRA")
        self.path = Path(path)
        header = _get_header(self.path)
        blank = _is_blank(self.path, header) if header else True
        if blank and not create:
            raise NotALedger(self.path, "no such file" if header is None else
                             "an SQLite database with no tables" if header else "an empty file")
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=_TIMEOUT)
        except sqlite3.Error as exc:
            raise NotALedger(self.path, f"cannot open it ({exc})") from exc
        try:
            self._open(seed, synchronous, create=blank)
        except sqlite3.Error as exc:
            self._conn.close()
            raise NotALedger(self.path, f"cannot open it ({exc})") from exc
        except BaseException:
            self._conn.close()
            raise

    def _open(self, seed: bytes | None, synchronous: str, *, create: bool) -> None:
        if create:  # in one transaction, checking again: another process may be making this ledger too
            with self._transaction():
                tables = _get_tables(self._conn)
                if tables:
                    _verify_schema(self.path, self._conn, tables)
                else:
                    for statement in _STATEMENTS:
                        self._conn.execute(statement)
                    self._conn.execute("INSERT INTO meta VALUES ('version', ?)", (SCHEMA_VERSION,))
                    self._conn.execute("INSERT INTO meta VALUES ('seed', ?)", ((seed or os.urandom(32)).hex(),))
                    self._conn.execute("INSERT INTO meta VALUES ('supply', '0')")
        _set_wal(self._conn, _TIMEOUT)
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        row = self._conn.execute("SELECT value FROM meta WHERE key='seed'").fetchone()
        stored = None if row is None else row[0]
        if not isinstance(stored, str) or not re.fullmatch(r"(?:[0-9a-f]{2})+", stored):
            raise LedgerCorrupt(f"the stored seed is {stored!r:.40}, not hex")
        self._seed = bytes.fromhex(stored)
        _View(self._conn).total_supply()  # raises LedgerCorrupt now rather than at the first read

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
                if recorded is None or type(row[0]) is not str:
                    raise LedgerCorrupt(f"op id {op_id!r} is recorded without its event")
                return get_retry_event(op_id, op, row[0], _row_to_event(recorded))
            view = _View(self._conn)
            for eff in compute_effects(op, view):  # new values computed here, exact: no SQL arithmetic
                if eff.table == "open":
                    self._conn.execute("INSERT INTO accounts VALUES (?, 0)", (eff.key,))
                elif eff.table == "account":
                    self._conn.execute("UPDATE accounts SET balance=? WHERE id=?",
                                       (view.balance(eff.key) + eff.delta, eff.key))
                elif eff.table == "escrow":
                    self._conn.execute("INSERT INTO escrows VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                                       "balance=excluded.balance", (eff.key, view.escrow_balance(eff.key) + eff.delta))
                else:
                    self._conn.execute("UPDATE meta SET value=? WHERE key='supply'",
                                       (str(view.total_supply() + eff.delta),))
            event = self._append(op_id, op)
            self._conn.execute("INSERT INTO ops VALUES (?,?,?)", (op_id, compute_op_key(op), event.seq))
            return event

    def beacon(self, round_id: RoundId) -> bytes:
        """The beacon for `round_id`, drawn (and logged) on first use. Raises InvalidIdentifier."""
        verify_identifier("round id", round_id)
        with self._transaction():
            row = self._conn.execute("SELECT value FROM beacons WHERE round_id=?", (round_id,)).fetchone()
            if row is not None:
                return _get_digest(row[0], f"beacon {round_id!r}")
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

    def total_supply(self) -> Amount:
        return _View(self._conn).total_supply()

    def get_accounts(self) -> dict[AccountId, Amount]:
        rows = self._conn.execute("SELECT id, balance FROM accounts ORDER BY id")
        return {k: _get_amount(v, f"account {k!r}") for k, v in rows}

    def get_escrows(self) -> dict[EscrowId, Amount]:
        rows = self._conn.execute("SELECT id, balance FROM escrows ORDER BY id")
        return {k: _get_amount(v, f"escrow {k!r}") for k, v in rows}

    def events(self, start: int = 0) -> list[Event]:
        rows = self._conn.execute("SELECT * FROM events WHERE seq >= ? ORDER BY seq", (start,))
        return [_row_to_event(r) for r in rows]

    def head(self) -> Digest:
        row = self._conn.execute("SELECT hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return _get_digest(row[0], "the last event's hash") if row else GENESIS
