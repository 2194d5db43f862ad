"""The task lifecycle: a pure state machine `(ledger, params, task, move) -> task` whose only side effects are
idempotent ledger operations with op ids derived from (task id, round, transition, party).

    POSTED     Post: the submitter's fee estimate (gas price x operator FLOPs) is escrowed as the maximum price.
       |       Bid*: solvers bid (price <= max, capabilities meeting the requirements, a deposit locked, and the
       |             digest of a secret salt that will decide forced errors).
       v       CloseAuction (at/after the bid deadline): lowest compliant bid wins, ties by hash; losers' deposits
    ASSIGNED         returned; the forced-error beacon is drawn.
       |       Commit (before the commit deadline): the winner locks its bond and posts its commitment (a hex
       v             digest); its deposit returns; the segment beacon is drawn *after* the commitment.
    COMMITTED  Join*/Verdict* (before the verify deadline): verifiers lock a stake, then give a weight in
       |             [0, WEIGHT_ONE] (>= half approves, below challenges). What each replays
       |             (`get_verifier_segments`) comes from the segment beacon: with `params.sampling` 'independent'
       |             every verifier draws its own sample; with 'shared' the committee (the verifiers who joined;
       |             closed by the first verdict) splits ONE sample into disjoint shares dealt by a permutation
       |             keyed by the beacon and the committee, so no verifier chooses its share. The sample's size is
       |             the task's posted detection (confidence against a cheat fraction, `Post.detection`) through
       |             the hypergeometric bound (`games.cost.compute_required_samples`), else `params.sample_count`.
       |       Join(replaces=silent)/Verdict (between the verify and the whistle deadline): a silent verifier
       |             (joined, no verdict by the verify deadline) has its sample re-assigned: a fresh verifier stakes
       |             in its place and replays exactly the silent one's segments. The silent one is slashed at the
       |             reveal like any silent verifier.
       |       Whistle* (between the verify and the whistle deadline): whistleblowers lock a deposit and challenge
       |             the result and every verifier who approved it.
       |       Reveal (between the whistle and the reveal deadline): the solver reveals its salt. Verifiers who
       |             joined but gave no verdict lose their stake to the jackpot. Then:
       |         - forced error (round 0, beacon+salt below the forced rate; every segment counts as wrong):
       |           challengers share the jackpot payout, approvers lose their stake (to whistleblowers, else
       |           the jackpot), and the solver's true
       |           commitment starts round 1 (a fresh verification window, no forced error);
       |         - no challenger: settled for the solver (fee, verifier rewards by Yuma consensus, jackpot tax,
       |           refund of the excess fee) -> FINAL; but if the Post named an outcome condition (metric,
       |           comparison, threshold) and the median of the approvers' certified final metrics does not meet it
       |           (or no approver certified one), the task ends 'target_missed': the verifiers are rewarded as
       |           usual, the rest of the fee goes back to the submitter, the solver is paid nothing and gets its
       |           bond back (its bundle is valid: missing a target is not fraud, so nothing is slashed);
       v         - otherwise -> CHALLENGED.
    CHALLENGED Rule (the outcome of the pinpoint dispute, with the segments shown wrong): 'solver_wrong' ->
       |             the bond goes to the challengers; an approver whose own beacon-drawn sample holds a wrong
       |             segment attested to it and loses its stake (to the whistleblowers, else the rejecting
       |             verifiers), while an approver whose sample missed every wrong segment gets its stake back
       |             (an honest verifier is never punished for bad luck); the fee goes back to the submitter.
       |             'challenger_wrong' -> challengers' stakes and deposits go to the solver, then settled for
       v             the solver.
    FINAL      Every escrow of the task is zero.

    Timeout: past the commit deadline the winner's deposit goes to the submitter and the fee is refunded; past the
    reveal deadline the solver's bond goes to the challengers (else the submitter) and the fee is refunded.

Rules are checked before any money moves; within one transition only the first ledger operation can fail for
lack of funds (the acting party's lock, or the jackpot payout), and the rest move money out of escrows the task
knows are funded. The operations of a transition depend only on the task and the move, never on live balances, so
re-applying a move after a crash re-issues the same op ids and pays nothing twice. Time is `now` in ledger ticks,
passed with every move and never decreasing.

Raises (all `RuleViolation`s name their rule): WrongPhase, DeadlineMissed, NotAuthorized, DuplicateMove,
BidRejected, BadMove, SaltMismatch; and the ledger's InsufficientFunds / UnknownAccount for a party who cannot pay.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from blake3 import blake3

from games.auction import Bid as AuctionBid
from games.auction import Capabilities, Order, Requirements, compute_winner, verify_bid
from games.consensus import WEIGHT_ONE, Weight, compute_split, compute_verdict_consensus, verify_weight
from games.errors import (
    BadMove,
    DeadlineMissed,
    DuplicateMove,
    NotAuthorized,
    SaltMismatch,
    WrongPhase,
)
from games.ledger import AccountId, Amount, Ledger, lock, release, slash
from pol.canonical import is_digest

__all__ = [
    "ASSIGNED",
    "CHALLENGED",
    "COMMITTED",
    "FINAL",
    "MOVE_TYPES",
    "POSTED",
    "RULINGS",
    "SAMPLINGS",
    "CONDITION_OPS",
    "Bid",
    "CloseAuction",
    "Commit",
    "GameParams",
    "Join",
    "Move",
    "Post",
    "Reveal",
    "Rule",
    "Task",
    "TaskBid",
    "TaskId",
    "Tick",
    "Timeout",
    "Verdict",
    "Whistle",
    "apply_move",
    "apply_post",
    "compute_condition_met",
    "compute_fee_estimate",
    "compute_is_forced",
    "compute_salt_digest",
    "compute_segments",
    "compute_share_order",
    "compute_shared_sample",
    "compute_shares",
    "get_committee",
    "get_sample_size",
    "get_task_escrows",
    "get_verifier_segments",
    "is_approval",
    "verify_detection",
    "verify_params",
]

Tick = int
TaskId = str

POSTED, ASSIGNED, COMMITTED, CHALLENGED, FINAL = "posted", "assigned", "committed", "challenged", "final"
RULINGS = ("solver_wrong", "challenger_wrong")
CONDITION_OPS = (">=", ">", "<=", "<")  # how a certified metric is compared with an outcome condition's threshold
BPS = 10_000
SALT_DOMAIN = b"pol.games.task.salt.v1\x00"
FORCED_DOMAIN = b"pol.games.task.forced.v1\x00"
SEGMENT_DOMAIN = b"pol.games.task.segments.v1\x00"
SHARE_DOMAIN = b"pol.games.task.shares.v1\x00"
SAMPLINGS = ("independent", "shared")


@dataclass(frozen=True, slots=True)
class GameParams:
    """Economic and timing parameters of the game. The defaults are justified in `games.simulate`."""

    gas_price: Amount = 1  # base units per gas unit
    flops_per_gas: int = 10**12  # one gas unit = 1e12 operator FLOPs
    bid_deposit: Amount = 100  # locked with every bid; the winner's is lost if it never commits
    solver_bond: Amount = 3_000  # locked at commit; lost to the challengers if the solver is proven wrong
    verifier_stake: Amount = 5_000  # locked per verifier and round; lost for approving a wrong result
    whistle_deposit: Amount = 500  # locked per whistleblower; lost to the solver if the challenge fails
    verifier_share_bps: int = 1_500  # share of the price paid to verifiers (split by Yuma consensus)
    jackpot_tax_bps: int = 500  # share of the price paid into the jackpot
    forced_error_bps: int = 500  # probability of a forced error, in basis points
    jackpot_payout: Amount = 1_000  # paid from the jackpot, split among those who catch a forced error
    n_segments: int = 200  # checkpoint segments in a job's trace
    sample_count: int = 8  # segments each verifier replays (independent) or the committee splits (shared), unless
    #                        the task posts a required detection
    sampling: str = "independent"  # 'independent' samples per verifier, or one 'shared' committee sample
    bid_window: Tick = 10
    commit_window: Tick = 10
    verify_window: Tick = 20
    whistle_window: Tick = 10
    reveal_window: Tick = 10
    jackpot_account: AccountId = "jackpot"


@dataclass(frozen=True, slots=True)
class TaskBid:
    bidder: AccountId
    price: Amount
    capabilities: Capabilities
    salt_digest: str


@dataclass(frozen=True, slots=True)
class Task:
    """The whole state of one task. Changed only by `apply_move`, which returns a new copy."""

    task_id: TaskId
    submitter: AccountId
    flops: int
    max_price: Amount
    requirements: Requirements
    phase: str = POSTED
    outcome: str = ""
    last_tick: Tick = 0
    bid_deadline: Tick = 0
    bids: tuple[TaskBid, ...] = ()
    solver: AccountId = ""
    price: Amount = 0
    salt_digest: str = ""
    forced_beacon: str = ""
    commit_deadline: Tick = 0
    commitment: str = ""
    round: int = 0
    forced: bool = False
    segment_beacon: str = ""
    verify_deadline: Tick = 0
    whistle_deadline: Tick = 0
    reveal_deadline: Tick = 0
    joined: tuple[AccountId, ...] = ()
    verdicts: tuple[tuple[AccountId, Weight], ...] = ()
    whistleblowers: tuple[AccountId, ...] = ()
    params: GameParams = GameParams()
    job_id: str = ""  # the posted job (blake3 of its canonical spec); "" in simulations that train nothing
    condition: tuple[str, str, float] | tuple[()] = ()  # (metric, comparison, threshold): pay only if met; () none
    metrics: tuple[tuple[AccountId, float], ...] = ()  # the certified final metric each approving verifier reported
    detection: tuple[float, float] | tuple[()] = ()  # (confidence, cheat fraction) the sample must reach; () none
    replacements: tuple[tuple[AccountId, AccountId], ...] = ()  # (fresh verifier, the silent one it replaces)


# ---------------------------------------------------------------------------------------------------- moves


@dataclass(frozen=True, slots=True)
class Move:
    kind: ClassVar[str] = ""
    task_id: TaskId
    now: Tick


@dataclass(frozen=True, slots=True)
class Post(Move):
    kind: ClassVar[str] = "post"
    submitter: AccountId
    flops: int
    requirements: Requirements = dataclasses.field(default_factory=Requirements)
    job_id: str = ""  # the job id of the spec posted (pol job): verifiers reject a bundle of any other job
    condition: tuple[str, str, float] | tuple[()] = ()  # outcome condition (metric, ">=" / ">" / "<=" / "<", threshold)
    detection: tuple[float, float] | tuple[()] = ()  # required detection: (confidence, cheat fraction), e.g. (0.999, 0.1)


@dataclass(frozen=True, slots=True)
class Bid(Move):
    kind: ClassVar[str] = "bid"
    bidder: AccountId
    price: Amount
    capabilities: Capabilities
    salt_digest: str


@dataclass(frozen=True, slots=True)
class CloseAuction(Move):
    kind: ClassVar[str] = "close_auction"


@dataclass(frozen=True, slots=True)
class Commit(Move):
    kind: ClassVar[str] = "commit"
    solver: AccountId
    commitment: str


@dataclass(frozen=True, slots=True)
class Join(Move):
    kind: ClassVar[str] = "join"
    verifier: AccountId
    replaces: AccountId = ""  # a silent verifier whose sample this fresh verifier takes over (after the verify deadline)


@dataclass(frozen=True, slots=True)
class Verdict(Move):
    kind: ClassVar[str] = "verdict"
    verifier: AccountId
    weight: Weight
    metric: float | None = None  # an approver's certified final value of the task's condition metric (pol verify)


@dataclass(frozen=True, slots=True)
class Whistle(Move):
    kind: ClassVar[str] = "whistle"
    whistleblower: AccountId


@dataclass(frozen=True, slots=True)
class Reveal(Move):
    kind: ClassVar[str] = "reveal"
    solver: AccountId
    salt: str
    true_commitment: str = ""


@dataclass(frozen=True, slots=True)
class Rule(Move):
    """The dispute's outcome. For 'solver_wrong', `wrong_segments` lists the segments shown wrong (the referee
    re-checks the segments the challengers point at and those the approvers attested to)."""

    kind: ClassVar[str] = "rule"
    ruling: str
    wrong_segments: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Timeout(Move):
    kind: ClassVar[str] = "timeout"


MOVE_TYPES: dict[str, type[Move]] = {
    m.kind: m for m in (Post, Bid, CloseAuction, Commit, Join, Verdict, Whistle, Reveal, Rule, Timeout)
}


# ---------------------------------------------------------------------------------------------------- pure maths


def compute_fee_estimate(flops: int, params: GameParams) -> Amount:
    """The maximum price: gas price x ceil(FLOPs / FLOPs per gas unit)."""
    return params.gas_price * -(-flops // params.flops_per_gas)


def compute_salt_digest(salt: str) -> str:
    """The digest a bidder posts for its secret salt (hex)."""
    return blake3(SALT_DOMAIN + salt.encode()).hexdigest()


def compute_is_forced(forced_beacon: bytes, salt: str, forced_error_bps: int) -> bool:
    """Whether this (beacon, salt) makes a forced error: a uniform 64-bit draw below the rate."""
    draw = int.from_bytes(blake3(FORCED_DOMAIN + forced_beacon + salt.encode()).digest()[:8], "big")
    return draw * BPS < forced_error_bps * 2**64


def compute_segments(beacon: bytes, verifier: AccountId, n_segments: int, count: int) -> tuple[int, ...]:
    """`count` distinct segment indices in [0, n_segments) for `verifier`, from the post-commitment beacon."""
    stream = blake3(SEGMENT_DOMAIN + beacon + verifier.encode()).digest(length=8 * 4 * count + 64)
    chosen: list[int] = []
    for i in range(0, len(stream) - 7, 8):
        idx = int.from_bytes(stream[i:i + 8], "big") % n_segments
        if idx not in chosen:
            chosen.append(idx)
        if len(chosen) == count:
            return tuple(chosen)
    rest = [i for i in range(n_segments) if i not in chosen]  # astronomically rare: fill in order
    return tuple(chosen + rest[: count - len(chosen)])


def compute_shared_sample(beacon: bytes, n_segments: int, count: int) -> tuple[int, ...]:
    """The committee's one sample: `count` distinct segments in [0, n_segments), in draw order, from the beacon."""
    stream = blake3(SHARE_DOMAIN + b"sample\x00" + beacon).digest(length=8 * 4 * count + 64)
    chosen: list[int] = []
    seen: set[int] = set()
    for i in range(0, len(stream) - 7, 8):
        idx = int.from_bytes(stream[i:i + 8], "big") % n_segments
        if idx not in seen:
            chosen.append(idx)
            seen.add(idx)
        if len(chosen) == count:
            return tuple(chosen)
    return tuple(chosen + [i for i in range(n_segments) if i not in seen][: count - len(chosen)])


