"""Hypothesis stateful tests of the ledger invariants, on both backends, against a plain model:
conservation of supply, no negative balance, idempotency under op ids, atomicity of refused operations, and one kind
of number (amounts of every type and size, near and past MAX_AMOUNT). `BackendsAgreeMachine` drives both backends
with the same operations and compares them after every step: same events, balances, supply and refusals."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from games.errors import LedgerError, OperationConflict
from games.ledger import MAX_AMOUNT, Event, Ledger, Operation, compute_op_key, verify_ledger
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger

NAMES = st.sampled_from(["a", "b", "c", "d"])
ESCROWS = st.sampled_from(["e1", "e2", "e3"])
# Amounts of every kind: small ones that mostly succeed, and ones near and past the bound, of the wrong sign or type
# (an int of thousands of digits is tested in test_games_ledger_numbers: hypothesis cannot print one).
ODD_AMOUNTS = [MAX_AMOUNT, MAX_AMOUNT - 1, MAX_AMOUNT + 1, 2**62, 2**62 - 1, 2**62 + 1, 2**63, 2**64, 2**200,
               -(2**63), -(2**64), -1, 0, True, False, 1.0, 0.5, float(2**62), float("nan"), float("inf"), None, "7"]
AMOUNTS = st.one_of(st.integers(min_value=-2, max_value=120), st.sampled_from(ODD_AMOUNTS),
                    st.integers(min_value=MAX_AMOUNT - 3, max_value=MAX_AMOUNT + 3),
                    st.integers(min_value=-(2**70), max_value=2**70))


class LedgerMachine(RuleBasedStateMachine):
    """Drives one backend with random operations and checks it against a dict model after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = self.make_ledger()
        self.accounts: dict[str, int] = {}
        self.escrows: dict[str, int] = {}
        self.minted = 0
        self.applied: list[tuple[str, Operation]] = []
        self.counter = 0

    def make_ledger(self) -> Ledger:
        return MemoryLedger(b"prop")

    def snapshot(self) -> tuple:
        return (self.ledger.get_accounts(), self.ledger.get_escrows(), self.ledger.total_supply(),
                len(self.ledger.events()), self.ledger.head())

    def expect(self, op: Operation) -> bool:
        """Whether the model accepts `op`, and if so apply it to the model."""
        amount, kind = op.amount, op.kind
        if kind == "open":
            if op.dst in self.accounts or op.src or type(amount) is not int or amount != 0:
                return False
            self.accounts[op.dst] = 0
            return True
        if type(amount) is not int or not 1 <= amount <= MAX_AMOUNT:
            return False
        if kind == "mint":
            if op.dst not in self.accounts or op.src or self.minted + amount > MAX_AMOUNT:
                return False
            self.accounts[op.dst] += amount
            self.minted += amount
            return True
        if kind in ("transfer", "lock"):
            if op.src not in self.accounts or self.accounts[op.src] < amount:
                return False
            if kind == "transfer" and (op.dst not in self.accounts or op.dst == op.src):
                return False
            self.accounts[op.src] -= amount
            if kind == "transfer":
                self.accounts[op.dst] += amount
            else:
                self.escrows[op.dst] = self.escrows.get(op.dst, 0) + amount
            return True
        if self.escrows.get(op.src, 0) < amount or op.dst not in self.accounts:
            return False
        self.escrows[op.src] -= amount
        self.accounts[op.dst] += amount
        return True

    def apply(self, op_id: str, op: Operation) -> Event:
        """Apply `op` to the ledger under test (both, in `BackendsAgreeMachine`)."""
        return self.ledger.apply(op_id, op)

    def run(self, op: Operation) -> None:
        op_id = f"op{self.counter}"
        self.counter += 1
        before = self.snapshot()
        accepted = self.expect(op)
        try:
            event = self.apply(op_id, op)
        except LedgerError:
            assert not accepted, f"refused a valid {op}"
            assert self.snapshot() == before, "a refused operation changed the ledger"
            return
        assert accepted, f"accepted an invalid {op}"
        assert event.seq == before[3]
        self.applied.append((op_id, op))

    @rule(name=NAMES)
    def open(self, name: str) -> None:
        self.run(Operation("open", dst=name))

    @rule(name=NAMES, amount=st.sampled_from([1, -1, 0.0, False, MAX_AMOUNT]), src=st.sampled_from(["", "b"]))
    def open_odd(self, name: str, amount: int, src: str) -> None:
        self.run(Operation("open", src=src, dst=name, amount=amount))

    @rule(name=NAMES, amount=AMOUNTS)
    def mint(self, name: str, amount: int) -> None:
        self.run(Operation("mint", dst=name, amount=amount))

    @rule(name=NAMES, slack=st.integers(min_value=-2, max_value=2), src=st.sampled_from(["", "", "b"]))
    def mint_to_the_bound(self, name: str, slack: int, src: str) -> None:
        """A mint that takes the supply to MAX_AMOUNT, just short of it or just past it."""
        self.run(Operation("mint", src=src, dst=name, amount=MAX_AMOUNT - self.minted + slack))

    @rule(src=NAMES, dst=NAMES, amount=AMOUNTS)
    def transfer(self, src: str, dst: str, amount: int) -> None:
        self.run(Operation("transfer", src=src, dst=dst, amount=amount))

    @rule(src=NAMES, escrow=ESCROWS, amount=AMOUNTS)
    def lock(self, src: str, escrow: str, amount: int) -> None:
        self.run(Operation("lock", src=src, dst=escrow, amount=amount))

    @rule(escrow=ESCROWS, dst=NAMES, amount=AMOUNTS, kind=st.sampled_from(["release", "slash"]))
    def release(self, escrow: str, dst: str, amount: int, kind: str) -> None:
        self.run(Operation(kind, src=escrow, dst=dst, amount=amount))

    @precondition(lambda self: self.applied)
    @rule(index=st.integers(min_value=0))
    def retry_same(self, index: int) -> None:
        op_id, op = self.applied[index % len(self.applied)]
        before = self.snapshot()
        event = self.apply(op_id, op)
        assert event.op_id == op_id and event.kind == op.kind and event.amount == op.amount
        assert self.snapshot() == before, "a retry paid twice"

    @precondition(lambda self: self.applied)
    @rule(index=st.integers(min_value=0), bump=st.integers(min_value=1, max_value=5))
    def retry_conflicting(self, index: int, bump: int) -> None:
        op_id, op = self.applied[index % len(self.applied)]
        other = Operation(op.kind, op.src, op.dst, op.amount + bump, op.memo)
        before = self.snapshot()
        try:
            self.apply(op_id, other)
        except OperationConflict:
            assert self.snapshot() == before
        else:
            raise AssertionError("same op id, different arguments: accepted")

    @precondition(lambda self: self.applied)
    @rule(index=st.integers(min_value=0), amount=AMOUNTS)
    def retry_with_any_amount(self, index: int, amount: int) -> None:
        """A retry under a used op id with an amount of any kind: the original event if the operation is the same
        (same type and value), OperationConflict otherwise."""
        op_id, op = self.applied[index % len(self.applied)]
        other = Operation(op.kind, op.src, op.dst, amount, op.memo)
        before = self.snapshot()
        same = compute_op_key(other) == compute_op_key(op)
        try:
            event = self.apply(op_id, other)
        except OperationConflict:
            assert not same and self.snapshot() == before
        else:
            assert same and event.op_id == op_id and self.snapshot() == before

    @rule(round_id=st.sampled_from(["r1", "r2"]))
    def beacon(self, round_id: str) -> None:
        before = len(self.ledger.events())
        self.ledger.beacon(round_id)
        assert len(self.ledger.events()) - before in (0, 1)

    @invariant()
    def matches_model_and_conserves(self) -> None:
        accounts, escrows = self.ledger.get_accounts(), self.ledger.get_escrows()
        assert accounts == self.accounts
        assert {k: v for k, v in escrows.items()} == self.escrows
        assert all(v >= 0 for v in (*accounts.values(), *escrows.values()))
        assert self.ledger.total_supply() == self.minted == sum(accounts.values()) + sum(escrows.values())
        assert self.minted <= MAX_AMOUNT

    def teardown(self) -> None:
        verify_ledger(self.ledger)


