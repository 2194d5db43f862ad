"""Ledger views (for `pol ledger show`), the scenario JSON dump, and the package's import discipline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import games
from games.errors import LedgerCorrupt
from games.ledger_memory import MemoryLedger
from games.scenarios import dump_scenarios_json, get_standard_scenarios, run_scenario, scenario_from_dict
from games.views import ledger_to_dict, render_ledger

ROOT = Path(__file__).resolve().parents[2]


def _played(new_ledger):  # type: ignore[no-untyped-def]
    ledger = new_ledger()
    run_scenario(get_standard_scenarios()[0], ledger)
    return ledger


def test_ledger_to_dict(new_ledger) -> None:  # type: ignore[no-untyped-def]
    ledger = _played(new_ledger)
    data = json.loads(json.dumps(ledger_to_dict(ledger)))
    assert data["total_supply"] == sum(data["accounts"].values()) + sum(data["escrows"].values())
    assert data["escrows"] == {}, "the honest task settled every escrow"
    assert data["event_count"] == len(data["events"]) == len(ledger.events())
    assert data["head"] == data["events"][-1]["hash"] == ledger.head().hex()
    assert len(ledger_to_dict(ledger, last_events=3)["events"]) == 3


def test_render_ledger(new_ledger) -> None:  # type: ignore[no-untyped-def]
    ledger = _played(new_ledger)
    text = render_ledger(ledger, last_events=5)
    assert "submitter" in text and "last 5 events" in text and f"supply {ledger.total_supply():,}" in text


def test_views_refuse_a_corrupt_ledger() -> None:
    ledger = MemoryLedger(b"x")
    run_scenario(get_standard_scenarios()[0], ledger)
    ledger._accounts["s1"] += 1  # a broken backend
    with pytest.raises(LedgerCorrupt):
        ledger_to_dict(ledger)
    assert ledger_to_dict(ledger, check=False)["accounts"]["s1"] > 0


def test_scenario_dump_reads_back() -> None:
    data = json.loads(dump_scenarios_json())
    assert data["version"] == 1
    assert tuple(scenario_from_dict(d) for d in data["scenarios"]) == get_standard_scenarios()


def test_games_imports_neither_pinpoint_nor_cli() -> None:
    code = ("import sys, games, games.simulate, games.scenarios, games.views; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pinpoint', 'cli', 'torch')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert set(games.__all__) <= set(dir(games))


def test_backends_implement_the_protocol(tmp_path: Path) -> None:
    from games.ledger import Ledger
    from games.ledger_sqlite import SqliteLedger

    assert isinstance(MemoryLedger(b"x"), Ledger)
    with SqliteLedger(tmp_path / "l.db", b"x") as ledger:
        assert isinstance(ledger, Ledger)
