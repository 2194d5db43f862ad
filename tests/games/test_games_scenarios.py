"""The standard game scenarios (moves as data, each valid or invalid, with expected balances) on both ledger
backends, their JSON form, and a re-run of every settlement after a simulated crash."""

from __future__ import annotations

import dataclasses
import json

import pytest

from games.auction import compute_tiebreak
from games.errors import BadMove, GameError
from games.ledger import Ledger
from games.ledger_memory import MemoryLedger
from games.scenarios import (
    Scenario,
    ScenarioFailure,
    Step,
    get_standard_scenarios,
    move_from_dict,
    move_to_dict,
    run_scenario,
    scenario_from_dict,
    scenario_to_dict,
)
from games.task import FINAL, Reveal, apply_move

SCENARIOS = get_standard_scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_standard_scenario(scenario: Scenario, new_ledger) -> None:
    result = run_scenario(scenario, new_ledger())
    assert all(t.phase == FINAL for t in result.tasks.values()), "every standard scenario ends final"


def test_scenarios_cover_the_issue() -> None:
    names = {s.name for s in SCENARIOS}
    assert {"honest_task", "cheating_solver_caught", "lazy_verifier_caught_by_forced_error", "whistleblower_wins",
            "solver_misses_commit", "verifier_misses_verdict", "solver_misses_reveal", "auction_tie",
            "refused_moves"} <= names
    refused = {s.error for sc in SCENARIOS for s in sc.steps if not s.valid}
    assert {"WrongPhase", "DeadlineMissed", "NotAuthorized", "DuplicateMove", "BidRejected", "BadMove",
            "SaltMismatch", "InsufficientFunds"} <= refused


def test_outcomes() -> None:
    outcomes = {s.name: {t.outcome for t in run_scenario(s, MemoryLedger(b"x")).tasks.values()} for s in SCENARIOS}
    assert outcomes["honest_task"] == {"accepted"}
    assert outcomes["cheating_solver_caught"] == {"solver_wrong"}
    assert outcomes["whistleblower_wins"] == {"solver_wrong"}
    assert outcomes["whistleblower_wrong"] == {"challenger_wrong"}
    assert outcomes["solver_misses_commit"] == {"solver_missed_commit"}
    assert outcomes["solver_misses_reveal"] == {"solver_missed_reveal"}


def test_auction_tie_is_broken_by_hash_not_by_name() -> None:
    (tie,) = [s for s in SCENARIOS if s.name == "auction_tie"]
    task = next(iter(run_scenario(tie, MemoryLedger(b"x")).tasks.values()))
    assert task.solver == "s2"
    assert compute_tiebreak(task.task_id, "s2") < compute_tiebreak(task.task_id, "s1")


def test_json_round_trip() -> None:
    text = json.dumps([scenario_to_dict(s) for s in SCENARIOS], sort_keys=True)
    again = tuple(scenario_from_dict(d) for d in json.loads(text))
    assert again == SCENARIOS
    for s in again:
        run_scenario(s, MemoryLedger(b"json"))


def test_unreadable_move_is_refused() -> None:
    good = move_to_dict(SCENARIOS[0].steps[0].move)
    assert move_from_dict(good) == SCENARIOS[0].steps[0].move
    for bad in ({**good, "kind": "teleport"}, {**good, "extra": 1}, {"kind": "post"}):
        with pytest.raises(BadMove):
            move_from_dict(bad)


def _mutated(scenario: Scenario, index: int, **changes: object) -> Scenario:
    steps = list(scenario.steps)
    steps[index] = dataclasses.replace(steps[index], **changes)
    return dataclasses.replace(scenario, steps=tuple(steps))


