"""Game scenarios as data: a list of typed moves, each marked valid or invalid, with the balances expected after.

The same runner executes a scenario under pytest and `scenario_to_dict` writes it out (JSON-ready) for another
implementation to replay, as consensus-specs do with `steps.yaml`. After every step the runner checks:
- a valid move succeeded and the listed balances match; an invalid one raised the named error (and rule) and left
  the ledger and the task exactly as they were;
- supply is conserved (no mint after funding) and the ledger verifies (signs, supply, event chain);
and at the end: every escrow of a final task is zero and no party listed as honest ends below its funding (a
submitter whose task was delivered may have paid exactly the winning price, and nothing more).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from games.auction import Capabilities, Requirements, compute_tiebreak, make_capabilities, make_requirements
from games.consensus import WEIGHT_ONE
from games.errors import BadMove, GameError
from games.ledger import Ledger, mint, open_account, verify_ledger
from games.task import (
    FINAL,
    MOVE_TYPES,
    Bid,
    CloseAuction,
    Commit,
    GameParams,
    Join,
    Move,
    Post,
    Reveal,
    Rule,
    Task,
    Timeout,
    Verdict,
    Whistle,
    apply_move,
    apply_post,
    compute_salt_digest,
    get_task_escrows,
)

__all__ = [
    "Scenario",
    "ScenarioFailure",
    "ScenarioResult",
    "Step",
    "get_standard_scenarios",
    "move_from_dict",
    "move_to_dict",
    "run_scenario",
    "scenario_from_dict",
    "scenario_to_dict",
]


_DELIVERED = ("accepted", "challenger_wrong")  # outcomes where the submitter rightly paid the price


@dataclass(frozen=True, slots=True)
class Step:
    """One move; `error`/`rule` name what an invalid move must raise; `balances` are checked after the move."""

    move: Move
    valid: bool = True
    error: str = ""
    rule: str = ""
    balances: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    params: GameParams
    funding: tuple[tuple[str, int], ...]
    steps: tuple[Step, ...]
    honest: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    tasks: Mapping[str, Task]
    balances: Mapping[str, int]


class ScenarioFailure(AssertionError):
    """A scenario did not play out as written (a bug in the game, or in the scenario)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailure(message)


def _snapshot(ledger: Ledger) -> tuple:
    return ledger.get_accounts(), ledger.get_escrows(), len(ledger.events()), ledger.head()


def _apply(ledger: Ledger, params: GameParams, tasks: Mapping[str, Task], move: Move) -> Task:
    task = tasks.get(move.task_id)
    if task is None:
        if not isinstance(move, Post):
            raise BadMove("move.task_id", f"no task {move.task_id!r}")
        return apply_post(ledger, params, move)
    return apply_move(ledger, task, move)


def run_scenario(scenario: Scenario, ledger: Ledger) -> ScenarioResult:
    """Fund the accounts, play every step and check the invariants. Raises ScenarioFailure naming the step."""
    for account, amount in scenario.funding:
        open_account(ledger, f"fund/open/{account}", account)
        if amount:
            mint(ledger, f"fund/mint/{account}", account, amount)
    supply = sum(a for _, a in scenario.funding)
    tasks: dict[str, Task] = {}
    for i, step in enumerate(scenario.steps):
        where = f"{scenario.name} step {i} ({step.move.kind})"
        before, task_before = _snapshot(ledger), tasks.get(step.move.task_id)
        try:
            tasks[step.move.task_id] = _apply(ledger, scenario.params, tasks, step.move)
        except GameError as exc:
            _check(not step.valid, f"{where}: refused a valid move: {exc!r}")
            _check(type(exc).__name__ == step.error, f"{where}: raised {type(exc).__name__}, not {step.error}")
            _check(not step.rule or getattr(exc, "rule", "") == step.rule,
                   f"{where}: broke rule {getattr(exc, 'rule', '')!r}, not {step.rule!r}")
            _check(_snapshot(ledger) == before and tasks.get(step.move.task_id) == task_before,
                   f"{where}: a refused move changed the state")
        else:
            _check(step.valid, f"{where}: accepted an invalid move (expected {step.error} {step.rule})")
        for account, amount in step.balances:
            _check(ledger.balance(account) == amount,
                   f"{where}: {account} holds {ledger.balance(account)}, expected {amount}")
        _check(ledger.total_supply() == supply, f"{where}: supply changed")
        verify_ledger(ledger)
    escrows = ledger.get_escrows()
    for task in tasks.values():
        if task.phase == FINAL:
            prefix = get_task_escrows(task.task_id)
            left = {k: v for k, v in escrows.items() if k.startswith(prefix) and v}
            _check(not left, f"{scenario.name}: task {task.task_id} is final but escrows hold {left}")
    funding = dict(scenario.funding)
    for party in scenario.honest:
        paid = sum(t.price for t in tasks.values() if t.submitter == party and t.outcome in _DELIVERED)
        _check(ledger.balance(party) >= funding[party] - paid, f"{scenario.name}: honest {party} lost money")
    return ScenarioResult(tasks, ledger.get_accounts())


