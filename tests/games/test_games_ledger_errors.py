"""The games error tree hangs below pol's: every games error is a PolError, carries the exit code the CLI gives it,
and the tree drawn in games/errors.py's docstring names every class with that code."""

from __future__ import annotations

import re

import games.errors as errors
from games.errors import GameError, InvalidAmount, LedgerCorrupt, LedgerError, NotALedger, SupplyOverflow
from pol.errors import EXIT_FAILED, EXIT_USAGE, PolError


def test_game_errors_are_pol_errors_with_exit_codes() -> None:
    assert issubclass(GameError, PolError)
    assert GameError.exit_code == EXIT_USAGE
    assert LedgerCorrupt.exit_code == EXIT_FAILED, "a ledger failing its own invariants is a failure"
    assert NotALedger.exit_code == EXIT_USAGE, "a file that is not a ledger is bad input"
    assert issubclass(NotALedger, LedgerError) and not issubclass(NotALedger, LedgerCorrupt)
    assert issubclass(SupplyOverflow, InvalidAmount)
    error = NotALedger("x.db", "an empty\n  file")
    assert str(error) == "not a pol ledger: x.db: an empty file" and (error.path, error.problem) == (
        "x.db", "an empty\n  file")


def test_the_docstring_tree_names_every_class_with_its_exit_code() -> None:
    drawn = dict(re.findall(r"^[\s│├└─]+(\w+)(?:\(\w+\))?\s+([12])\s", errors.__doc__ or "", re.MULTILINE))
    classes = {name: getattr(errors, name) for name in errors.__all__}
    assert set(drawn) == set(classes)
    for name, cls in classes.items():
        assert int(drawn[name]) == cls.exit_code, name
