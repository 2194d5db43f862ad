"""Stake-weighted consensus among verifiers, in the manner of Bittensor's Yuma consensus, and exact reward splits.

Weights are integers in [0, WEIGHT_ONE] (basis points), stakes are integer amounts. For each column j (a task, or
a verdict option) with weights W[i][j] from verifiers i holding stake S[i]:

    consensus[j] = the largest w such that  sum(S[i] : W[i][j] >= w) * 2 >= sum(S)    (stake-weighted median)
    clipped[i][j] = min(W[i][j], consensus[j])     a weight above what half the stake supports counts no more
    trust[i]      = sum_j clipped[i][j] / sum_j W[i][j]    (the share of i's weight that survived clipping)
    score[i]      = S[i] * sum_j clipped[i][j]     rewards are split in proportion to score

A verdict on one task is the two-column case (valid: w, invalid: WEIGHT_ONE - w), so a verifier is rewarded for
agreeing with the stake-weighted consensus in either direction, and a minority (or a lone dissenter trying to pull
the result) earns only what the majority supports.

`compute_split` divides an amount in proportion to integer shares exactly: floors first, then the leftover units
one each to the largest remainders (ties by key order), so the parts always sum to the whole.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

from games.errors import BadMove

__all__ = [
    "WEIGHT_ONE",
    "Weight",
    "YumaResult",
    "compute_split",
    "compute_verdict_consensus",
    "compute_weighted_median",
    "compute_yuma",
    "verify_weight",
]

Weight = int  # in [0, WEIGHT_ONE]
WEIGHT_ONE: Weight = 10_000

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class YumaResult:
    """Consensus per column, clipped weights, trust and reward score per verifier (read-only mappings)."""

    consensus: Mapping[str, Weight]
    clipped: Mapping[str, Mapping[str, Weight]]
    trust: Mapping[str, Fraction]
    scores: Mapping[str, int]


def verify_weight(weight: object) -> None:
    """Raises BadMove (rule 'verdict.weight') unless `weight` is an int in [0, WEIGHT_ONE]."""
    if type(weight) is not int or not 0 <= weight <= WEIGHT_ONE:
        raise BadMove("verdict.weight", f"{weight!r} not an int in 0..{WEIGHT_ONE}")


def compute_weighted_median(values: Mapping[str, Weight], stakes: Mapping[str, int]) -> Weight:
    """The largest w such that the verifiers giving at least w hold at least half the stake (0 if no stake)."""
    total = sum(stakes[k] for k in values)
    if total <= 0:
        return 0
    acc = 0
    for value, key in sorted(((v, k) for k, v in values.items()), reverse=True):
        acc += stakes[key]
        if 2 * acc >= total:
            return value
    raise AssertionError("unreachable: the loop covers all the stake")


def compute_yuma(weights: Mapping[str, Mapping[str, Weight]], stakes: Mapping[str, int]) -> YumaResult:
    """Yuma-style consensus over `weights[verifier][column]`. Raises BadMove for a weight out of range."""
    for row in weights.values():
        for w in row.values():
            verify_weight(w)
    columns = sorted({c for row in weights.values() for c in row})
    consensus = {c: compute_weighted_median({v: row.get(c, 0) for v, row in weights.items()}, stakes)
                 for c in columns}
    clipped = {v: {c: min(row.get(c, 0), consensus[c]) for c in columns} for v, row in weights.items()}
    trust = {v: (Fraction(sum(clipped[v].values()), sum(row.values())) if sum(row.values()) else Fraction(0))
             for v, row in weights.items()}
    scores = {v: stakes[v] * sum(clipped[v].values()) for v in weights}
    return YumaResult(consensus, clipped, trust, scores)


def compute_verdict_consensus(verdicts: Mapping[str, Weight], stakes: Mapping[str, int]) -> YumaResult:
    """Yuma over one task's verdicts: column 'valid' gets w, column 'invalid' gets WEIGHT_ONE - w.
    Raises BadMove for a weight out of range."""
    for w in verdicts.values():
        verify_weight(w)
    return compute_yuma({v: {"valid": w, "invalid": WEIGHT_ONE - w} for v, w in verdicts.items()}, stakes)


def compute_split(total: int, shares: Mapping[K, int]) -> dict[K, int]:
    """Split `total` in proportion to non-negative integer `shares`; the parts sum to `total` exactly.
    Returns {} when all shares are zero (the caller decides where the money goes)."""
    weight = sum(shares.values())
    if weight <= 0 or total <= 0:
        return {}
    keys = sorted(shares, key=str)
    parts = {k: total * shares[k] // weight for k in keys}
    leftover = total - sum(parts.values())
    by_remainder = sorted(keys, key=lambda k: (-(total * shares[k] % weight), str(k)))
    for k in by_remainder[:leftover]:
        parts[k] += 1
    return parts