# ---------------------------------------------------------------------------------------------------- JSON


def _encode(value: Any) -> Any:
    if isinstance(value, (Requirements, Capabilities)):
        return {"resources": [list(p) for p in value.resources], "attributes": list(value.attributes)}
    return value


def move_to_dict(move: Move) -> dict[str, Any]:
    """A JSON-ready dict with the move's `kind` and fields."""
    return {"kind": move.kind, **{f.name: _encode(getattr(move, f.name)) for f in dataclasses.fields(move)}}


def move_from_dict(data: Mapping[str, Any]) -> Move:
    """The move written by `move_to_dict`. Raises BadMove ('scenario.move') for an unknown kind or fields."""
    cls = MOVE_TYPES.get(str(data.get("kind")))
    names = {f.name for f in dataclasses.fields(cls)} if cls else set()
    optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING} if cls else set()
    if cls is None or not names - optional <= set(data) - {"kind"} <= names:  # fields with a default may be absent
        raise BadMove("scenario.move", f"cannot read move {dict(data)!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "kind"}
    for key, kind in (("requirements", Requirements), ("capabilities", Capabilities)):
        if key in kwargs:
            raw = kwargs[key]
            kwargs[key] = kind(tuple((str(n), int(a)) for n, a in raw["resources"]), tuple(raw["attributes"]))
    return cls(**kwargs)


def scenario_to_dict(scenario: Scenario) -> dict[str, Any]:
    """A JSON-ready dict of the whole scenario (params, funding, steps with expectations)."""
    return {
        "name": scenario.name,
        "description": scenario.description,
        "params": dataclasses.asdict(scenario.params),
        "funding": [list(p) for p in scenario.funding],
        "honest": list(scenario.honest),
        "steps": [{"move": move_to_dict(s.move), "valid": s.valid, "error": s.error, "rule": s.rule,
                   "balances": [list(p) for p in s.balances]} for s in scenario.steps],
    }


def scenario_from_dict(data: Mapping[str, Any]) -> Scenario:
    """The scenario written by `scenario_to_dict`. Raises BadMove for an unreadable move."""
    steps = tuple(Step(move_from_dict(s["move"]), bool(s["valid"]), str(s["error"]), str(s["rule"]),
                       tuple((str(a), int(b)) for a, b in s["balances"])) for s in data["steps"])
    return Scenario(str(data["name"]), str(data["description"]), GameParams(**data["params"]),
                    tuple((str(a), int(b)) for a, b in data["funding"]), steps, tuple(data["honest"]))


# ---------------------------------------------------------------------------------------------------- the standard set

_PARAMS = GameParams(bid_deposit=100, solver_bond=2_000, verifier_stake=1_000, whistle_deposit=300,
                     verifier_share_bps=1_500, jackpot_tax_bps=500, forced_error_bps=0, jackpot_payout=600,
                     n_segments=100, sample_count=4)
_FUNDING = (("submitter", 10_000), ("s1", 5_000), ("s2", 5_000), ("v1", 5_000), ("v2", 5_000), ("v3", 5_000),
            ("w", 5_000), ("jackpot", 2_000), ("poor", 10))
_FLOPS = 1_000 * 10**12  # -> maximum price 1000
_ALL = tuple(range(_PARAMS.n_segments))  # a solver that faked every segment
_GOOD = "11" * 32
_BAD = "ee" * 32
_CAPS = make_capabilities({"memory_gb": 32}, ["exact"])
APPROVE, REJECT = WEIGHT_ONE, 0


def _salt(party: str) -> str:
    return f"salt-of-{party}"


def _b(**balances: int) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(balances.items()))


def _bad(move: Move, error: str, rule: str = "") -> Step:
    return Step(move, valid=False, error=error, rule=rule)