class SqliteLedgerMachine(LedgerMachine):
    def make_ledger(self) -> Ledger:
        self.tmp = Path(tempfile.mkdtemp(prefix="pol-ledger-"))
        # synchronous=OFF only to keep the property run fast; durability is tested by the SIGKILL test
        return SqliteLedger(self.tmp / "ledger.db", b"prop", synchronous="OFF")

    def teardown(self) -> None:
        super().teardown()
        self.ledger.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.tmp, ignore_errors=True)


class BackendsAgreeMachine(LedgerMachine):
    """Both backends, the same operations: after every step the same events, balances, supply and head, and every
    refusal the same error class. `self.ledger` is the in-memory one (checked against the model as above)."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pol-ledger-"))
        self.disk = SqliteLedger(self.tmp / "ledger.db", b"prop", synchronous="OFF")

    def apply(self, op_id: str, op: Operation) -> Event:
        outcomes: list[Event | LedgerError] = []
        for ledger in (self.ledger, self.disk):
            try:
                outcomes.append(ledger.apply(op_id, op))
            except LedgerError as exc:
                outcomes.append(exc)
        memory, disk = outcomes
        assert type(memory) is type(disk), f"{op}: memory gave {memory!r}, SQLite gave {disk!r}"
        if isinstance(memory, LedgerError):
            assert str(memory) == str(disk)
            raise memory
        assert memory == disk
        return memory

    @rule(round_id=st.sampled_from(["r1", "r2"]))
    def beacon(self, round_id: str) -> None:
        assert self.ledger.beacon(round_id) == self.disk.beacon(round_id)

    @invariant()
    def backends_agree(self) -> None:
        assert self.snapshot() == (self.disk.get_accounts(), self.disk.get_escrows(), self.disk.total_supply(),
                                   len(self.disk.events()), self.disk.head())
        assert self.ledger.events() == self.disk.events()

    def teardown(self) -> None:
        super().teardown()
        verify_ledger(self.disk)
        self.disk.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


_SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
LedgerMachine.TestCase.settings = _SETTINGS
SqliteLedgerMachine.TestCase.settings = _SETTINGS
BackendsAgreeMachine.TestCase.settings = _SETTINGS
TestMemoryLedger = LedgerMachine.TestCase
TestSqliteLedger = SqliteLedgerMachine.TestCase
TestBackendsAgree = BackendsAgreeMachine.TestCase
