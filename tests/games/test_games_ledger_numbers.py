"""The ledger's numbers are one kind of number: every amount is an int in [1, MAX_AMOUNT], the total supply never
exceeds MAX_AMOUNT, both backends refuse exactly the same amounts, and the SQLite file stores every number as an
SQLite INTEGER (the supply as the exact decimal text of one), never as a float."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from games.errors import InvalidAmount, OperationConflict, SupplyOverflow
from games.ledger import (
    MAX_AMOUNT,
    Ledger,
    Operation,
    is_amount,
    lock,
    mint,
    open_account,
    release,
    slash,
    transfer,
    verify_ledger,
)
from games.ledger_sqlite import SqliteLedger
from games.views import ledger_to_dict, render_ledger


def snapshot(ledger: Ledger) -> tuple:
    return ledger.get_accounts(), ledger.get_escrows(), ledger.total_supply(), ledger.events(), ledger.head()


def test_max_amount_is_sqlite_largest_integer() -> None:
    assert MAX_AMOUNT == 2**63 - 1
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT ?, typeof(?)", (MAX_AMOUNT, MAX_AMOUNT)).fetchone() == (MAX_AMOUNT, "integer")
    with pytest.raises(OverflowError):  # one more does not fit an SQLite INTEGER: the reason for the bound
        conn.execute("SELECT ?", (MAX_AMOUNT + 1,))
    # and SQLite's own arithmetic turns an overflowing sum into a float: why no sum is left to SQL
    assert conn.execute("SELECT typeof(? + ?)", (2**62, 2**62)).fetchone() == ("real",)
    conn.close()


@pytest.mark.parametrize(("amount", "ok"), [
    (1, True), (MAX_AMOUNT, True), (0, False), (-1, False), (MAX_AMOUNT + 1, False), (2**64, False),
    (True, False), (1.0, False), ("1", False), (None, False),
])
def test_is_amount(amount: object, ok: bool) -> None:
    assert is_amount(amount) is ok


def test_mint_2_62_twice_is_refused_and_changes_nothing(new_ledger) -> None:  # type: ignore[no-untyped-def]
    ledger = new_ledger()
    open_account(ledger, "open/a", "a")
    mint(ledger, "mint/1", "a", 2**62)
    before = snapshot(ledger)
    with pytest.raises(SupplyOverflow) as info:
        mint(ledger, "mint/2", "a", 2**62)
    assert (info.value.amount, info.value.supply, info.value.maximum) == (2**62, 2**62, MAX_AMOUNT)
    assert isinstance(info.value, InvalidAmount) and info.value.exit_code == 2
    assert "above the ledger's maximum 9223372036854775807" in str(info.value)
    assert snapshot(ledger) == before
    # the refused op id stays free, and the supply can reach the bound exactly
    mint(ledger, "mint/2", "a", 2**62 - 1)
    assert ledger.total_supply() == ledger.balance("a") == MAX_AMOUNT
    with pytest.raises(SupplyOverflow):
        mint(ledger, "mint/3", "a", 1)
    verify_ledger(ledger)
    data = json.loads(json.dumps(ledger_to_dict(ledger)))
    assert data["total_supply"] == MAX_AMOUNT and type(data["total_supply"]) is int
    assert "supply 9,223,372,036,854,775,807" in render_ledger(ledger)


def test_the_whole_supply_moves_through_every_operation(new_ledger) -> None:  # type: ignore[no-untyped-def]
    ledger = new_ledger()
    for name in ("a", "b", "c"):
        open_account(ledger, f"open/{name}", name)
    mint(ledger, "mint", "a", MAX_AMOUNT)
    transfer(ledger, "t", "a", "b", MAX_AMOUNT)
    lock(ledger, "l", "b", "esc", MAX_AMOUNT)
    release(ledger, "r", "esc", "c", MAX_AMOUNT - 1)
    slash(ledger, "s", "esc", "a", 1)
    assert ledger.get_accounts() == {"a": 1, "b": 0, "c": MAX_AMOUNT - 1}
    assert ledger.get_escrows() == {"esc": 0}
    verify_ledger(ledger)


def test_sqlite_stores_integers_never_floats(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path, b"s") as ledger:
        for name in ("a", "b"):
            open_account(ledger, f"open/{name}", name)
        mint(ledger, "m1", "a", 2**62)
        mint(ledger, "m2", "b", 2**62 - 1)
        transfer(ledger, "t", "b", "a", 2**62 - 1)
        lock(ledger, "l", "a", "esc", MAX_AMOUNT - 5)
        before = snapshot(ledger)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value, typeof(value) FROM meta WHERE key='supply'").fetchone() == (
        str(MAX_AMOUNT), "text")
    assert set(conn.execute("SELECT typeof(balance) FROM accounts UNION SELECT typeof(balance) FROM escrows")) == {
        ("integer",)}
    assert set(conn.execute("SELECT typeof(amount) FROM events")) == {("integer",)}
    assert conn.execute("SELECT balance FROM accounts WHERE id='a'").fetchone() == (5,)
    conn.close()
    with SqliteLedger(path, create=False) as ledger:
        assert snapshot(ledger) == before
        verify_ledger(ledger)


def _id(amount: object) -> str:
    """A test id for an amount (pytest cannot print an int of more than 4300 digits)."""
    if isinstance(amount, int) and not isinstance(amount, bool) and amount.bit_length() > 64:
        return f"int{'-' if amount < 0 else ''}{amount.bit_length()}bits"
    return type(amount).__name__ if type(amount) is object else repr(amount)


AMOUNTS_REFUSED = [0, -1, -(2**63), -(2**64), MAX_AMOUNT + 1, 2**63, 2**64, 2**200, 10**5000, True, False, 1.0,
                   float(2**62), float("nan"), float("inf"), "5", None]


@pytest.mark.parametrize("amount", AMOUNTS_REFUSED, ids=_id)
def test_every_operation_refuses_a_bad_amount(new_ledger, amount: object) -> None:  # type: ignore[no-untyped-def]
    ledger = new_ledger()
    open_account(ledger, "open/a", "a")
    open_account(ledger, "open/b", "b")
    mint(ledger, "mint", "a", 100)
    lock(ledger, "lock", "a", "esc", 10)
    before = snapshot(ledger)
    for op in (Operation("mint", dst="a", amount=amount), Operation("transfer", src="a", dst="b", amount=amount),
               Operation("lock", src="a", dst="esc", amount=amount),
               Operation("release", src="esc", dst="b", amount=amount),
               Operation("slash", src="esc", dst="b", amount=amount)):  # type: ignore[arg-type]
        with pytest.raises(InvalidAmount) as info:
            ledger.apply("fresh", op)
        assert type(info.value) is InvalidAmount
        message = str(info.value)
        assert "\n" not in message and len(message) < 200, message
        assert snapshot(ledger) == before


def test_a_huge_int_names_its_size() -> None:
    assert "an int of 16610 bits" in str(InvalidAmount(10**5000, MAX_AMOUNT))
    assert str(InvalidAmount(2**64, MAX_AMOUNT)) == (
        "amount must be a positive int of at most 9223372036854775807, got 18446744073709551616")


@pytest.mark.parametrize("amount", [10**5000, object(), 1.0, True, 2], ids=_id)
def test_retry_with_an_unencodable_amount_is_a_conflict(new_ledger, amount: object) -> None:  # type: ignore[no-untyped-def]
    ledger = new_ledger()
    open_account(ledger, "open/a", "a")
    mint(ledger, "mint", "a", 1)
    before = snapshot(ledger)
    with pytest.raises(OperationConflict):
        ledger.apply("mint", Operation("mint", dst="a", amount=amount))  # type: ignore[arg-type]
    assert snapshot(ledger) == before