def compute_share_order(beacon: bytes, committee: tuple[AccountId, ...]) -> tuple[AccountId, ...]:
    """The committee in the order the shares are dealt: a permutation keyed by the beacon and the whole committee
    (sorted, so the order of joining does not matter), which no member controls."""
    key = blake3(SHARE_DOMAIN + b"order\x00" + beacon + "\x00".join(sorted(committee)).encode()).digest()
    return tuple(sorted(set(committee), key=lambda v: blake3(key + v.encode()).digest()))


def compute_shares(beacon: bytes, committee: tuple[AccountId, ...], sample: tuple[int, ...]) -> dict[AccountId, tuple[int, ...]]:
    """Split `sample` into disjoint shares: its j-th segment goes to the (j mod m)-th member of the keyed order, so
    shares differ in size by at most one and together are the whole sample."""
    order = compute_share_order(beacon, committee)
    shares: dict[AccountId, list[int]] = {v: [] for v in order}
    for j, segment in enumerate(sample):
        shares[order[j % len(order)]].append(segment)
    return {v: tuple(s) for v, s in shares.items()}


def get_sample_size(task: Task, params: GameParams) -> int:
    """Segments a sample holds: the posted detection's hypergeometric bound, else `params.sample_count`."""
    if task.detection:
        from games.cost import compute_required_samples

        confidence, fraction = task.detection
        return compute_required_samples(params.n_segments, confidence, fraction)
    return params.sample_count


