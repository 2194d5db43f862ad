"""Shared fixtures for the games tests: one ledger factory per backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from games.ledger import Ledger
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger

BACKENDS = ("memory", "sqlite")


def make_ledger(backend: str, tmp_path: Path, seed: bytes = b"test-seed", name: str = "ledger.db") -> Ledger:
    if backend == "memory":
        return MemoryLedger(seed)
    return SqliteLedger(tmp_path / name, seed)


@pytest.fixture(params=BACKENDS)
def new_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Ledger]]:
    """A factory of fresh ledgers of one backend; SQLite ones are closed at teardown."""
    made: list[Ledger] = []

    def factory(seed: bytes = b"test-seed") -> Ledger:
        ledger = make_ledger(request.param, tmp_path, seed, name=f"ledger{len(made)}.db")
        made.append(ledger)
        return ledger

    yield factory
    for ledger in made:
        if isinstance(ledger, SqliteLedger):
            ledger.close()
