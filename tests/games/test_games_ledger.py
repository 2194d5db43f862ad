"""Unit tests of the ledger rules on both backends: every error raised, atomicity of refusals, idempotency, the
hash-chained event log (golden), the beacon, and SQLite persistence."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from games.errors import (
    AccountExists,
    InsufficientFunds,
    InvalidAmount,
    InvalidIdentifier,
    LedgerCorrupt,
    NotALedger,
    OperationConflict,
    SupplyOverflow,
    UnknownAccount,
    UnknownEscrow,
)
from games.ledger import (
    GENESIS,
    MAX_AMOUNT,
    Ledger,
    Operation,
    event_to_dict,
    lock,
    mint,
    open_account,
    release,
    slash,
    transfer,
    verify_event_chain,
    verify_ledger,
)
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger


def snapshot(ledger: Ledger) -> tuple:
    return ledger.get_accounts(), ledger.get_escrows(), ledger.total_supply(), len(ledger.events()), ledger.head()


def populate(ledger: Ledger) -> None:
    open_account(ledger, "open/alice", "alice")
    open_account(ledger, "open/bob", "bob")
    open_account(ledger, "open/treasury", "treasury")
    mint(ledger, "mint/alice", "alice", 1_000)
    transfer(ledger, "pay/1", "alice", "bob", 300)
    lock(ledger, "bond/alice", "alice", "task/1/bond", 200)
    release(ledger, "release/1", "task/1/bond", "bob", 50)
    slash(ledger, "slash/1", "task/1/bond", "treasury", 150, reason="missed deadline")


# Pinned: the event log bytes are a protocol format. Changing them must be a deliberate, versioned decision.
GOLDEN_HEAD = "88bbd10d00cb8bc75c29f7897104415f9df6c8a42a32cd6b1738c356be8f7425"
GOLDEN_BEACON = "97b4cab698a0190a439b7d38d1cf91f333c677bbeb5d369c7ace0fad92b1cd50"


def test_golden_event_log(new_ledger) -> None:
    ledger = new_ledger(b"golden-seed")
    populate(ledger)
    beacon = ledger.beacon("round/1")
    assert ledger.head().hex() == GOLDEN_HEAD
    assert beacon.hex() == GOLDEN_BEACON
    assert [e.kind for e in ledger.events()] == ["open"] * 3 + ["mint", "transfer", "lock", "release", "slash",
                                                               "beacon"]
    assert verify_event_chain(ledger.events()) == ledger.head()
    assert ledger.events()[0].prev == GENESIS


def test_backends_agree_event_for_event(tmp_path: Path) -> None:
    memory = MemoryLedger(b"same")
    with SqliteLedger(tmp_path / "l.db", b"same") as disk:
        for ledger in (memory, disk):
            populate(ledger)
            ledger.beacon("r")
        assert memory.events() == disk.events()
        assert snapshot(memory) == snapshot(disk)


def test_balances_after_populate(new_ledger) -> None:
    ledger = new_ledger()
    populate(ledger)
    assert ledger.get_accounts() == {"alice": 500, "bob": 350, "treasury": 150}
    assert ledger.get_escrows() == {"task/1/bond": 0}
    assert ledger.total_supply() == 1_000
    assert ledger.balance("nobody") == 0 and ledger.escrow_balance("none") == 0
    assert ledger.has_account("bob") and not ledger.has_account("carol")
    verify_ledger(ledger)


def test_retry_returns_original_event_and_pays_once(new_ledger) -> None:
    ledger = new_ledger()
    populate(ledger)
    before = snapshot(ledger)
    again = transfer(ledger, "pay/1", "alice", "bob", 300)
    assert again == ledger.events()[4]
    assert snapshot(ledger) == before


@pytest.mark.parametrize("op", [
    Operation("transfer", src="alice", dst="bob", amount=301),
    Operation("transfer", src="alice", dst="treasury", amount=300),
    Operation("mint", dst="alice", amount=300),
])
def test_reused_op_id_with_other_arguments_is_refused(new_ledger, op: Operation) -> None:
    ledger = new_ledger()
    populate(ledger)
    before = snapshot(ledger)
    with pytest.raises(OperationConflict) as info:
        ledger.apply("pay/1", op)
    assert info.value.op_id == "pay/1"
    assert snapshot(ledger) == before


@pytest.mark.parametrize(("op", "error"), [
    (Operation("open", dst="alice"), AccountExists),
    (Operation("open", dst=""), InvalidIdentifier),
    (Operation("open", dst="x", amount=5), InvalidAmount),
    (Operation("open", dst="x", amount=0.0), InvalidAmount),  # type: ignore[arg-type]
    (Operation("open", dst="x", amount=False), InvalidAmount),
    (Operation("open", src="alice", dst="x"), InvalidIdentifier),
    (Operation("mint", src="bob", dst="alice", amount=5), InvalidIdentifier),
    (Operation("mint", dst="alice", amount=MAX_AMOUNT + 1), InvalidAmount),
    (Operation("mint", dst="alice", amount=2**64), InvalidAmount),
    (Operation("mint", dst="alice", amount=MAX_AMOUNT), SupplyOverflow),
    (Operation("mint", dst="alice", amount=MAX_AMOUNT - 999), SupplyOverflow),
    (Operation("transfer", src="alice", dst="bob", amount=2**63), InvalidAmount),
    (Operation("lock", src="alice", dst="e", amount=-(2**63)), InvalidAmount),
    (Operation("release", src="task/1/bond", dst="alice", amount=2**64), InvalidAmount),
    (Operation("mint", dst="carol", amount=5), UnknownAccount),
    (Operation("mint", dst="alice", amount=0), InvalidAmount),
    (Operation("mint", dst="alice", amount=-5), InvalidAmount),
    (Operation("mint", dst="alice", amount=True), InvalidAmount),
    (Operation("mint", dst="alice", amount=2.0), InvalidAmount),  # type: ignore[arg-type]
    (Operation("transfer", src="alice", dst="bob", amount=501), InsufficientFunds),
    (Operation("transfer", src="alice", dst="carol", amount=1), UnknownAccount),
    (Operation("transfer", src="carol", dst="alice", amount=1), UnknownAccount),
    (Operation("transfer", src="alice", dst="alice", amount=1), InvalidIdentifier),
    (Operation("lock", src="alice", dst="e", amount=501), InsufficientFunds),
    (Operation("lock", src="alice", dst="", amount=1), InvalidIdentifier),
    (Operation("release", src="task/1/bond", dst="alice", amount=1), UnknownEscrow),
    (Operation("release", src="never", dst="alice", amount=1), UnknownEscrow),
    (Operation("slash", src="task/1/bond", dst="alice", amount=1), UnknownEscrow),
    (Operation("burn", dst="alice", amount=1), InvalidIdentifier),
    (Operation("mint", dst="alice", amount=1, memo="m" * 300), InvalidIdentifier),
    (Operation("mint", dst="x" * 300, amount=1), InvalidIdentifier),
])
def test_refused_operation_changes_nothing(new_ledger, op: Operation, error: type[Exception]) -> None:
    ledger = new_ledger()
    populate(ledger)
    before = snapshot(ledger)
    with pytest.raises(error):
        ledger.apply("fresh-op", op)
    assert snapshot(ledger) == before
    # the refused op id stays free for a valid operation
    mint(ledger, "fresh-op", "alice", 1)
    assert ledger.total_supply() == 1_001


def test_escrow_shortfall_and_unknown_destination(new_ledger) -> None:
    ledger = new_ledger()
    populate(ledger)
    lock(ledger, "lock/2", "bob", "esc", 10)
    before = snapshot(ledger)
    with pytest.raises(InsufficientFunds) as info:
        release(ledger, "r2", "esc", "alice", 11)
    assert (info.value.needed, info.value.available) == (11, 10)
    with pytest.raises(UnknownAccount):
        slash(ledger, "r3", "esc", "carol", 5)
    assert snapshot(ledger) == before


def test_bad_op_id_is_refused(new_ledger) -> None:
    ledger = new_ledger()
    for bad in ("", "x" * 257, 7):
        with pytest.raises(InvalidIdentifier):
            ledger.apply(bad, Operation("open", dst="a"))  # type: ignore[arg-type]
    assert snapshot(ledger)[3] == 0


def test_beacon_is_stable_per_round_and_depends_on_history(new_ledger) -> None:
    a, b = new_ledger(b"seed"), new_ledger(b"seed")
    assert a.beacon("r1") == a.beacon("r1")
    assert a.beacon("r1") != a.beacon("r2")
    populate(b)
    assert b.beacon("r1") != a.beacon("r1"), "drawn after other events, the beacon differs"
    c = new_ledger(b"other seed")
    assert c.beacon("r1") != a.beacon("r1"), "the secret seed matters"
    draws = [e for e in a.events() if e.kind == "beacon"]
    assert [(e.dst, e.memo) for e in draws] == [("r1", a.beacon("r1").hex()), ("r2", a.beacon("r2").hex())]
    with pytest.raises(InvalidIdentifier):
        a.beacon("")


def test_bad_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidIdentifier):
        MemoryLedger(b"")
    with pytest.raises(InvalidIdentifier):
        SqliteLedger(tmp_path / "x.db", b"")
    with pytest.raises(InvalidIdentifier):
        SqliteLedger(tmp_path / "x.db", synchronous="SOMETIMES")


def test_verify_detects_tampering(new_ledger) -> None:
    ledger = new_ledger()
    populate(ledger)
    events = ledger.events()
    forged = [*events[:4], dataclasses.replace(events[4], amount=1), *events[5:]]
    with pytest.raises(LedgerCorrupt):
        verify_event_chain(forged)
    with pytest.raises(LedgerCorrupt):
        verify_event_chain(events[1:])


def test_verify_ledger_detects_broken_supply(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path, b"s") as ledger:
        populate(ledger)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 'bob'")
    conn.commit()
    conn.close()
    with SqliteLedger(path) as ledger, pytest.raises(LedgerCorrupt, match="supply"):
        verify_ledger(ledger)


def test_verify_ledger_detects_negative_balance() -> None:
    ledger = MemoryLedger(b"s")
    populate(ledger)
    ledger._accounts["bob"] = -1  # simulate a broken backend
    with pytest.raises(LedgerCorrupt, match="negative"):
        verify_ledger(ledger)


def test_verify_ledger_detects_wrong_head() -> None:
    ledger = MemoryLedger(b"s")
    populate(ledger)
    last = ledger._events[-1]
    ledger._events[-1] = dataclasses.replace(last, hash=b"\0" * 32)
    with pytest.raises(LedgerCorrupt):
        verify_ledger(ledger)


def test_sqlite_persists_and_keeps_its_seed(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path, b"first") as ledger:
        populate(ledger)
        beacon = ledger.beacon("r1")
        before = snapshot(ledger)
    with SqliteLedger(path, b"ignored on reopen") as ledger:
        assert snapshot(ledger) == before
        assert ledger.beacon("r1") == beacon
        assert transfer(ledger, "pay/1", "alice", "bob", 300).seq == 4  # retry after reopen
        verify_ledger(ledger)
        assert event_to_dict(ledger.events()[0])["prev"] == GENESIS.hex()


@pytest.mark.parametrize("create", [True, False])
def test_sqlite_refuses_unknown_schema_version(tmp_path: Path, create: bool) -> None:
    path = tmp_path / "l.db"
    SqliteLedger(path, b"s").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(NotALedger, match="schema version '99'") as info:
        SqliteLedger(path, create=create)
    assert info.value.exit_code == 2
    assert path.read_bytes() == before, "a ledger of another version is left untouched"
