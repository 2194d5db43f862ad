"""Hypothesis stateful tests of the ledger invariants, on both backends, against a plain model:
conservation of supply, no negative balance, idempotency under op ids, atomicity of refused operations."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from games.errors import LedgerError, OperationConflict
from games.ledger import Ledger, Operation, verify_ledger
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger

NAMES = st.sampled_from(["a", "b", "c", "d"])
ESCROWS = st.sampled_from(["e1", "e2", "e3"])
AMOUNTS = st.integers(min_value=-2, max_value=120)


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
            if op.dst in self.accounts:
                return False
            self.accounts[op.dst] = 0
            return True
        if type(amount) is not int or amount <= 0:
            return False
        if kind == "mint":
            if op.dst not in self.accounts:
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

    def run(self, op: Operation) -> None:
        op_id = f"op{self.counter}"
        self.counter += 1
        before = self.snapshot()
        accepted = self.expect(op)
        try:
            event = self.ledger.apply(op_id, op)
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

    @rule(name=NAMES, amount=AMOUNTS)
    def mint(self, name: str, amount: int) -> None:
        self.run(Operation("mint", dst=name, amount=amount))

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
        event = self.ledger.apply(op_id, op)
        assert event.op_id == op_id and event.kind == op.kind and event.amount == op.amount
        assert self.snapshot() == before, "a retry paid twice"

    @precondition(lambda self: self.applied)
    @rule(index=st.integers(min_value=0), bump=st.integers(min_value=1, max_value=5))
    def retry_conflicting(self, index: int, bump: int) -> None:
        op_id, op = self.applied[index % len(self.applied)]
        other = Operation(op.kind, op.src, op.dst, op.amount + bump, op.memo)
        before = self.snapshot()
        try:
            self.ledger.apply(op_id, other)
        except OperationConflict:
            assert self.snapshot() == before
        else:
            raise AssertionError("same op id, different arguments: accepted")

    @invariant()
    def matches_model_and_conserves(self) -> None:
        accounts, escrows = self.ledger.get_accounts(), self.ledger.get_escrows()
        assert accounts == self.accounts
        assert {k: v for k, v in escrows.items()} == self.escrows
        assert all(v >= 0 for v in (*accounts.values(), *escrows.values()))
        assert self.ledger.total_supply() == self.minted == sum(accounts.values()) + sum(escrows.values())

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


_SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
LedgerMachine.TestCase.settings = _SETTINGS
SqliteLedgerMachine.TestCase.settings = _SETTINGS
TestMemoryLedger = LedgerMachine.TestCase
TestSqliteLedger = SqliteLedgerMachine.TestCase
