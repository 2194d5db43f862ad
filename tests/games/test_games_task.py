"""Unit tests of the task lifecycle's pure parts and of rules the scenarios do not reach."""

from __future__ import annotations

import dataclasses

import pytest

from games.auction import make_capabilities
from games.consensus import WEIGHT_ONE
from games.errors import BadMove, WrongPhase
from games.ledger import mint, open_account
from games.ledger_memory import MemoryLedger
from games.task import (
    CHALLENGED,
    FINAL,
    Bid,
    CloseAuction,
    Commit,
    GameParams,
    Join,
    Post,
    Reveal,
    Rule,
    Task,
    Verdict,
    apply_move,
    apply_post,
    compute_fee_estimate,
    compute_is_forced,
    compute_salt_digest,
    compute_segments,
    get_verifier_segments,
    is_approval,
    verify_params,
)

CAPS = make_capabilities({"memory_gb": 32}, ["exact"])
PARAMS = GameParams(solver_bond=2_000, verifier_stake=1_000, forced_error_bps=0, n_segments=50, sample_count=5)


def test_fee_estimate_rounds_up_to_whole_gas() -> None:
    p = GameParams(gas_price=3, flops_per_gas=1_000)
    assert compute_fee_estimate(1, p) == 3
    assert compute_fee_estimate(1_000, p) == 3
    assert compute_fee_estimate(1_001, p) == 6


def test_segments_are_distinct_deterministic_and_per_verifier() -> None:
    beacon = bytes(range(32))
    a = compute_segments(beacon, "v1", 50, 10)
    assert len(set(a)) == 10 and all(0 <= i < 50 for i in a)
    assert a == compute_segments(beacon, "v1", 50, 10)
    assert a != compute_segments(beacon, "v2", 50, 10)
    assert a != compute_segments(bytes(32), "v1", 50, 10)
    assert sorted(compute_segments(beacon, "v1", 5, 5)) == [0, 1, 2, 3, 4]