def test_runner_catches_wrong_expectations() -> None:
    honest = SCENARIOS[0]
    last = len(honest.steps) - 1
    wrong_balance = _mutated(honest, last, balances=(("s1", 1),))
    with pytest.raises(ScenarioFailure, match="holds"):
        run_scenario(wrong_balance, MemoryLedger(b"x"))
    with pytest.raises(ScenarioFailure, match="accepted an invalid"):
        run_scenario(_mutated(honest, last, valid=False, error="WrongPhase"), MemoryLedger(b"x"))
    refused = next(s for s in SCENARIOS if s.name == "refused_moves")
    bad_index = next(i for i, s in enumerate(refused.steps) if not s.valid)
    with pytest.raises(ScenarioFailure, match="refused a valid"):
        run_scenario(_mutated(refused, bad_index, valid=True), MemoryLedger(b"x"))
    with pytest.raises(ScenarioFailure, match="raised"):
        run_scenario(_mutated(refused, bad_index, error="SaltMismatch"), MemoryLedger(b"x"))
    with pytest.raises(ScenarioFailure, match="broke rule"):
        run_scenario(_mutated(refused, bad_index, rule="other.rule"), MemoryLedger(b"x"))
    cheater = next(s for s in SCENARIOS if s.name == "cheating_solver_caught")
    with pytest.raises(ScenarioFailure, match="honest s1"):
        run_scenario(dataclasses.replace(cheater, honest=("submitter", "s1")), MemoryLedger(b"x"))


class CrashingLedger:
    """Wraps a ledger and raises after `budget` successful mutations, like a process dying mid-settlement."""

    def __init__(self, inner: Ledger, budget: int) -> None:
        self.inner, self.budget = inner, budget

    def apply(self, op_id, op):  # type: ignore[no-untyped-def]
        if self.budget <= 0:
            raise KeyboardInterrupt("crash")
        self.budget -= 1
        return self.inner.apply(op_id, op)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


@pytest.mark.parametrize("name", ["honest_task", "lazy_verifier_caught_by_forced_error", "whistleblower_wins"])
def test_settlement_rerun_after_crash_pays_once(name: str) -> None:
    """Crash a settling move after each possible number of ledger operations, then re-apply the same move to
    the same task: the final balances equal a clean run's."""
    scenario = next(s for s in SCENARIOS if s.name == name)
    clean = MemoryLedger(b"c")
    expected = run_scenario(scenario, clean).balances
    settling = [i for i, s in enumerate(scenario.steps) if s.valid and s.move.kind in ("reveal", "rule")]
    cut = settling[-1]
    budget, crashed = 0, True
    while crashed:
        ledger = MemoryLedger(b"c")
        head = dataclasses.replace(scenario, steps=scenario.steps[:cut], honest=())
        task = next(iter(run_scenario(head, ledger).tasks.values()))
        move = scenario.steps[cut].move
        try:
            apply_move(CrashingLedger(ledger, budget), task, move)  # type: ignore[arg-type]
            crashed = False
        except KeyboardInterrupt:
            pass
        final = apply_move(ledger, task, move)  # the re-run: same task, same move, same op ids
        for step in scenario.steps[cut + 1:]:
            final = apply_move(ledger, final, step.move)
        assert ledger.get_accounts() == expected
        assert len(ledger.events()) == len(clean.events())
        assert final.phase == FINAL
        budget += 1
    assert budget > 3, "the settling move should take several ledger operations"


def test_failed_move_leaves_task_untouched() -> None:
    scenario = SCENARIOS[0]
    ledger = MemoryLedger(b"x")
    head = dataclasses.replace(scenario, steps=scenario.steps[:-1], honest=())
    task = next(iter(run_scenario(head, ledger).tasks.values()))
    before = (task, ledger.get_accounts(), len(ledger.events()))
    with pytest.raises(GameError):
        apply_move(ledger, task, Reveal(task.task_id, 41, "s1", "not the salt"))
    assert (task, ledger.get_accounts(), len(ledger.events())) == before


def test_step_defaults() -> None:
    step = Step(SCENARIOS[0].steps[0].move)
    assert step.valid and not step.error and not step.balances