def get_committee(task: Task) -> tuple[AccountId, ...]:
    """The verifiers who joined the round in their own right (not as replacements of a silent one)."""
    fresh = {r for r, _ in task.replacements}
    return tuple(v for v in task.joined if v not in fresh)


def get_verifier_segments(task: Task, verifier: AccountId, params: GameParams) -> tuple[int, ...]:
    """The segments `verifier` must replay in the task's current round: its own sample (independent sampling) or
    its share of the committee's sample (shared; a verifier outside the committee has none); a replacement replays
    the segments of the silent verifier it replaces. Raises WrongPhase before the commit."""
    if not task.segment_beacon:
        raise WrongPhase("segments.phase", "no segment beacon before the commitment")
    verifier = dict(task.replacements).get(verifier, verifier)
    beacon, count = bytes.fromhex(task.segment_beacon), get_sample_size(task, params)
    if params.sampling == "independent":
        return compute_segments(beacon, verifier, params.n_segments, count)
    committee = get_committee(task)
    if verifier not in committee:
        return ()
    return compute_shares(beacon, committee, compute_shared_sample(beacon, params.n_segments, count))[verifier]


def is_approval(weight: Weight) -> bool:
    """A verdict at or above half approves the commitment; below half challenges it."""
    return 2 * weight >= WEIGHT_ONE


