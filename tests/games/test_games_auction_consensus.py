"""The reverse auction and the Yuma-style consensus: unit and property tests."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from games.auction import (
    Bid,
    Order,
    compute_tiebreak,
    compute_winner,
    is_compliant,
    make_capabilities,
    make_requirements,
    verify_bid,
)
from games.consensus import (
    WEIGHT_ONE,
    compute_split,
    compute_verdict_consensus,
    compute_weighted_median,
    compute_yuma,
    verify_weight,
)
from games.errors import BadMove, BidRejected

NEED = make_requirements({"memory_gb": 16, "tflops": 10}, ["exact", "cuda"])
ORDER = Order("task-1", 1_000, NEED)
FULL = make_capabilities({"memory_gb": 16, "tflops": 50}, ["cuda", "exact", "extra"])


def test_compliance() -> None:
    assert is_compliant(ORDER, Bid("a", 1_000, FULL))
    assert not is_compliant(ORDER, Bid("a", 1_001, FULL))
    assert not is_compliant(ORDER, Bid("a", 0, FULL))
    assert not is_compliant(ORDER, Bid("a", 500, make_capabilities({"memory_gb": 15, "tflops": 50},
                                                                  ["cuda", "exact"])))
    assert not is_compliant(ORDER, Bid("a", 500, make_capabilities({"memory_gb": 16, "tflops": 50}, ["cuda"])))
    with pytest.raises(BidRejected) as info:
        verify_bid(ORDER, Bid("a", 500, make_capabilities({"tflops": 50}, ["cuda"])))
    assert info.value.rule == "bid.requirements" and "memory_gb>=16" in str(info.value) and "exact" in str(
        info.value)
    with pytest.raises(BidRejected, match="bid.price"):
        verify_bid(ORDER, Bid("a", 2_000, FULL))
    verify_bid(ORDER, Bid("a", 1, FULL))


def test_winner_is_lowest_compliant_bid() -> None:
    bids = [Bid("cheap-but-weak", 100, make_capabilities()), Bid("b", 700, FULL), Bid("c", 600, FULL),
            Bid("too-dear", 1_100, FULL)]
    assert compute_winner(ORDER, bids) == bids[2]
    assert compute_winner(ORDER, [bids[0], bids[3]]) is None
    assert compute_winner(ORDER, []) is None


@given(st.lists(st.sampled_from("abcdefgh"), min_size=2, max_size=8, unique=True), st.text(min_size=1,
                                                                                          max_size=8))
@settings(max_examples=50)
def test_ties_are_broken_by_hash_whatever_the_order(bidders: list[str], task_id: str) -> None:
    order = Order(task_id, 1_000, NEED)
    bids = [Bid(b, 500, FULL) for b in bidders]
    winner = compute_winner(order, bids)
    assert winner is not None
    assert winner.bidder == min(bidders, key=lambda b: compute_tiebreak(task_id, b))
    assert compute_winner(order, list(reversed(bids))) == winner


def test_tiebreak_depends_on_task() -> None:
    winners = {min("ab", key=lambda b: compute_tiebreak(f"t{i}", b)) for i in range(40)}
    assert winners == {"a", "b"}, "over many tasks both bidders win some ties"


def test_weighted_median_examples() -> None:
    stakes = {"a": 1, "b": 1, "c": 1}
    assert compute_weighted_median({"a": 10, "b": 20, "c": 30}, stakes) == 20
    assert compute_weighted_median({"a": 10, "b": 20, "c": 30}, {"a": 1, "b": 1, "c": 5}) == 30
    assert compute_weighted_median({"a": 10, "b": 20}, {"a": 1, "b": 1}) == 20, "exactly half the stake suffices"
    assert compute_weighted_median({"a": 10}, {"a": 0}) == 0
    assert compute_weighted_median({}, {}) == 0


@given(st.dictionaries(st.sampled_from("abcdef"), st.tuples(st.integers(0, WEIGHT_ONE), st.integers(1, 1000)),
                       min_size=1))
@settings(max_examples=200)
def test_weighted_median_is_the_largest_supported_weight(data: dict[str, tuple[int, int]]) -> None:
    values = {k: v for k, (v, _) in data.items()}
    stakes = {k: s for k, (_, s) in data.items()}
    total = sum(stakes.values())
    c = compute_weighted_median(values, stakes)

    def support(w: int) -> int:
        return sum(stakes[k] for k in values if values[k] >= w)

    assert 2 * support(c) >= total
    assert all(2 * support(w) < total for w in set(values.values()) if w > c)
    assert c in values.values()


def test_yuma_clips_outliers_and_splits_rewards() -> None:
    weights = {"honest1": {"m1": 8_000, "m2": 2_000}, "honest2": {"m1": 8_000, "m2": 2_000},
               "colluder": {"m1": 0, "m2": WEIGHT_ONE}}
    stakes = {"honest1": 10, "honest2": 10, "colluder": 15}
    result = compute_yuma(weights, stakes)
    assert result.consensus == {"m1": 8_000, "m2": 2_000}
    assert result.clipped["colluder"] == {"m1": 0, "m2": 2_000}
    assert result.trust["honest1"] == 1 and result.trust["colluder"] == Fraction(2_000, WEIGHT_ONE)
    assert result.scores["honest1"] == 10 * WEIGHT_ONE and result.scores["colluder"] == 15 * 2_000


def test_verdict_consensus_rewards_agreement_either_way() -> None:
    stakes = {"a": 5, "b": 5, "c": 5}
    approve = compute_verdict_consensus({"a": WEIGHT_ONE, "b": WEIGHT_ONE, "c": 0}, stakes)
    assert approve.consensus == {"valid": WEIGHT_ONE, "invalid": 0}
    assert approve.scores["c"] == 0 < approve.scores["a"] == approve.scores["b"]
    reject = compute_verdict_consensus({"a": 0, "b": 0, "c": WEIGHT_ONE}, stakes)
    assert reject.scores["c"] == 0 < reject.scores["a"]
    partial = compute_verdict_consensus({"a": WEIGHT_ONE, "b": WEIGHT_ONE, "c": 7_000}, stakes)
    assert partial.scores["c"] == 5 * 7_000 and partial.trust["c"] == Fraction(7, 10)
    with pytest.raises(BadMove):
        compute_verdict_consensus({"a": WEIGHT_ONE + 1}, {"a": 1})
    with pytest.raises(BadMove):
        compute_yuma({"a": {"x": -1}}, {"a": 1})
    assert compute_yuma({"a": {"x": 0}}, {"a": 1}).trust["a"] == 0


@pytest.mark.parametrize("weight", [-1, WEIGHT_ONE + 1, 0.5, "1", True])
def test_verify_weight_refuses(weight: object) -> None:
    with pytest.raises(BadMove, match="verdict.weight"):
        verify_weight(weight)


@given(st.integers(0, 10**9), st.dictionaries(st.text(max_size=3), st.integers(0, 10**6), max_size=8))
@settings(max_examples=200)
def test_split_is_exact_and_proportional(total: int, shares: dict[str, int]) -> None:
    parts = compute_split(total, shares)
    weight = sum(shares.values())
    if weight == 0 or total == 0:
        assert parts == {}
        return
    assert sum(parts.values()) == total
    for k, part in parts.items():
        exact = Fraction(total * shares[k], weight)
        assert exact - 1 < part < exact + 1
