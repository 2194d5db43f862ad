"""The reverse auction that assigns a task to a solver (in the manner of Akash's order book).

A submitter's `Order` states a maximum price and `Requirements` (numeric resources such as memory or FLOP/s, and
attributes such as 'exact-numerics' or 'gpu'). Solvers answer with `Bid`s stating a price and their `Capabilities`.

    compliant(bid)  <=>  bid.price <= order.max_price  and  every required resource <= the offered amount
                         and  every required attribute is offered
    winner          =    the compliant bid with the lowest price; among equal prices the one with the smallest
                         blake3(TIE_DOMAIN || task id || bidder) (nobody can choose a hash, so nobody wins ties
                         by position, name order or timing)

Losers' deposits are returned by the task lifecycle (`games.task`), not here: this module is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from blake3 import blake3

from games.errors import BidRejected

__all__ = [
    "TIE_DOMAIN",
    "Bid",
    "Capabilities",
    "Order",
    "Requirements",
    "compute_tiebreak",
    "compute_winner",
    "is_compliant",
    "make_capabilities",
    "make_requirements",
    "verify_bid",
]

TIE_DOMAIN = b"pol.games.auction.tie.v1\x00"


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a task needs: `resources` as sorted (name, minimum) pairs, `attributes` as a sorted tuple."""

    resources: tuple[tuple[str, int], ...] = ()
    attributes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a solver offers: `resources` as sorted (name, amount) pairs, `attributes` as a sorted tuple."""

    resources: tuple[tuple[str, int], ...] = ()
    attributes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Order:
    task_id: str
    max_price: int
    requirements: Requirements


@dataclass(frozen=True, slots=True)
class Bid:
    bidder: str
    price: int
    capabilities: Capabilities


def make_requirements(resources: Mapping[str, int] | None = None, attributes: Iterable[str] = ()) -> Requirements:
    """Canonical (sorted) requirements from a mapping and an iterable."""
    return Requirements(tuple(sorted((resources or {}).items())), tuple(sorted(set(attributes))))


def make_capabilities(resources: Mapping[str, int] | None = None, attributes: Iterable[str] = ()) -> Capabilities:
    """Canonical (sorted) capabilities from a mapping and an iterable."""
    return Capabilities(tuple(sorted((resources or {}).items())), tuple(sorted(set(attributes))))


def _unmet(requirements: Requirements, offered: Capabilities) -> list[str]:
    have = dict(offered.resources)
    missing = [f"{name}>={need}" for name, need in requirements.resources if have.get(name, 0) < need]
    return missing + [a for a in requirements.attributes if a not in offered.attributes]


def is_compliant(order: Order, bid: Bid) -> bool:
    """Whether `bid` is at or under the maximum price, positive, and meets every requirement."""
    return 0 < bid.price <= order.max_price and not _unmet(order.requirements, bid.capabilities)


def verify_bid(order: Order, bid: Bid) -> None:
    """Raises BidRejected (rule 'bid.price' or 'bid.requirements') unless `bid` is compliant."""
    if not 0 < bid.price <= order.max_price:
        raise BidRejected("bid.price", f"{bid.price} not in 1..{order.max_price}")
    missing = _unmet(order.requirements, bid.capabilities)
    if missing:
        raise BidRejected("bid.requirements", "missing " + ", ".join(missing))


def compute_tiebreak(task_id: str, bidder: str) -> bytes:
    """The hash that orders bids of equal price: blake3(TIE_DOMAIN || len-prefixed task id || bidder)."""
    tid = task_id.encode()
    return blake3(TIE_DOMAIN + len(tid).to_bytes(4, "big") + tid + bidder.encode()).digest()


def compute_winner(order: Order, bids: Iterable[Bid]) -> Bid | None:
    """The lowest compliant bid, ties broken by `compute_tiebreak`; None when no bid complies."""
    compliant = [b for b in bids if is_compliant(order, b)]
    if not compliant:
        return None
    return min(compliant, key=lambda b: (b.price, compute_tiebreak(order.task_id, b.bidder)))