def _open(t: str, price: int = 800, second: int | None = None) -> list[Step]:
    """Post at tick 0, s1 bids `price` (and s2 `second`), the auction closes at 10 and s1 commits at 11."""
    steps = [Step(Post(t, 0, "submitter", _FLOPS), balances=_b(submitter=9_000)),
             Step(Bid(t, 1, "s1", price, _CAPS, compute_salt_digest(_salt("s1"))), balances=_b(s1=4_900))]
    if second is not None:
        steps.append(Step(Bid(t, 2, "s2", second, _CAPS, compute_salt_digest(_salt("s2")))))
    steps.append(Step(CloseAuction(t, 10), balances=_b(s2=5_000)))
    return steps


def _honest(t: str) -> Scenario:
    steps = [*_open(t, 800, 900),
             Step(Commit(t, 11, "s1", _GOOD), balances=_b(s1=3_000)),
             Step(Join(t, 12, "v1")), Step(Join(t, 12, "v2"), balances=_b(v1=4_000, v2=4_000)),
             Step(Verdict(t, 13, "v1", APPROVE)), Step(Verdict(t, 14, "v2", APPROVE)),
             Step(Reveal(t, 41, "s1", _salt("s1")),
                  balances=_b(submitter=9_200, s1=5_640, s2=5_000, v1=5_060, v2=5_060, jackpot=2_040))]
    return Scenario("honest_task", "an honest solver wins the auction, two verifiers approve, everyone is paid",
                    _PARAMS, _FUNDING, tuple(steps), ("submitter", "s1", "s2", "v1", "v2"))


def _cheater_caught(t: str) -> Scenario:
    steps = [*_open(t), Step(Commit(t, 11, "s1", _BAD)),
             Step(Join(t, 12, "v1")), Step(Join(t, 12, "v2")),
             Step(Verdict(t, 13, "v1", REJECT)), Step(Verdict(t, 13, "v2", APPROVE)),
             Step(Reveal(t, 41, "s1", _salt("s1")), balances=_b(v1=4_000, v2=4_000, s1=3_000)),
             Step(Rule(t, 42, "solver_wrong", _ALL), balances=_b(submitter=10_000, s1=3_000, v1=8_000, v2=4_000,
                                                          jackpot=2_000))]
    return Scenario("cheating_solver_caught", "v1 replays and rejects; the dispute rules the solver wrong: its "
                    "bond and the lazy approver's stake go to v1, the fee back to the submitter",
                    _PARAMS, _FUNDING, tuple(steps), ("submitter", "v1"))


def _forced_error(t: str) -> Scenario:
    params = dataclasses.replace(_PARAMS, forced_error_bps=10_000)
    steps = [*_open(t), Step(Commit(t, 11, "s1", _BAD)),
             Step(Join(t, 12, "v1")), Step(Join(t, 12, "v2")), Step(Join(t, 12, "v3")),
             Step(Verdict(t, 13, "v1", REJECT)), Step(Verdict(t, 13, "v2", APPROVE)),
             _bad(Reveal(t, 41, "s1", _salt("s1")), "BadMove", "reveal.true_commitment"),
             _bad(Reveal(t, 41, "s1", _salt("s1"), _BAD), "BadMove", "reveal.true_commitment"),
             Step(Reveal(t, 41, "s1", _salt("s1"), _GOOD),
                  balances=_b(v1=5_600, v2=4_000, v3=4_000, jackpot=3_400)),
             Step(Join(t, 42, "v1")), Step(Join(t, 42, "v2")),
             Step(Verdict(t, 43, "v1", APPROVE)), Step(Verdict(t, 43, "v2", APPROVE)),
             _bad(Reveal(t, 71, "s1", _salt("s1"), _GOOD), "BadMove", "reveal.true_commitment"),
             Step(Reveal(t, 71, "s1", _salt("s1")),
                  balances=_b(submitter=9_200, s1=5_640, v1=5_660, v2=4_060, v3=4_000, jackpot=3_440))]
    return Scenario("lazy_verifier_caught_by_forced_error",
                    "the beacon forces an error; v1 catches it and wins the jackpot payout, lazy v2 loses its "
                    "stake, silent v3 loses its stake; round 1 verifies the true commitment and settles",
                    params, _FUNDING, tuple(steps), ("submitter", "s1", "v1"))