def get_task_escrows(task_id: TaskId) -> str:
    """The prefix shared by every escrow of a task (all are zero once it is final)."""
    return f"task/{task_id}/"


def verify_params(params: GameParams) -> None:
    """Raises BadMove (rule 'params.<field>') for a parameter out of range."""
    ints = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if f.name not in ("jackpot_account", "sampling")}
    if params.sampling not in SAMPLINGS:
        raise BadMove("params.sampling", f"{params.sampling!r} is not one of {SAMPLINGS}")
    for name, value in ints.items():
        if type(value) is not int or value < 0:
            raise BadMove(f"params.{name}", f"{value!r} is not a non-negative int")
    if params.flops_per_gas <= 0 or params.gas_price <= 0:
        raise BadMove("params.gas_price", "gas price and FLOPs per gas must be positive")
    if params.verifier_share_bps + params.jackpot_tax_bps > BPS or params.forced_error_bps > BPS:
        raise BadMove("params.bps", "shares and rates are basis points summing to at most 10000")
    if not 0 < params.sample_count <= params.n_segments:
        raise BadMove("params.sample_count", "need 0 < sample_count <= n_segments")
    for name in ("bid_deposit", "solver_bond", "verifier_stake", "whistle_deposit"):
        if ints[name] <= 0:
            raise BadMove(f"params.{name}", "deposits and stakes must be positive")


# ---------------------------------------------------------------------------------------------------- helpers


def _escrow(task: Task, *parts: object) -> str:
    return get_task_escrows(task.task_id) + "/".join(str(p) for p in parts)


def _op(task: Task, *parts: object) -> str:
    return f"task/{task.task_id}/r{task.round}/" + "/".join(str(p) for p in parts)


def _pay(ledger: Ledger, op_id: str, escrow: str, dst: AccountId, amount: Amount, penalty: str = "") -> None:
    if amount > 0:
        if penalty:
            slash(ledger, op_id, escrow, dst, amount, reason=penalty)
        else:
            release(ledger, op_id, escrow, dst, amount)


def _split_equally(ledger: Ledger, task: Task, what: str, escrow: str, amount: Amount,
                   recipients: tuple[AccountId, ...], penalty: str) -> None:
    for dst, part in sorted(compute_split(amount, {r: 1 for r in recipients}).items()):
        _pay(ledger, _op(task, what, dst), escrow, dst, part, penalty)


def _verify_phase(task: Task, move: Move, *phases: str) -> None:
    if task.phase not in phases:
        raise WrongPhase(f"{move.kind}.phase", f"task is {task.phase}, needs {' or '.join(phases)}")


def _verify_before(move: Move, deadline: Tick, rule: str) -> None:
    if move.now >= deadline:
        raise DeadlineMissed(rule, f"tick {move.now} is at or past the deadline {deadline}")


def _verify_not_before(move: Move, opens: Tick, rule: str) -> None:
    if move.now < opens:
        raise DeadlineMissed(rule, f"tick {move.now} is before {opens}")


def _verify_hex(value: object, rule: str) -> None:
    if not is_digest(value):
        raise BadMove(rule, f"{value!r} is not 64 lowercase hex digits")


def _challengers(task: Task) -> tuple[AccountId, ...]:
    rejecters = tuple(v for v, w in task.verdicts if not is_approval(w))
    return rejecters + task.whistleblowers


def _approvers(task: Task) -> tuple[AccountId, ...]:
    return tuple(v for v, w in task.verdicts if is_approval(w))


