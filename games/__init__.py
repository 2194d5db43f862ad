"""Games and settlement: the incentive layer that makes honesty the profitable strategy (DESIGN section 7).

Modules
    errors        the error hierarchy (GameError -> LedgerError | RuleViolation(rule) -> ...), drawn there
    ledger        the Ledger Protocol, the shared rules of every backend, the hash-chained event log, helpers
    ledger_memory the in-memory backend (tests, simulation)
    ledger_sqlite the SQLite backend (one file, one transaction per operation; the default persistent ledger)
    auction       the reverse auction that assigns a task (lowest compliant bid, ties by hash)
    consensus     Yuma-style stake-weighted consensus among verifiers, and exact reward splits
    task          the task lifecycle as a pure state machine over a ledger, with forced errors and whistleblowers,
                  independent or shared (committee) samples sized by the task's required detection
    cost          the protocol tax: compute entries, their sum, and the cost model with its best checkpoint interval
    scenarios     games as data (moves, validity, expected balances), their runner and JSON form
    simulate      the economic simulation of strategies, its report, table and plot
    views         read-only ledger views (what `pol ledger show` prints)

`games` imports neither `pinpoint` nor the CLI: the outcome of a dispute enters as a `Rule` move.
"""

from __future__ import annotations

from games.errors import GameError, LedgerError, RuleViolation
from games.ledger import Event, Ledger, Operation, verify_ledger
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger
from games.scenarios import dump_scenarios_json, get_standard_scenarios, run_scenario
from games.simulate import SimConfig, SimulationReport, render_markdown, report_to_dict, save_plot, simulate
from games.task import GameParams, Task, apply_move, apply_post
from games.views import ledger_to_dict, render_ledger

__all__ = [
    "Event",
    "GameError",
    "GameParams",
    "Ledger",
    "LedgerError",
    "MemoryLedger",
    "Operation",
    "RuleViolation",
    "SimConfig",
    "SimulationReport",
    "SqliteLedger",
    "Task",
    "apply_move",
    "apply_post",
    "dump_scenarios_json",
    "get_standard_scenarios",
    "ledger_to_dict",
    "render_ledger",
    "render_markdown",
    "report_to_dict",
    "run_scenario",
    "save_plot",
    "simulate",
    "verify_ledger",
]