def _whistleblower(t: str) -> Scenario:
    steps = [*_open(t), Step(Commit(t, 11, "s1", _BAD)),
             Step(Join(t, 12, "v1")), Step(Join(t, 12, "v2")),
             Step(Verdict(t, 13, "v1", APPROVE)), Step(Verdict(t, 13, "v2", APPROVE)),
             Step(Whistle(t, 31, "w"), balances=_b(w=4_700)),
             Step(Reveal(t, 41, "s1", _salt("s1"))),
             Step(Rule(t, 42, "solver_wrong", _ALL), balances=_b(submitter=10_000, s1=3_000, v1=4_000, v2=4_000,
                                                          w=9_000, jackpot=2_000))]
    return Scenario("whistleblower_wins", "both verifiers approve a wrong result without checking; the "
                    "whistleblower re-checks, wins the dispute and takes the bond and both stakes",
                    _PARAMS, _FUNDING, tuple(steps), ("submitter", "w"))


def _false_whistle(t: str) -> Scenario:
    steps = [*_open(t), Step(Commit(t, 11, "s1", _GOOD)),
             Step(Join(t, 12, "v1")), Step(Verdict(t, 13, "v1", APPROVE)),
             Step(Whistle(t, 31, "w")), Step(Reveal(t, 41, "s1", _salt("s1"))),
             Step(Rule(t, 42, "challenger_wrong"), balances=_b(submitter=9_200, s1=5_940, v1=5_120, w=4_700,
                                                              jackpot=2_040))]
    return Scenario("whistleblower_wrong", "a whistleblower challenges a correct result and loses its deposit "
                    "to the solver; the approving verifier takes the whole verifier share",
                    _PARAMS, _FUNDING, tuple(steps), ("submitter", "s1", "v1"))


def _missed_commit(t: str) -> Scenario:
    steps = [*_open(t),
             _bad(Timeout(t, 19), "DeadlineMissed", "timeout.commit"),
             _bad(Commit(t, 20, "s1", _GOOD), "DeadlineMissed", "commit.deadline"),
             Step(Timeout(t, 20), balances=_b(submitter=10_100, s1=4_900)),
             _bad(Commit(t, 20, "s1", _GOOD), "WrongPhase", "commit.phase")]
    return Scenario("solver_misses_commit", "the winner never commits: its deposit goes to the submitter, "
                    "the fee is refunded", _PARAMS, _FUNDING, tuple(steps), ("submitter",))


def _missed_verdict(t: str) -> Scenario:
    steps = [*_open(t), Step(Commit(t, 11, "s1", _GOOD)),
             Step(Join(t, 12, "v1")), Step(Join(t, 12, "v2")), Step(Verdict(t, 30, "v1", APPROVE)),
             _bad(Verdict(t, 31, "v2", APPROVE), "DeadlineMissed", "verdict.deadline"),
             _bad(Join(t, 31, "v3"), "DeadlineMissed", "join.deadline"),
             Step(Reveal(t, 41, "s1", _salt("s1")),
                  balances=_b(submitter=9_200, s1=5_640, v1=5_120, v2=4_000, jackpot=3_040))]
    return Scenario("verifier_misses_verdict", "v2 stakes but gives no verdict in time and loses its stake to "
                    "the jackpot; v1 takes the whole verifier share", _PARAMS, _FUNDING, tuple(steps),
                    ("submitter", "s1", "v1"))


def _missed_reveal(t: str) -> Scenario:
    steps = [*_open(t), Step(Commit(t, 11, "s1", _BAD)),
             Step(Join(t, 12, "v1")), Step(Verdict(t, 13, "v1", REJECT)),
             _bad(Timeout(t, 50), "DeadlineMissed", "timeout.reveal"),
             _bad(Reveal(t, 51, "s1", _salt("s1")), "DeadlineMissed", "reveal.deadline"),
             Step(Timeout(t, 51), balances=_b(submitter=10_000, s1=3_000, v1=7_000, jackpot=2_000))]
    return Scenario("solver_misses_reveal", "the solver never reveals its salt: its bond goes to the "
                    "challenger, the fee back to the submitter", _PARAMS, _FUNDING, tuple(steps),
                    ("submitter", "v1"))


def _missed_whistle(t: str) -> Scenario:
    steps = [*_open(t), Step(Commit(t, 11, "s1", _GOOD)),
             Step(Join(t, 12, "v1")), Step(Verdict(t, 13, "v1", APPROVE)),
             _bad(Whistle(t, 30, "w"), "DeadlineMissed", "whistle.window"),
             _bad(Whistle(t, 41, "w"), "DeadlineMissed", "whistle.deadline"),
             Step(Reveal(t, 41, "s1", _salt("s1")), balances=_b(w=5_000, s1=5_640, v1=5_120))]
    return Scenario("whistleblower_misses_window", "a whistle before the verdicts close or after the window "
                    "is refused and costs nothing", _PARAMS, _FUNDING, tuple(steps), ("submitter", "s1", "v1", "w"))