def test_forced_error_rate_matches_the_parameter() -> None:
    draws = [compute_is_forced(bytes([i % 256, i // 256]) * 16, "salt", 2_500) for i in range(4_000)]
    assert 0.22 < sum(draws) / len(draws) < 0.28
    assert not any(compute_is_forced(bytes(32), f"s{i}", 0) for i in range(200))
    assert all(compute_is_forced(bytes(32), f"s{i}", 10_000) for i in range(200))


def test_approval_threshold() -> None:
    assert is_approval(WEIGHT_ONE) and is_approval(WEIGHT_ONE // 2) and not is_approval(WEIGHT_ONE // 2 - 1)


@pytest.mark.parametrize(("change", "rule"), [
    ({"solver_bond": -1}, "params.solver_bond"),
    ({"gas_price": 0}, "params.gas_price"),
    ({"verifier_share_bps": 9_000, "jackpot_tax_bps": 2_000}, "params.bps"),
    ({"forced_error_bps": 10_001}, "params.bps"),
    ({"sample_count": 0}, "params.sample_count"),
    ({"sample_count": 300, "n_segments": 200}, "params.sample_count"),
    ({"verifier_stake": 0}, "params.verifier_stake"),
    ({"bid_window": 1.5}, "params.bid_window"),
])
def test_bad_params_are_refused(change: dict, rule: str) -> None:
    with pytest.raises(BadMove) as info:
        verify_params(dataclasses.replace(GameParams(), **change))
    assert info.value.rule == rule


def _committed(commitment: str = "ee" * 32) -> tuple[MemoryLedger, Task]:
    ledger = MemoryLedger(b"unit")
    for p in ("sub", "sol", "v1", "v2", "jackpot"):
        open_account(ledger, f"o/{p}", p)
        mint(ledger, f"m/{p}", p, 10_000)
    task = apply_post(ledger, PARAMS, Post("t", 0, "sub", 500 * 10**12))
    with pytest.raises(WrongPhase):
        get_verifier_segments(task, "v1", PARAMS)
    for move in (Bid("t", 1, "sol", 400, CAPS, compute_salt_digest("s")), CloseAuction("t", 10),
                 Commit("t", 11, "sol", commitment), Join("t", 12, "v1"), Join("t", 12, "v2"),
                 Verdict("t", 13, "v1", 0), Verdict("t", 13, "v2", WEIGHT_ONE)):
        task = apply_move(ledger, task, move)
    return ledger, task


def test_unlucky_honest_approver_keeps_its_stake_and_lazy_one_loses_it() -> None:
    """v2 approved; if no wrong segment lies in v2's own sample it attested to nothing wrong and keeps its stake;
    if one does, it loses the stake to the rejecting verifier."""
    for in_sample in (False, True):
        ledger, task = _committed()
        task = apply_move(ledger, task, Reveal("t", 41, "sol", "s"))
        assert task.phase == CHALLENGED
        v2_sample = set(get_verifier_segments(task, "v2", PARAMS))
        outside = [i for i in range(PARAMS.n_segments) if i not in v2_sample]
        wrong = (min(v2_sample),) if in_sample else tuple(outside[:3])
        task = apply_move(ledger, task, Rule("t", 42, "solver_wrong", wrong))
        assert task.phase == FINAL and task.outcome == "solver_wrong"
        assert ledger.balance("v2") == (9_000 if in_sample else 10_000)
        assert ledger.balance("v1") == 10_000 + 2_000 + (1_000 if in_sample else 0)
        assert ledger.balance("sub") == 10_000 and ledger.balance("sol") == 8_000


def test_move_for_another_task_is_refused() -> None:
    ledger, task = _committed()
    with pytest.raises(BadMove, match="move.task_id"):
        apply_move(ledger, task, Join("other", 20, "v1"))
    with pytest.raises(BadMove, match="move.clock"):
        apply_move(ledger, task, Join("t", 1.5, "v1"))  # type: ignore[arg-type]


def test_consensus_splits_the_verifier_share_by_agreement() -> None:
    ledger = MemoryLedger(b"unit")
    for p in ("sub", "sol", "v1", "v2", "v3", "jackpot"):
        open_account(ledger, f"o/{p}", p)
        mint(ledger, f"m/{p}", p, 10_000)
    task = apply_post(ledger, PARAMS, Post("t", 0, "sub", 1_000 * 10**12))
    moves = [Bid("t", 1, "sol", 1_000, CAPS, compute_salt_digest("s")), CloseAuction("t", 10),
             Commit("t", 11, "sol", "11" * 32)]
    moves += [Join("t", 12, v) for v in ("v1", "v2", "v3")]
    moves += [Verdict("t", 13, "v1", WEIGHT_ONE), Verdict("t", 13, "v2", WEIGHT_ONE),
              Verdict("t", 13, "v3", 6_000), Reveal("t", 41, "sol", "s")]
    for move in moves:
        task = apply_move(ledger, task, move)
    assert task.outcome == "accepted"
    # pool = 15% of 1000 = 150, split by stake x clipped weight: 10000 : 10000 : 6000
    rewards = {v: ledger.balance(v) - 10_000 for v in ("v1", "v2", "v3")}
    assert sum(rewards.values()) == 150
    assert rewards["v1"] == rewards["v2"] > rewards["v3"] > 0
    assert abs(rewards["v3"] - 150 * 6 / 26) < 1


def test_forced_error_with_an_empty_jackpot_changes_nothing_until_funded() -> None:
    from games.errors import InsufficientFunds

    params = dataclasses.replace(PARAMS, forced_error_bps=10_000, jackpot_payout=600)
    ledger = MemoryLedger(b"unit")
    for p in ("sub", "sol", "v1", "v2", "jackpot"):
        open_account(ledger, f"o/{p}", p)
        if p != "jackpot":
            mint(ledger, f"m/{p}", p, 10_000)
    task = apply_post(ledger, params, Post("t", 0, "sub", 500 * 10**12))
    for move in (Bid("t", 1, "sol", 400, CAPS, compute_salt_digest("s")), CloseAuction("t", 10),
                 Commit("t", 11, "sol", "ee" * 32), Join("t", 12, "v1"), Join("t", 12, "v2"),
                 Verdict("t", 13, "v1", 0), Verdict("t", 13, "v2", 0)):
        task = apply_move(ledger, task, move)
    reveal = Reveal("t", 41, "sol", "s", "11" * 32)
    before = (ledger.get_accounts(), ledger.get_escrows(), len(ledger.events()))
    with pytest.raises(InsufficientFunds):
        apply_move(ledger, task, reveal)
    assert (ledger.get_accounts(), ledger.get_escrows(), len(ledger.events())) == before
    mint(ledger, "m/jackpot", "jackpot", 600)
    task = apply_move(ledger, task, reveal)
    assert task.round == 1 and task.forced and task.commitment == "11" * 32
    assert ledger.balance("v1") == ledger.balance("v2") == 10_000 + 300
    assert ledger.balance("jackpot") == 0
