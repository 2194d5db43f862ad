"""Outcome conditions: a task may pay only if the certified evaluation metric meets a threshold."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from games.auction import make_capabilities, make_requirements
from games.consensus import WEIGHT_ONE
from games.errors import BadMove, MarketError
from games.ledger import mint, open_account, verify_ledger
from games.ledger_memory import MemoryLedger
from games.market import MarketReport, get_market_params, run_market
from games.task import (
    Bid,
    CloseAuction,
    Commit,
    GameParams,
    Join,
    Post,
    Reveal,
    Verdict,
    apply_move,
    apply_post,
    compute_condition_met,
    compute_salt_digest,
)
from pol.spec import spec_from_dict

SPEC = spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 16}},
                       "data": {"name": "synthetic", "kwargs": {"n": 256}},
                       "steps": 8, "every": 4, "batch_size": 8,
                       "evaluation": {"data": {"name": "synthetic", "kwargs": {"seed": 1, "n": 200}},
                                      "metrics": ["loss", "accuracy"], "batch_size": 64}})
NO_FORCED = dataclasses.replace(get_market_params(SPEC), forced_error_bps=0)


def _market(tmp_path: Path, condition: tuple[str, str, float] | None, **kwargs) -> MarketReport:  # type: ignore[no-untyped-def]
    return run_market(tmp_path, spec=SPEC, params=NO_FORCED, n_tasks=1, condition=condition, **{"cheaters": (), **kwargs})


def test_a_met_condition_pays_and_a_missed_one_does_not(tmp_path: Path) -> None:
    met = _market(tmp_path / "met", ("accuracy", ">=", 0.0))
    (task,) = met.tasks
    assert task.outcome == "accepted" and task.condition == ("accuracy", ">=", 0.0)
    accuracy = task.certified_metric
    assert accuracy is not None and 0.0 <= accuracy <= 1.0
    assert all(v.metric == accuracy for v in task.verifications)  # every verifier certified the same committed value
    paid = dict(task.changes)[task.winner]
    assert paid > 0

    missed = _market(tmp_path / "missed", ("accuracy", ">", accuracy))  # the same job: the same certified metric
    (task,) = missed.tasks
    assert task.outcome == "target_missed" and task.certified_metric == accuracy and not task.disputes
    changes = dict(task.changes)
    assert task.winner not in changes  # not paid, and its bond back: a valid bundle that misses a target is not fraud
    p = NO_FORCED
    pool = task.price * p.verifier_share_bps // 10_000
    assert changes["submitter"] == -pool  # the fee back, but for the verifiers' rewards
    assert sum(changes.get(v, 0) for v in ("verifier-1", "verifier-2", "verifier-3")) == pool
    assert sum(missed.balances.values()) == missed.total_supply


def test_a_condition_must_name_an_evaluation_metric(tmp_path: Path) -> None:
    with pytest.raises(MarketError, match="condition"):
        _market(tmp_path, ("bleu", ">=", 0.5))
    with pytest.raises(MarketError, match="condition"):
        run_market(tmp_path / "plain", spec=spec_from_dict({**SPEC.to_dict(), "evaluation": None}), params=NO_FORCED,
                   n_tasks=1, condition=("accuracy", ">=", 0.5))


def test_condition_rule() -> None:
    assert compute_condition_met((), ())
    assert not compute_condition_met(("accuracy", ">=", 0.5), ())  # nobody certified a value: not met
    assert compute_condition_met(("accuracy", ">=", 0.5), (0.1, 0.6, 0.7))  # the median
    assert not compute_condition_met(("accuracy", ">=", 0.5), (0.1, 0.2, 0.9))
    assert compute_condition_met(("loss", "<", 1.0), (0.5, 2.0))  # even count: the lower middle value
    assert not compute_condition_met(("loss", "<", 1.0), (1.0,))


def _lifecycle(condition: tuple, metrics: tuple[float | None, ...]) -> tuple[str, dict[str, int]]:  # type: ignore[type-arg]
    """A task played by hand with a condition; verifiers approve, reporting `metrics`."""
    params = GameParams(n_segments=4, sample_count=2, forced_error_bps=0)
    ledger = MemoryLedger(b"outcome")
    names = ["sub", "sol", *(f"v{i}" for i in range(len(metrics))), params.jackpot_account]
    for n in names:
        open_account(ledger, f"o/{n}", n)
        mint(ledger, f"m/{n}", n, 100_000)
    start = dict(ledger.get_accounts())
    task = apply_post(ledger, params, Post("t", 1, "sub", 10**15, make_requirements({}, ["exact"]), condition=condition))
    task = apply_move(ledger, task, Bid("t", 2, "sol", task.max_price // 2, make_capabilities({}, ["exact"]),
                                        compute_salt_digest("salt")))
    task = apply_move(ledger, task, CloseAuction("t", task.bid_deadline))
    task = apply_move(ledger, task, Commit("t", task.bid_deadline + 1, "sol", "ab" * 32))
    now = task.last_tick + 1
    for i, m in enumerate(metrics):
        task = apply_move(ledger, task, Join("t", now, f"v{i}"))
        task = apply_move(ledger, task, Verdict("t", now, f"v{i}", WEIGHT_ONE, m))
    task = apply_move(ledger, task, Reveal("t", task.whistle_deadline, "sol", "salt"))
    verify_ledger(ledger)
    return task.outcome, {a: b - start[a] for a, b in ledger.get_accounts().items()}


def test_the_state_machine_pays_only_a_met_condition() -> None:
    outcome, changes = _lifecycle(("accuracy", ">=", 0.5), (0.7, 0.7))
    assert outcome == "accepted" and changes["sol"] > 0
    outcome, changes = _lifecycle(("accuracy", ">=", 0.5), (0.3, 0.3))
    assert outcome == "target_missed" and changes["sol"] == 0 and changes["sub"] < 0
    assert changes["v0"] > 0 and changes["v1"] > 0 and changes["jackpot"] == 0
    outcome, changes = _lifecycle(("accuracy", ">=", 0.5), (None, None))  # nobody certified it
    assert outcome == "target_missed" and changes["sol"] == 0
    with pytest.raises(BadMove, match="post.condition"):
        _lifecycle(("accuracy", "==", 0.5), (0.7,))
    with pytest.raises(BadMove, match="verdict.metric"):
        _lifecycle(("accuracy", ">=", 0.5), (float("nan"),))


def test_a_forged_metric_loses_the_dispute(tmp_path: Path) -> None:
    """A cheater's bundle commits metrics its checkpoints do not have: verifiers reject, the referee recomputes."""
    report = _market(tmp_path, ("accuracy", ">=", 0.0), cheaters=("solver-1", "solver-2", "solver-3"))
    (task,) = report.tasks
    assert task.cheated and task.outcome == "solver_wrong"
    assert all(v.verdict == "reject" for v in task.verifications)
    assert sum(report.balances.values()) == report.total_supply