def _next_round(task: Task, now: Tick, params: GameParams, ledger: Ledger, commitment: str) -> Task:
    """Open a verification window for `commitment`, drawing the segment beacon after it."""
    task = dataclasses.replace(task, commitment=commitment, joined=(), verdicts=(), metrics=(), whistleblowers=(),
                               replacements=())
    beacon = ledger.beacon(f"task/{task.task_id}/r{task.round}/segments")
    verify = now + params.verify_window
    whistle = verify + params.whistle_window
    return dataclasses.replace(task, phase=COMMITTED, segment_beacon=beacon.hex(), verify_deadline=verify,
                               whistle_deadline=whistle, reveal_deadline=whistle + params.reveal_window)


def _stake_escrow(task: Task, kind: str, party: AccountId) -> str:
    return _escrow(task, f"r{task.round}", kind, party)


def _return(ledger: Ledger, task: Task, kind: str, parties: tuple[AccountId, ...]) -> None:
    """Give back the round's stakes ('stake') or whistle deposits ('whistle') of `parties`."""
    amount = task.params.verifier_stake if kind == "stake" else task.params.whistle_deposit
    for p in parties:
        _pay(ledger, _op(task, "return", kind, p), _stake_escrow(task, kind, p), p, amount)


def _forfeit(ledger: Ledger, task: Task, kind: str, parties: tuple[AccountId, ...],
             recipients: tuple[AccountId, ...], why: str) -> None:
    """Slash the round's stakes or deposits of `parties`, split equally among `recipients`."""
    amount = task.params.verifier_stake if kind == "stake" else task.params.whistle_deposit
    for p in parties:
        for dst, part in sorted(compute_split(amount, {r: 1 for r in recipients}).items()):
            _pay(ledger, _op(task, "forfeit", kind, p, dst), _stake_escrow(task, kind, p), dst, part, why)


_PARTY_FIELDS = ("submitter", "bidder", "solver", "verifier", "whistleblower")


def _verify_parties(move: Move) -> None:
    """Party ids become parts of op ids and escrow names, so they must be plain: non-empty, no '/'."""
    for name in _PARTY_FIELDS:
        party = getattr(move, name, None)
        if party is not None and (not isinstance(party, str) or not party or "/" in party):
            raise BadMove("move.party", f"{name} {party!r} must be a non-empty id without '/'")


def _finish(task: Task, move: Move, outcome: str) -> Task:
    return dataclasses.replace(task, phase=FINAL, outcome=outcome, last_tick=move.now)


