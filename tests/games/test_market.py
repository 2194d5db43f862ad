"""The market with real work (`games.market.run_market`): real training, real verification, real disputes, a ledger
that settles through the task lifecycle, and a journal that survives a crash."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import games.market as market
from games.errors import GameError, MarketError
from games.ledger import verify_ledger
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger
from games.market import DisputeOutcome, MarketEvent, MarketReport, get_market_params, report_to_dict, run_market
from games.task import GameParams
from pol.bundle import open_bundle
from pol.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
SPEC = spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 16}},
                       "data": {"name": "synthetic", "kwargs": {"n": 256}},
                       "steps": 16, "every": 4, "batch_size": 8})
NO_FORCED = dataclasses.replace(get_market_params(SPEC), forced_error_bps=0)


class Crash(RuntimeError):
    pass


def _conserved(report: MarketReport) -> None:
    assert report.total_supply == sum(report.funding.values())
    assert sum(report.balances.values()) == report.total_supply  # every escrow is empty again


def test_honest_market_settles(tmp_path: Path) -> None:
    events: list[MarketEvent] = []
    report = run_market(tmp_path, spec=SPEC, params=NO_FORCED, n_tasks=1, cheaters=(), on_event=events.append)
    (task,) = report.tasks
    p = NO_FORCED
    assert task.outcome == "accepted" and not task.disputes and not task.forced and not task.cheated
    assert task.winner == min(task.bids, key=lambda b: b[1])[0] and task.price == min(b[1] for b in task.bids)
    assert all(v.verdict == "accept" and len(v.segments) == p.sample_count for v in task.verifications)
    tax, pool = task.price * p.jackpot_tax_bps // 10_000, task.price * p.verifier_share_bps // 10_000
    assert report.balances[task.winner] == report.funding[task.winner] + task.price - tax - pool
    rewards = {v: report.balances[v] - report.funding[v] for v in ("verifier-1", "verifier-2", "verifier-3")}
    assert all(r > 0 for r in rewards.values()) and sum(rewards.values()) == pool
    assert report.balances["submitter"] == report.funding["submitter"] - task.price
    _conserved(report)
    assert report.ledger_path == tmp_path / "ledger.db" and report.market_events == len(events)
    assert [e.seq for e in events] == list(range(len(events))) and events[-1].kind == "done"
    assert not report.resumed and report_to_dict(report)["tasks"][0]["outcome"] == "accepted"
    with SqliteLedger(tmp_path / "ledger.db") as ledger:
        verify_ledger(ledger)
        assert ledger.get_accounts() == report.balances and len(ledger.events()) == report.ledger_events


@dataclasses.dataclass
class CheatRun:
    workdir: Path
    report: MarketReport
    calls: list[tuple[Path, int]]


CHEAT_ARGS = {"spec": SPEC, "params": NO_FORCED, "n_tasks": 2, "cheaters": ("solver-2",), "seed": 5}


@pytest.fixture(scope="module")
def cheat_run(tmp_path_factory: pytest.TempPathFactory) -> CheatRun:
    """Two jobs on the SQLite ledger; the cheater solver-2 undercuts and wins job-0; disputes by pinpoint."""
    workdir = tmp_path_factory.mktemp("cheat")
    calls: list[tuple[Path, int]] = []

    def dispute(bundle: Path, segment: int) -> DisputeOutcome:
        calls.append((bundle, segment))
        return market.default_dispute(bundle, segment)

    return CheatRun(workdir, run_market(workdir, dispute=dispute, **CHEAT_ARGS), calls)


def test_cheating_winner_is_caught_through_the_dispute(cheat_run: CheatRun) -> None:
    report, p = cheat_run.report, NO_FORCED
    first, second = report.tasks
    assert first.winner == "solver-2" and first.cheated and first.outcome == "solver_wrong"
    # half the checkpoints are forged: segments 2 and 3 of 4 are wrong, and every sample of 3 holds one of them
    assert all(v.verdict == "reject" and set(v.failed) == set(v.segments) & {2, 3} for v in first.verifications)
    forged = cheat_run.workdir / "tasks" / "job-0" / "forged"
    assert sorted(cheat_run.calls) == [(forged, 2), (forged, 3)]
    assert [(d.segment, d.ruling) for d in first.disputes] == [(2, "solver_wrong"), (3, "solver_wrong")]
    assert all(d.description for d in first.disputes)
    # the cheater's bond goes to the challengers; unable to cover another, it sits out job-1 (an honest win)
    bond_share = p.solver_bond // len(first.verifications)
    assert dict(first.changes) == {"solver-2": -p.solver_bond, **{v.verifier: bond_share for v in first.verifications}}
    assert report.balances["solver-2"] == report.funding["solver-2"] - p.solver_bond
    assert "solver-2" not in dict(second.bids) and second.outcome == "accepted" and not second.cheated
    _conserved(report)


def test_default_dispute_falls_back_to_replay(cheat_run: CheatRun, monkeypatch: pytest.MonkeyPatch) -> None:
    job = cheat_run.workdir / "tasks" / "job-0"
    assert market.pinpoint_dispute(job / "honest", 1).ruling == "challenger_wrong"

    def missing(bundle: Path, segment: int, **_: object) -> DisputeOutcome:
        raise ImportError("no pinpoint here")

    monkeypatch.setattr(market, "pinpoint_dispute", missing)
    wrong, right = market.default_dispute(job / "forged", 3), market.default_dispute(job / "forged", 0)
    assert (wrong.ruling, right.ruling) == ("solver_wrong", "challenger_wrong")
    assert all("pinpoint unavailable" in d.description and "replay referee" in d.description for d in (wrong, right))


def test_forced_error_is_caught_and_lazy_verifier_pays(tmp_path: Path) -> None:
    forced = dataclasses.replace(NO_FORCED, forced_error_bps=10_000)
    events: list[MarketEvent] = []
    report = run_market(tmp_path, spec=SPEC, params=forced, n_tasks=1, cheaters=(), lazy_verifiers=("verifier-3",),
                        on_event=events.append)
    (task,) = report.tasks
    round0 = [v for v in task.verifications if v.round == 0]
    assert task.forced and task.outcome == "accepted" and not task.disputes
    assert {v.verifier: v.verdict for v in round0} == {"verifier-1": "reject", "verifier-2": "reject",
                                                       "verifier-3": "unchecked"}
    assert all(set(v.failed) == set(v.segments) for v in round0 if v.verdict == "reject")  # every segment wrong
    assert {v.verdict for v in task.verifications if v.round == 1} == {"accept", "unchecked"}
    with open_bundle(tmp_path / "tasks" / "job-0" / "honest") as honest:
        assert task.commitment == honest.manifest.root  # round 1 verified the true, honest commitment
    assert any(e.kind == "reveal" and "forced error revealed" in e.text for e in events)
    # the catchers shared the jackpot payout; the lazy approver lost its round-0 stake to the jackpot
    assert report.balances["verifier-1"] - report.funding["verifier-1"] >= forced.jackpot_payout // 2
    assert report.balances["verifier-3"] < report.funding["verifier-3"] - forced.verifier_stake // 2
    _conserved(report)


CRASHES = (lambda e: e.kind == "bid",  # after a move hit the ledger, before the journal has it
           lambda e: e.kind == "verdict",
           lambda e: e.kind == "dispute" and e.text.startswith("segment"),  # a ruling known, not yet on the ledger
           lambda e: e.kind == "rule",
           lambda e: e.kind == "settle")


def _crash_if(when: Callable[[MarketEvent], bool], event: MarketEvent) -> None:
    if when(event) and not event.replayed:
        raise Crash(str(event))


def test_rerun_after_crashes_finishes_exactly_once(cheat_run: CheatRun, tmp_path: Path) -> None:
    for crash_when in CRASHES:
        with pytest.raises(Crash):
            run_market(tmp_path, on_event=functools.partial(_crash_if, crash_when), **CHEAT_ARGS)
    events: list[MarketEvent] = []
    resumed = run_market(tmp_path, on_event=events.append, **CHEAT_ARGS)
    clean = cheat_run.report
    assert resumed.resumed and events[0].kind == "resume" and any(e.replayed for e in events)
    assert resumed.balances == clean.balances and resumed.ledger_events == clean.ledger_events
    assert [(t.winner, t.outcome, t.changes) for t in resumed.tasks] == [(t.winner, t.outcome, t.changes)
                                                                        for t in clean.tasks]
    with SqliteLedger(tmp_path / "ledger.db") as a, SqliteLedger(cheat_run.workdir / "ledger.db") as b:
        verify_ledger(a)
        assert a.head() == b.head()  # the same log, event for event
    again = run_market(tmp_path, **CHEAT_ARGS)  # a finished market re-runs as a replay
    assert again.balances == clean.balances and again.ledger_events == clean.ledger_events


def test_journal_of_another_market_is_refused(tmp_path: Path) -> None:
    forced = dataclasses.replace(NO_FORCED, forced_error_bps=10_000)
    with pytest.raises(Crash):
        run_market(tmp_path, spec=SPEC, params=forced, n_tasks=1, cheaters=(), on_event=_crash_at_first)
    with pytest.raises(MarketError) as info:
        run_market(tmp_path, spec=SPEC, params=forced, n_tasks=1, cheaters=(), seed=1)
    assert info.value.rule == "market.journal"


def test_same_seed_same_ledger_in_another_process(cheat_run: CheatRun, tmp_path: Path) -> None:
    """Everything (prices, beacons, forged noise, samples, rulings) follows from the seed, not from the process."""
    code = ("import sys; from pathlib import Path; from games.market import run_market; "
            "from tests.games.test_market import CHEAT_ARGS; run_market(Path(sys.argv[1]), **CHEAT_ARGS)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT, timeout=300)
    with SqliteLedger(tmp_path / "ledger.db") as a, SqliteLedger(cheat_run.workdir / "ledger.db") as b:
        assert a.head() == b.head() and a.get_accounts() == b.get_accounts()


def test_journal_that_diverges_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        run_market(tmp_path, on_event=functools.partial(_crash_if, lambda e: e.kind == "commit"), **CHEAT_ARGS)
    path = tmp_path / market.JOURNAL_NAME
    body = json.loads(path.read_text())
    bid = next(m for m in body["moves"] if m["kind"] == "bid")
    bid["price"] += 1  # a journal whose moves no longer follow from the seed
    path.write_text(json.dumps(body))
    with pytest.raises(MarketError) as info:
        run_market(tmp_path, **CHEAT_ARGS)
    assert info.value.rule == "market.journal" and "diverged" in info.value.detail


def _crash_at_first(event: MarketEvent) -> None:
    raise Crash(str(event))


@pytest.mark.parametrize(("kwargs", "rule"), [({"cheaters": ("solver-9",)}, "market.cheaters"),
                                              ({"lazy_verifiers": ("nobody",)}, "market.lazy_verifiers"),
                                              ({"n_tasks": 0}, "market.counts"),
                                              ({"params": GameParams(solver_bond=0)}, "params.solver_bond")])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, rule: str) -> None:
    with pytest.raises(GameError) as info:
        run_market(tmp_path, spec=SPEC, **kwargs)
    assert getattr(info.value, "rule", "") == rule and not (tmp_path / market.JOURNAL_NAME).exists()


def test_dispute_must_rule(tmp_path: Path) -> None:
    with pytest.raises(MarketError) as info:
        run_market(tmp_path, spec=SPEC, params=NO_FORCED, n_tasks=1, cheaters=("solver-2",),
                   ledger=MemoryLedger(b"z"), dispute=lambda bundle, segment: "maybe")
    assert info.value.rule == "market.dispute"


def test_default_market_params_follow_the_spec() -> None:
    p = get_market_params(SPEC)
    assert (p.n_segments, p.sample_count) == (4, 3)
    assert get_market_params(SPEC, GameParams(sample_count=9)).sample_count == 4