def _tie_task_id() -> str:
    """A task id whose tie-break favours s2, so the test shows ties are not broken by name order."""
    return next(f"tie{i}" for i in range(1000) if compute_tiebreak(f"tie{i}", "s2") < compute_tiebreak(f"tie{i}",
                                                                                                       "s1"))


def _auction(t: str) -> Scenario:
    t = _tie_task_id()
    need = make_requirements({"memory_gb": 16}, ["exact"])
    weak = make_capabilities({"memory_gb": 8}, ["exact"])
    steps = [Step(Post(t, 0, "submitter", _FLOPS, need)),
             _bad(Bid(t, 1, "v3", 700, weak, compute_salt_digest("x")), "BidRejected", "bid.requirements"),
             _bad(Bid(t, 1, "v3", 700, make_capabilities({"memory_gb": 64}), compute_salt_digest("x")),
                  "BidRejected", "bid.requirements"),
             _bad(Bid(t, 1, "v3", 1_001, _CAPS, compute_salt_digest("x")), "BidRejected", "bid.price"),
             _bad(Bid(t, 1, "v3", 0, _CAPS, compute_salt_digest("x")), "BidRejected", "bid.price"),
             Step(Bid(t, 1, "s1", 800, _CAPS, compute_salt_digest(_salt("s1")))),
             Step(Bid(t, 2, "s2", 800, _CAPS, compute_salt_digest(_salt("s2")))),
             Step(Bid(t, 3, "v3", 950, _CAPS, compute_salt_digest(_salt("v3"))), balances=_b(v3=4_900)),
             Step(CloseAuction(t, 10), balances=_b(s1=5_000, s2=4_900, v3=5_000)),
             _bad(Commit(t, 11, "s1", _GOOD), "NotAuthorized", "commit.party"),
             Step(Commit(t, 11, "s2", _GOOD), balances=_b(s2=3_000)),
             Step(Join(t, 12, "v1")), Step(Verdict(t, 13, "v1", APPROVE)),
             Step(Reveal(t, 41, "s2", _salt("s2")), balances=_b(s2=5_640, s1=5_000, v3=5_000, v1=5_120))]
    return Scenario("auction_tie", "two equal lowest bids: the tie goes to the smaller blake3(task id, bidder); "
                    "non-compliant bids are refused; losers get their deposits back",
                    _PARAMS, _FUNDING, tuple(steps), ("submitter", "s1", "s2", "v1", "v3"))