def compute_condition_met(condition: tuple[str, str, float] | tuple[()], metrics: tuple[float, ...]) -> bool:
    """True if there is no condition, or the median of the certified `metrics` (the lower middle one of an even
    count: no averaging, so the value is one a verifier certified) meets it. No metric: not met."""
    if not condition:
        return True
    if not metrics:
        return False
    _, op, threshold = condition
    value = sorted(metrics)[(len(metrics) - 1) // 2]
    return {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold, "<": value < threshold}[op]


def _settle_for_solver(ledger: Ledger, task: Task, move: Move, outcome: str) -> Task:
    """The solver was right: pay it, reward the approving verifiers by Yuma consensus, tax the jackpot, refund the
    excess fee, return the bond and the approvers' stakes. If the task's outcome condition is not met by the
    approvers' certified metrics, the solver is paid nothing (its bond returns) and the fee beyond the verifiers'
    rewards goes back to the submitter: 'target_missed'."""
    p, fee = task.params, _escrow(task, "fee")
    tax = task.price * p.jackpot_tax_bps // BPS
    pool = task.price * p.verifier_share_bps // BPS
    approvers = _approvers(task)
    verdicts = {v: w for v, w in task.verdicts if v in approvers}
    scores = compute_verdict_consensus(verdicts, {v: p.verifier_stake for v in verdicts}).scores
    rewards = compute_split(pool, scores)
    if not compute_condition_met(task.condition, tuple(m for v, m in task.metrics if v in approvers)):
        for v, amount in sorted(rewards.items()):
            _pay(ledger, _op(task, "settle", "reward", v), fee, v, amount)
        _pay(ledger, _op(task, "settle", "refund", task.submitter), fee, task.submitter,
             task.max_price - (pool if rewards else 0))
        _pay(ledger, _op(task, "settle", "bond", task.solver), _escrow(task, "bond"), task.solver, p.solver_bond)
        _return(ledger, task, "stake", approvers)
        return _finish(task, move, "target_missed")
    _pay(ledger, _op(task, "settle", "solver", task.solver), fee, task.solver, task.price - tax - pool)
    for v, amount in sorted(rewards.items()):
        _pay(ledger, _op(task, "settle", "reward", v), fee, v, amount)
    _pay(ledger, _op(task, "settle", "tax"), fee, p.jackpot_account, tax + (0 if rewards else pool))
    _pay(ledger, _op(task, "settle", "refund", task.submitter), fee, task.submitter, task.max_price - task.price)
    _pay(ledger, _op(task, "settle", "bond", task.solver), _escrow(task, "bond"), task.solver, p.solver_bond)
    _return(ledger, task, "stake", approvers)
    return _finish(task, move, outcome)


def _settle_against_solver(ledger: Ledger, task: Task, move: Rule) -> Task:
    """The solver was proven wrong: its bond to the challengers; the stakes of approvers whose own sample holds a
    wrong segment (they attested to it) to the whistleblowers, else the rejecting verifiers; the whole fee back to
    the submitter; every other stake and deposit returned."""
    challengers, rejecters = _challengers(task), tuple(v for v, w in task.verdicts if not is_approval(w))
    wrong = set(move.wrong_segments)
    caught = tuple(v for v in _approvers(task) if wrong & set(get_verifier_segments(task, v, task.params)))
    unlucky = tuple(v for v in _approvers(task) if v not in caught)
    _split_equally(ledger, task, "bond", _escrow(task, "bond"), task.params.solver_bond, challengers,
                   "solver proven wrong")
    _forfeit(ledger, task, "stake", caught, task.whistleblowers or rejecters, "attested to a wrong segment")
    _return(ledger, task, "stake", rejecters + unlucky)
    _return(ledger, task, "whistle", task.whistleblowers)
    _pay(ledger, _op(task, "refund", task.submitter), _escrow(task, "fee"), task.submitter, task.max_price)
    return _finish(task, move, "solver_wrong")


def _slash_silent(ledger: Ledger, task: Task) -> None:
    """Verifiers who joined but gave no verdict before the deadline lose their stake to the jackpot."""
    voted = {v for v, _ in task.verdicts}
    silent = tuple(v for v in task.joined if v not in voted)
    _forfeit(ledger, task, "stake", silent, (task.params.jackpot_account,), "missed the verdict deadline")


# ---------------------------------------------------------------------------------------------------- transitions


def apply_post(ledger: Ledger, params: GameParams, move: Post) -> Task:
    """A submitter posts a task: the fee estimate is escrowed as the maximum price.
    Raises BadMove ('post.flops', 'params.*'), and the ledger's errors if the submitter cannot pay."""
    verify_params(params)
    _verify_parties(move)
    if type(move.flops) is not int or move.flops <= 0:
        raise BadMove("post.flops", f"{move.flops!r} is not a positive int")
    if not isinstance(move.task_id, str) or not move.task_id or "/" in move.task_id:
        raise BadMove("post.task_id", f"{move.task_id!r} must be a non-empty id without '/'")
    if move.job_id != "":
        _verify_hex(move.job_id, "post.job_id")
    _verify_condition(move.condition)
    verify_detection(move.detection)
    task = Task(move.task_id, move.submitter, move.flops, compute_fee_estimate(move.flops, params),
                move.requirements, last_tick=move.now, bid_deadline=move.now + params.bid_window, params=params,
                job_id=move.job_id, condition=tuple(move.condition),  # type: ignore[arg-type]
                detection=tuple(move.detection))  # type: ignore[arg-type]
    lock(ledger, _op(task, "post", move.submitter), move.submitter, _escrow(task, "fee"), task.max_price)
    return task


def _verify_condition(condition: object) -> None:
    if condition == ():
        return
    ok = isinstance(condition, tuple) and len(condition) == 3
    if ok:
        metric, op, threshold = condition  # type: ignore[misc]
        ok = (isinstance(metric, str) and 0 < len(metric) <= 300 and op in CONDITION_OPS and not isinstance(threshold, bool)
              and isinstance(threshold, (int, float)) and math.isfinite(threshold))
    if not ok:
        raise BadMove("post.condition", f"{condition!r} is not (metric, one of {CONDITION_OPS}, a finite threshold)")


def verify_detection(detection: object) -> None:
    """Raises BadMove ('post.detection') unless `detection` is () or (confidence in (0, 1), fraction in (0, 1])."""
    if detection == ():
        return
    ok = isinstance(detection, tuple) and len(detection) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in detection)
    if ok:
        confidence, fraction = detection  # type: ignore[misc]
        ok = 0 < confidence < 1 and 0 < fraction <= 1
    if not ok:
        raise BadMove("post.detection", f"{detection!r} is not (confidence in (0, 1), cheat fraction in (0, 1])")


def _apply_bid(ledger: Ledger, task: Task, move: Bid) -> Task:
    _verify_phase(task, move, POSTED)
    _verify_before(move, task.bid_deadline, "bid.deadline")
    if move.bidder == task.submitter:
        raise NotAuthorized("bid.party", "the submitter cannot bid on its own task")
    if any(b.bidder == move.bidder for b in task.bids):
        raise DuplicateMove("bid.duplicate", f"{move.bidder} already bid")
    verify_bid(Order(task.task_id, task.max_price, task.requirements),
               AuctionBid(move.bidder, move.price, move.capabilities))
    _verify_hex(move.salt_digest, "bid.salt_digest")
    lock(ledger, _op(task, "bid", move.bidder), move.bidder, _escrow(task, "deposit", move.bidder),
         task.params.bid_deposit)
    bid = TaskBid(move.bidder, move.price, move.capabilities, move.salt_digest)
    return dataclasses.replace(task, bids=(*task.bids, bid), last_tick=move.now)


def _apply_close_auction(ledger: Ledger, task: Task, move: CloseAuction) -> Task:
    _verify_phase(task, move, POSTED)
    _verify_not_before(move, task.bid_deadline, "auction.close")
    order = Order(task.task_id, task.max_price, task.requirements)
    won = compute_winner(order, [AuctionBid(b.bidder, b.price, b.capabilities) for b in task.bids])
    for b in task.bids:
        if won is None or b.bidder != won.bidder:
            _pay(ledger, _op(task, "auction", "return", b.bidder), _escrow(task, "deposit", b.bidder), b.bidder,
                 task.params.bid_deposit)
    if won is None:
        _pay(ledger, _op(task, "auction", "refund"), _escrow(task, "fee"), task.submitter, task.max_price)
        return _finish(task, move, "no_bids")
    winner = next(b for b in task.bids if b.bidder == won.bidder)
    beacon = ledger.beacon(f"task/{task.task_id}/forced")
    return dataclasses.replace(task, phase=ASSIGNED, solver=winner.bidder, price=winner.price,
                               salt_digest=winner.salt_digest, forced_beacon=beacon.hex(),
                               commit_deadline=move.now + task.params.commit_window, last_tick=move.now)


