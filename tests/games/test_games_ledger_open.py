"""Opening an SQLite ledger (what `pol ledger show FILE` does with `SqliteLedger(FILE, create=False)`): a file that is
not a pol ledger raises one typed, one-line NotALedger (exit code 2) and is left exactly as it was, sidecar files
included; a ledger whose stored numbers, seed or events are mistyped raises LedgerCorrupt (exit code 1) instead of a
ValueError or TypeError, the very file the old `CAST(value AS INTEGER) + ?` supply update wrote included."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from games.errors import LedgerCorrupt, NotALedger
from games.ledger import mint, open_account, transfer, verify_ledger
from games.ledger_sqlite import SqliteLedger, _set_wal
from games.views import render_ledger
from pol.errors import EXIT_FAILED, EXIT_USAGE


def _sqlite(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _make_ledger(path: Path) -> None:
    with SqliteLedger(path, b"seed") as ledger:
        open_account(ledger, "open/a", "a")
        open_account(ledger, "open/b", "b")
        mint(ledger, "mint/a", "a", 100)
        transfer(ledger, "pay", "a", "b", 30)
        ledger.beacon("r1")


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(5000))


def _text(path: Path) -> None:
    path.write_text("accounts:\n  alice 100\n")


def _one_byte(path: Path) -> None:
    path.write_bytes(b"x")


def _header_then_garbage(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + random.Random(1).randbytes(8000))


def _other_schema(path: Path) -> None:
    _sqlite(path, "CREATE TABLE people(name TEXT, age INTEGER)", "INSERT INTO people VALUES ('ann', 40)")


def _other_schema_wal(path: Path) -> None:
    _other_schema(path)
    _sqlite(path, "PRAGMA journal_mode=WAL")


def _no_tables(path: Path) -> None:
    _sqlite(path, "PRAGMA user_version=7")


def _same_names_other_columns(path: Path) -> None:
    _make_ledger(path)
    _sqlite(path, "ALTER TABLE accounts ADD COLUMN note TEXT")


def _other_version(path: Path) -> None:
    _make_ledger(path)
    _sqlite(path, "UPDATE meta SET value='2' WHERE key='version'")


def _no_version(path: Path) -> None:
    _make_ledger(path)
    _sqlite(path, "DELETE FROM meta WHERE key='version'")


NOT_LEDGERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "random bytes": (_random_bytes, "not an SQLite database"),
    "text": (_text, "not an SQLite database"),
    "one byte": (_one_byte, "not an SQLite database"),
    "header then garbage": (_header_then_garbage, "cannot read it as an SQLite database"),
    "other schema": (_other_schema, "another schema (no table accounts, beacons, escrows, events, meta, ops)"),
    "other schema, WAL": (_other_schema_wal, "another schema"),
    "same names, other columns": (_same_names_other_columns, "table accounts has columns ['id', 'balance', 'note']"),
    "other version": (_other_version, "schema version '2'; this pol reads version '1'"),
    "no version": (_no_version, "schema version None"),
}


def _state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of `folder` with its bytes and modification time: what 'left untouched' means."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("create", [False, True])
@pytest.mark.parametrize("kind", NOT_LEDGERS)
def test_not_a_ledger_is_refused_and_left_untouched(tmp_path: Path, kind: str, create: bool) -> None:
    make, problem = NOT_LEDGERS[kind]
    path = tmp_path / "file.db"
    make(path)
    before = _state(tmp_path)
    with pytest.raises(NotALedger) as info:
        SqliteLedger(path, create=create)
    message = str(info.value)
    assert message.startswith(f"not a pol ledger: {path}: ") and problem in message, message
    assert "\n" not in message
    assert info.value.exit_code == EXIT_USAGE and info.value.path == str(path)
    assert _state(tmp_path) == before, "the file (or a sidecar) was modified"


def test_missing_or_empty_file_with_create_false(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    with pytest.raises(NotALedger, match="no such file"):
        SqliteLedger(missing, create=False)
    assert list(tmp_path.iterdir()) == [], "nothing was created"
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(NotALedger, match="an empty file"):
        SqliteLedger(empty, create=False)
    assert list(tmp_path.iterdir()) == [empty] and empty.read_bytes() == b""


def test_create_false_refuses_a_database_without_tables(tmp_path: Path) -> None:
    path = tmp_path / "file.db"
    _no_tables(path)
    before = _state(tmp_path)
    with pytest.raises(NotALedger, match="an SQLite database with no tables"):
        SqliteLedger(path, create=False)
    assert _state(tmp_path) == before


def test_create_true_makes_a_ledger_in_a_missing_or_empty_file_or_database(tmp_path: Path) -> None:
    empty, blank = tmp_path / "empty.db", tmp_path / "blank.db"
    empty.touch()
    _no_tables(blank)
    for path in (empty, blank, tmp_path / "new.db"):
        with SqliteLedger(path, b"s") as ledger:
            open_account(ledger, "o", "a")
        with SqliteLedger(path, create=False) as ledger:
            assert ledger.get_accounts() == {"a": 0}


def test_processes_creating_one_ledger_together(tmp_path: Path) -> None:
    """Several connections open (and so create) one new ledger at the same instant: each gets the same ledger, none
    a 'database is locked' (switching to WAL answers that at once, without waiting, and is retried)."""
    for trial in range(10):
        path = tmp_path / f"l{trial}.db"
        barrier = threading.Barrier(8)
        failures: list[BaseException] = []

        def make(i: int, path: Path = path, barrier: threading.Barrier = barrier,
                 failures: list[BaseException] = failures) -> None:
            barrier.wait()
            try:
                with SqliteLedger(path, b"s", synchronous="OFF") as ledger:
                    open_account(ledger, f"open/{i}", f"a{i}")
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        with SqliteLedger(path, create=False) as ledger:
            assert ledger.get_accounts() == {f"a{i}": 0 for i in range(8)}
            verify_ledger(ledger)


def test_switching_to_wal_gives_up_after_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    _sqlite(path, "CREATE TABLE t(x)")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    conn = sqlite3.connect(path, timeout=0.01)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            _set_wal(conn, 0.05)
        holder.execute("COMMIT")
        _set_wal(conn, 0.05)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
        holder.close()


def test_unreadable_or_unopenable_paths(tmp_path: Path) -> None:
    for create in (False, True):
        with pytest.raises(NotALedger, match="not a regular file") as info:  # a directory
            SqliteLedger(tmp_path, create=create)
        assert info.value.exit_code == EXIT_USAGE
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it to read would block
    with pytest.raises(NotALedger, match="not a regular file"):
        SqliteLedger(fifo, create=False)
    with pytest.raises(NotALedger, match="cannot read it .File name too long."):
        SqliteLedger(tmp_path / ("x" * 300), create=False)
    with pytest.raises(NotALedger, match="cannot open it"):  # sqlite3.OperationalError: unable to open database file
        SqliteLedger(tmp_path / "no-such-dir" / "l.db", create=True)


def test_an_sqlite_error_while_opening_is_converted_and_the_connection_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[sqlite3.Connection] = []

    def failing_open(self: SqliteLedger, *args: object, **kwargs: object) -> None:
        opened.append(self._conn)
        self._conn.execute("SELECT * FROM no_such_table")  # a real sqlite3.OperationalError

    monkeypatch.setattr(SqliteLedger, "_open", failing_open)
    with pytest.raises(NotALedger, match="cannot open it .no such table: no_such_table."):
        SqliteLedger(tmp_path / "l.db")
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].execute("SELECT 1")


def test_show_reads_a_ledger_without_writing_it(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    _make_ledger(path)
    before = _state(tmp_path)
    with SqliteLedger(path, create=False) as ledger:
        verify_ledger(ledger)
        assert "supply 100" in render_ledger(ledger)
        assert ledger.get_accounts() == {"a": 70, "b": 30}
    assert _state(tmp_path) == before


# ---------------------------------------------------------------------------------------------------- corrupt


def _old_supply_overflow(path: Path) -> None:
    """What main wrote for `mint 2**62` twice: the supply became the text of a float, the balance a REAL."""
    with SqliteLedger(path, b"seed") as ledger:
        open_account(ledger, "open/a", "a")
    for _ in range(2):
        _sqlite(path, "UPDATE meta SET value = CAST(value AS INTEGER) + 4611686018427387904 WHERE key='supply'",
                "UPDATE accounts SET balance = balance + 4611686018427387904 WHERE id='a'")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='supply'").fetchone()[0] == "9.22337203685478e+18"
    conn.close()


@pytest.mark.parametrize(("statement", "problem"), [
    ("UPDATE meta SET value='zz' WHERE key='seed'", "the stored seed is 'zz', not hex"),
    ("DELETE FROM meta WHERE key='seed'", "the stored seed is None"),
    ("UPDATE meta SET value='1e3' WHERE key='supply'", "the stored supply is '1e3'"),
    ("UPDATE meta SET value='0100' WHERE key='supply'", "the stored supply is '0100'"),
    ("UPDATE meta SET value='9223372036854775808' WHERE key='supply'", "the stored supply is '9223372036854775808'"),
    ("DELETE FROM meta WHERE key='supply'", "the stored supply is None"),
])
@pytest.mark.parametrize("create", [False, True])
def test_malformed_meta_is_corrupt(tmp_path: Path, statement: str, problem: str, create: bool) -> None:
    path = tmp_path / "l.db"
    _make_ledger(path)
    _sqlite(path, statement)
    with pytest.raises(LedgerCorrupt) as info:
        SqliteLedger(path, create=create)
    assert problem in str(info.value) and info.value.exit_code == EXIT_FAILED


def test_the_old_overflowed_supply_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    _old_supply_overflow(path)
    with pytest.raises(LedgerCorrupt, match="the stored supply is '9.22337203685478e"):
        SqliteLedger(path, create=False)
    _sqlite(path, "UPDATE meta SET value='0' WHERE key='supply'")  # mend the supply: the REAL balance remains
    with SqliteLedger(path, create=False) as ledger, pytest.raises(LedgerCorrupt, match="account 'a' holds 9.2"):
        render_ledger(ledger)


def _open_tampered(path: Path, *statements: str) -> SqliteLedger:
    _make_ledger(path)
    _sqlite(path, *statements)
    return SqliteLedger(path, create=False)


@pytest.mark.parametrize(("statement", "read", "problem"), [
    ("UPDATE accounts SET balance='lots' WHERE id='b'", lambda lg: lg.get_accounts(), "account 'b' holds 'lots'"),
    ("UPDATE accounts SET balance=30.5 WHERE id='b'", lambda lg: lg.balance("b"), "account 'b' holds 30.5"),
    ("INSERT INTO escrows VALUES ('e', 2.5)", lambda lg: lg.get_escrows(), "escrow 'e' holds 2.5"),
    ("INSERT INTO escrows VALUES ('e', 'x')", lambda lg: lg.escrow_balance("e"), "escrow 'e' holds 'x'"),
    ("UPDATE events SET amount=1.5 WHERE seq=2", lambda lg: lg.events(), "event 2 holds 1.5"),
    ("UPDATE events SET kind=x'00' WHERE seq=1", lambda lg: lg.events(), "event 1 has a mistyped field"),
    ("UPDATE events SET prev='text' WHERE seq=1", lambda lg: lg.events(), "event 1 holds 'text', not bytes"),
    ("UPDATE events SET hash='text' WHERE seq=4", lambda lg: lg.head(), "the last event's hash holds 'text'"),
    ("UPDATE beacons SET value='text'", lambda lg: lg.beacon("r1"), "beacon 'r1' holds 'text'"),
    ("DELETE FROM events WHERE seq=3", lambda lg: transfer(lg, "pay", "a", "b", 30),
     "op id 'pay' is recorded without its event"),
])
def test_mistyped_stored_values_are_corrupt(tmp_path: Path, statement: str,
                                            read: Callable[[SqliteLedger], object], problem: str) -> None:
    with _open_tampered(tmp_path / "l.db", statement) as ledger:
        with pytest.raises(LedgerCorrupt) as info:
            read(ledger)
        assert problem in str(info.value), str(info.value)


def test_a_corrupt_balance_refuses_an_operation_that_reads_it(tmp_path: Path) -> None:
    with _open_tampered(tmp_path / "l.db", "UPDATE accounts SET balance=30.5 WHERE id='b'") as ledger:
        events = len(ledger.events())
        with pytest.raises(LedgerCorrupt):
            transfer(ledger, "pay/2", "b", "a", 1)
        assert len(ledger.events()) == events


def test_a_ledger_in_use_is_read_through_its_wal(tmp_path: Path) -> None:
    """While another connection writes (its changes still in the -wal file), the read-only probe reads through the
    WAL: it does not mistake the not yet checkpointed file for an empty database."""
    path = tmp_path / "l.db"
    with SqliteLedger(path, b"s") as writer:
        open_account(writer, "open/a", "a")
        mint(writer, "mint", "a", 5)
        assert (tmp_path / "l.db-wal").exists()
        with SqliteLedger(path, create=False) as reader:
            assert reader.get_accounts() == {"a": 5}
            assert reader.events() == writer.events()


def test_a_foreign_database_in_use_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "file.db"
    _other_schema_wal(path)
    writer = sqlite3.connect(path)
    writer.execute("INSERT INTO people VALUES ('bo', 3)")
    writer.commit()  # pending in file.db-wal while the writer stays open
    before = path.read_bytes()
    with pytest.raises(NotALedger, match="another schema"):
        SqliteLedger(path, create=False)
    assert path.read_bytes() == before
    assert writer.execute("SELECT COUNT(*) FROM people").fetchone() == (2,)
    writer.close()