def _refused(t: str) -> Scenario:
    salt = compute_salt_digest(_salt("s1"))
    steps = [Step(Post(t, 0, "submitter", _FLOPS)),
             _bad(Post(t, 0, "submitter", _FLOPS), "DuplicateMove", "post.duplicate"),
             _bad(Post("x/y", 0, "submitter", _FLOPS), "BadMove", "post.task_id"),
             _bad(Post("other", 0, "sub/mitter", _FLOPS), "BadMove", "move.party"),
             _bad(Post("other", 0, "submitter", 0), "BadMove", "post.flops"),
             _bad(Post("other", 0, "poor", _FLOPS), "InsufficientFunds"),
             _bad(Commit(t, 1, "s1", _GOOD), "WrongPhase", "commit.phase"),
             _bad(Bid(t, 1, "submitter", 800, _CAPS, salt), "NotAuthorized", "bid.party"),
             _bad(Bid(t, 1, "s1", 800, _CAPS, "zz"), "BadMove", "bid.salt_digest"),
             _bad(Bid(t, 1, "poor", 800, _CAPS, salt), "InsufficientFunds"),
             Step(Bid(t, 1, "s1", 800, _CAPS, salt)),
             _bad(Bid(t, 2, "s1", 700, _CAPS, salt), "DuplicateMove", "bid.duplicate"),
             _bad(CloseAuction(t, 9), "DeadlineMissed", "auction.close"),
             _bad(Bid(t, 10, "s2", 700, _CAPS, salt), "DeadlineMissed", "bid.deadline"),
             _bad(Timeout(t, 10), "WrongPhase", "timeout.phase"),
             Step(CloseAuction(t, 10)),
             _bad(CloseAuction(t, 10), "WrongPhase", "close_auction.phase"),
             _bad(Commit(t, 9, "s1", _GOOD), "BadMove", "move.clock"),
             _bad(Commit(t, 11, "s1", "nothex"), "BadMove", "commit.commitment"),
             _bad(Join(t, 11, "v1"), "WrongPhase", "join.phase"),
             Step(Commit(t, 11, "s1", _GOOD)),
             _bad(Commit(t, 11, "s1", _GOOD), "WrongPhase", "commit.phase"),
             _bad(Join(t, 12, "s1"), "NotAuthorized", "join.party"),
             _bad(Join(t, 12, "v1/x"), "BadMove", "move.party"),
             _bad(Join(t, 12, ""), "BadMove", "move.party"),
             _bad(Join(t, 12, "poor"), "InsufficientFunds"),
             _bad(Verdict(t, 12, "v1", APPROVE), "NotAuthorized", "verdict.party"),
             Step(Join(t, 12, "v1")),
             _bad(Join(t, 12, "v1"), "DuplicateMove", "join.duplicate"),
             _bad(Verdict(t, 13, "v1", WEIGHT_ONE + 1), "BadMove", "verdict.weight"),
             Step(Verdict(t, 13, "v1", APPROVE)),
             _bad(Verdict(t, 13, "v1", REJECT), "DuplicateMove", "verdict.duplicate"),
             _bad(Rule(t, 14, "solver_wrong"), "WrongPhase", "rule.phase"),
             _bad(Whistle(t, 31, "v1"), "NotAuthorized", "whistle.party"),
             _bad(Whistle(t, 31, "poor"), "InsufficientFunds"),
             _bad(Reveal(t, 41, "s2", _salt("s1")), "NotAuthorized", "reveal.party"),
             _bad(Reveal(t, 41, "s1", "wrong salt"), "SaltMismatch", "reveal.salt"),
             _bad(Verdict(t, 12, "v1", APPROVE), "BadMove", "move.clock"),
             Step(Whistle(t, 35, "w")),
             _bad(Whistle(t, 36, "w"), "DuplicateMove", "whistle.duplicate"),
             _bad(Reveal(t, 40, "s1", _salt("s1")), "DeadlineMissed", "reveal.window"),
             Step(Reveal(t, 41, "s1", _salt("s1"))),
             _bad(Reveal(t, 41, "s1", _salt("s1")), "WrongPhase", "reveal.phase"),
             _bad(Rule(t, 42, "nobody_knows"), "BadMove", "rule.ruling"),
             _bad(Rule(t, 42, "solver_wrong"), "BadMove", "rule.wrong_segments"),
             _bad(Rule(t, 42, "solver_wrong", (100,)), "BadMove", "rule.wrong_segments"),
             _bad(Rule(t, 42, "challenger_wrong", (1,)), "BadMove", "rule.wrong_segments"),
             Step(Rule(t, 42, "challenger_wrong"), balances=_b(s1=5_940, v1=5_120, w=4_700)),
             _bad(Rule(t, 43, "solver_wrong"), "WrongPhase", "rule.phase"),
             _bad(Timeout(t, 99), "WrongPhase", "timeout.phase"),
             _bad(Join("ghost", 99, "v1"), "BadMove", "move.task_id")]
    return Scenario("refused_moves", "duplicate, out-of-order, early, late, unauthorised and malformed moves "
                    "are refused and change nothing", _PARAMS, _FUNDING, tuple(steps), ("submitter", "s1", "v1"))


_BUILDERS: tuple[Callable[[str], Scenario], ...] = (
    _honest, _cheater_caught, _forced_error, _whistleblower, _false_whistle, _missed_commit, _missed_verdict,
    _missed_reveal, _missed_whistle, _auction, _refused)


def get_standard_scenarios() -> tuple[Scenario, ...]:
    """The scenarios every implementation of the game must pass."""
    return tuple(build(f"t{i}") for i, build in enumerate(_BUILDERS))


def dump_scenarios_json(scenarios: tuple[Scenario, ...] | None = None) -> str:
    """The scenarios (the standard set by default) as one canonical JSON document, for other implementations."""
    chosen = get_standard_scenarios() if scenarios is None else scenarios
    return json.dumps({"version": 1, "scenarios": [scenario_to_dict(s) for s in chosen]}, indent=1,
                      sort_keys=True) + "\n"