def _apply_commit(ledger: Ledger, task: Task, move: Commit) -> Task:
    _verify_phase(task, move, ASSIGNED)
    if move.solver != task.solver:
        raise NotAuthorized("commit.party", f"{move.solver} did not win the auction")
    _verify_before(move, task.commit_deadline, "commit.deadline")
    _verify_hex(move.commitment, "commit.commitment")
    lock(ledger, _op(task, "commit", "bond"), task.solver, _escrow(task, "bond"), task.params.solver_bond)
    _pay(ledger, _op(task, "commit", "deposit"), _escrow(task, "deposit", task.solver), task.solver,
         task.params.bid_deposit)
    return dataclasses.replace(_next_round(task, move.now, task.params, ledger, move.commitment),
                               last_tick=move.now)


def _apply_join(ledger: Ledger, task: Task, move: Join) -> Task:
    _verify_phase(task, move, COMMITTED)
    if move.replaces:
        _verify_replacement(task, move)
    else:
        _verify_before(move, task.verify_deadline, "join.deadline")
    if move.verifier in (task.solver, task.submitter):
        raise NotAuthorized("join.party", "the solver and the submitter cannot verify their own task")
    if move.verifier in task.joined:
        raise DuplicateMove("join.duplicate", f"{move.verifier} already joined round {task.round}")
    if not move.replaces and task.params.sampling == "shared" and task.verdicts:
        raise WrongPhase("join.committee", "the committee closed with its first verdict: its shares are dealt")
    lock(ledger, _op(task, "join", move.verifier), move.verifier, _stake_escrow(task, "stake", move.verifier),
         task.params.verifier_stake)
    replacements = (*task.replacements, (move.verifier, move.replaces)) if move.replaces else task.replacements
    return dataclasses.replace(task, joined=(*task.joined, move.verifier), replacements=replacements,
                               last_tick=move.now)


def _verify_replacement(task: Task, move: Join) -> None:
    """A fresh verifier may take over a silent one's sample between the verify and the whistle deadline."""
    _verify_not_before(move, task.verify_deadline, "join.replace_window")
    _verify_before(move, task.whistle_deadline, "join.replace_deadline")
    voted = {v for v, _ in task.verdicts}
    if not isinstance(move.replaces, str) or move.replaces not in get_committee(task) or move.replaces in voted:
        raise BadMove("join.replaces", f"{move.replaces!r} is not a silent member of the round's committee")
    if any(s == move.replaces for _, s in task.replacements):
        raise DuplicateMove("join.replaces", f"{move.replaces} was already replaced")


def _apply_verdict(ledger: Ledger, task: Task, move: Verdict) -> Task:
    _verify_phase(task, move, COMMITTED)
    replacing = any(r == move.verifier for r, _ in task.replacements)
    _verify_before(move, task.whistle_deadline if replacing else task.verify_deadline, "verdict.deadline")
    if move.verifier not in task.joined:
        raise NotAuthorized("verdict.party", f"{move.verifier} has no stake in round {task.round}")
    if any(v == move.verifier for v, _ in task.verdicts):
        raise DuplicateMove("verdict.duplicate", f"{move.verifier} already gave a verdict")
    verify_weight(move.weight)
    metric = move.metric
    if metric is not None and (isinstance(metric, bool) or not isinstance(metric, (int, float)) or not math.isfinite(metric)):
        raise BadMove("verdict.metric", f"{metric!r} is not a finite number")
    metrics = task.metrics if metric is None else (*task.metrics, (move.verifier, float(metric)))
    return dataclasses.replace(task, verdicts=(*task.verdicts, (move.verifier, move.weight)), metrics=metrics,
                               last_tick=move.now)


def _apply_whistle(ledger: Ledger, task: Task, move: Whistle) -> Task:
    _verify_phase(task, move, COMMITTED)
    _verify_not_before(move, task.verify_deadline, "whistle.window")
    _verify_before(move, task.whistle_deadline, "whistle.deadline")
    if move.whistleblower in (task.solver, task.submitter, *task.joined):
        raise NotAuthorized("whistle.party", "parties to the task cannot blow the whistle on it")
    if move.whistleblower in task.whistleblowers:
        raise DuplicateMove("whistle.duplicate", f"{move.whistleblower} already blew the whistle")
    lock(ledger, _op(task, "whistle", move.whistleblower), move.whistleblower,
         _stake_escrow(task, "whistle", move.whistleblower), task.params.whistle_deposit)
    return dataclasses.replace(task, whistleblowers=(*task.whistleblowers, move.whistleblower), last_tick=move.now)


def _apply_reveal(ledger: Ledger, task: Task, move: Reveal) -> Task:
    _verify_phase(task, move, COMMITTED)
    if move.solver != task.solver:
        raise NotAuthorized("reveal.party", f"{move.solver} is not the solver")
    _verify_not_before(move, task.whistle_deadline, "reveal.window")
    _verify_before(move, task.reveal_deadline, "reveal.deadline")
    if not isinstance(move.salt, str) or compute_salt_digest(move.salt) != task.salt_digest:
        raise SaltMismatch("reveal.salt", "the salt does not match the digest given with the bid")
    forced = task.round == 0 and compute_is_forced(bytes.fromhex(task.forced_beacon), move.salt,
                                                   task.params.forced_error_bps)
    if forced:
        _verify_hex(move.true_commitment, "reveal.true_commitment")
        if move.true_commitment == task.commitment:
            raise BadMove("reveal.true_commitment", "a forced error's true commitment must differ")
    elif move.true_commitment:
        raise BadMove("reveal.true_commitment", "not a forced error: nothing to replace")
    challengers = _challengers(task)
    if forced and challengers:  # the jackpot payout, locked first in one operation: the only one that can fail
        pot = _escrow(task, f"r{task.round}", "jackpot")
        lock(ledger, _op(task, "jackpot-lock"), task.params.jackpot_account, pot, task.params.jackpot_payout)
        _split_equally(ledger, task, "jackpot", pot, task.params.jackpot_payout, challengers, "")
    _slash_silent(ledger, task)
    task = dataclasses.replace(task, last_tick=move.now, forced=task.forced or forced)
    if forced:
        _forfeit(ledger, task, "stake", _approvers(task), task.whistleblowers or (task.params.jackpot_account,),
                 "approved a forced error")
        _return(ledger, task, "stake", tuple(v for v in challengers if v in task.joined))
        _return(ledger, task, "whistle", task.whistleblowers)
        return _next_round(dataclasses.replace(task, round=task.round + 1), move.now, task.params, ledger,
                           move.true_commitment)
    if challengers:
        return dataclasses.replace(task, phase=CHALLENGED)
    return _settle_for_solver(ledger, task, move, "accepted")


def _apply_rule(ledger: Ledger, task: Task, move: Rule) -> Task:
    _verify_phase(task, move, CHALLENGED)
    if move.ruling not in RULINGS:
        raise BadMove("rule.ruling", f"{move.ruling!r} is not one of {RULINGS}")
    segments = move.wrong_segments
    if not isinstance(segments, tuple) or any(type(i) is not int or not 0 <= i < task.params.n_segments
                                              for i in segments):
        raise BadMove("rule.wrong_segments", f"segment indices must be ints in 0..{task.params.n_segments - 1}")
    if (move.ruling == "solver_wrong") != bool(segments):
        raise BadMove("rule.wrong_segments", "a 'solver_wrong' ruling names the wrong segments; no other does")
    if move.ruling == "solver_wrong":
        return _settle_against_solver(ledger, task, move)
    rejecters = tuple(v for v, w in task.verdicts if not is_approval(w))
    _forfeit(ledger, task, "stake", rejecters, (task.solver,), "challenged a correct result")
    _forfeit(ledger, task, "whistle", task.whistleblowers, (task.solver,), "challenged a correct result")
    return _settle_for_solver(ledger, task, move, "challenger_wrong")


def _apply_timeout(ledger: Ledger, task: Task, move: Timeout) -> Task:
    _verify_phase(task, move, ASSIGNED, COMMITTED)
    fee = _escrow(task, "fee")
    if task.phase == ASSIGNED:
        _verify_not_before(move, task.commit_deadline, "timeout.commit")
        _pay(ledger, _op(task, "timeout", "deposit"), _escrow(task, "deposit", task.solver), task.submitter,
             task.params.bid_deposit, "missed the commit deadline")
        _pay(ledger, _op(task, "timeout", "refund"), fee, task.submitter, task.max_price)
        return _finish(task, move, "solver_missed_commit")
    _verify_not_before(move, task.reveal_deadline, "timeout.reveal")
    challengers = _challengers(task)
    _slash_silent(ledger, task)
    _split_equally(ledger, task, "timeout/bond", _escrow(task, "bond"), task.params.solver_bond,
                   challengers or (task.submitter,), "missed the reveal deadline")
    _return(ledger, task, "stake", tuple(v for v, _ in task.verdicts))
    _return(ledger, task, "whistle", task.whistleblowers)
    _pay(ledger, _op(task, "timeout", "refund"), fee, task.submitter, task.max_price)
    return _finish(task, move, "solver_missed_reveal")


_TRANSITIONS = {
    "bid": _apply_bid,
    "close_auction": _apply_close_auction,
    "commit": _apply_commit,
    "join": _apply_join,
    "verdict": _apply_verdict,
    "whistle": _apply_whistle,
    "reveal": _apply_reveal,
    "rule": _apply_rule,
    "timeout": _apply_timeout,
}


def apply_move(ledger: Ledger, task: Task, move: Move) -> Task:
    """Apply one move to `task` and return the new task; `task` itself is never changed. Raises the
    RuleViolation naming the broken rule (see the module docstring), or a LedgerError when a party cannot pay;
    either way nothing has changed."""
    if move.task_id != task.task_id:
        raise BadMove("move.task_id", f"move for {move.task_id!r} applied to {task.task_id!r}")
    if type(move.now) is not int or move.now < task.last_tick:
        raise BadMove("move.clock", f"tick {move.now!r} is before the task's last tick {task.last_tick}")
    if task.phase == FINAL:
        raise WrongPhase(f"{move.kind}.phase", "the task is final")
    if isinstance(move, Post):
        raise DuplicateMove("post.duplicate", f"task {task.task_id} is already posted")
    _verify_parties(move)
    return _TRANSITIONS[move.kind](ledger, task, move)  # type: ignore[operator]
