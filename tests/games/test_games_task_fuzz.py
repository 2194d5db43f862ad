"""Actor fuzzing of the task lifecycle: random sequences of moves by random parties at random ticks. After every
move: a refused move changed nothing, supply is conserved and the ledger verifies; a final task holds no escrow;
money held for a live task is exactly what its state says is locked."""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from games.auction import make_capabilities
from games.errors import GameError
from games.ledger import mint, open_account, verify_ledger
from games.ledger_memory import MemoryLedger
from games.task import (
    ASSIGNED,
    CHALLENGED,
    COMMITTED,
    FINAL,
    POSTED,
    RULINGS,
    Bid,
    CloseAuction,
    Commit,
    GameParams,
    Join,
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

CAPS = make_capabilities({"memory_gb": 32}, ["exact"])
GOOD, BAD = "11" * 32, "ee" * 32
PARTIES = ("submitter", "s1", "s2", "v1", "v2", "v3", "w", "poor", "jackpot")


def _move(kind: str, party: str, value: int, flag: bool, now: int):  # type: ignore[no-untyped-def]
    t = "f"
    salt = f"salt-{party}" if flag else "wrong"
    return {
        "bid": lambda: Bid(t, now, party, (500, 800, 1_200)[value % 3], CAPS, compute_salt_digest(f"salt-{party}")),
        "close": lambda: CloseAuction(t, now),
        "commit": lambda: Commit(t, now, party, GOOD if flag else BAD),
        "join": lambda: Join(t, now, party),
        "verdict": lambda: Verdict(t, now, party, (0, 5_000, 10_000)[value % 3]),
        "whistle": lambda: Whistle(t, now, party),
        "reveal": lambda: Reveal(t, now, party, f"salt-{party}" if value % 4 else salt,
                                 ("", GOOD, BAD)[value % 3]),
        "rule": lambda: Rule(t, now, (*RULINGS, "nonsense")[value % 3],
                             tuple(range(0, 200, 1 + value)) if value % 3 == 0 or not flag else ()),
        "timeout": lambda: Timeout(t, now),
    }[kind]()


def locked_by_state(task: Task) -> int:
    """What the task's state says its escrows hold."""
    p = task.params
    if task.phase == FINAL:
        return 0
    if task.phase == POSTED:
        return task.max_price + p.bid_deposit * len(task.bids)
    if task.phase == ASSIGNED:
        return task.max_price + p.bid_deposit
    # once the solver reveals, joined verifiers who never gave a verdict have been slashed (_slash_silent):
    # from then on only the stakes of verifiers with a verdict are still locked
    staked = len(task.verdicts) if task.phase == CHALLENGED else len(task.joined)
    return task.max_price + p.solver_bond + p.verifier_stake * staked + p.whistle_deposit * len(task.whistleblowers)


KINDS = ["bid", "close", "commit", "join", "verdict", "whistle", "reveal", "rule", "timeout"]
LIKELY = {POSTED: ["bid", "bid", "bid", "bid", "close"], ASSIGNED: ["commit", "commit", "commit", "timeout"],
          COMMITTED: ["join", "join", "verdict", "verdict", "whistle", "reveal", "reveal", "reveal", "timeout"], CHALLENGED: ["rule"],
          FINAL: KINDS}


@given(st.data(), st.sampled_from([0, 5_000, 10_000]))
@settings(max_examples=150, deadline=None)
def test_random_play_keeps_the_books(data: st.DataObject, forced_bps: int) -> None:
    params = GameParams(solver_bond=2_000, verifier_stake=1_000, whistle_deposit=300, forced_error_bps=forced_bps,
                        jackpot_payout=600)
    ledger = MemoryLedger(b"fuzz")
    for p in PARTIES:
        open_account(ledger, f"open/{p}", p)
        mint(ledger, f"mint/{p}", p, 10 if p == "poor" else 20_000)
    supply = ledger.total_supply()
    task = apply_post(ledger, params, Post("f", 0, "submitter", 1_000 * 10**12))
    now = 0
    for _ in range(data.draw(st.integers(0, 80), label="length")):
        kinds = LIKELY[task.phase] if data.draw(st.integers(0, 9)) else KINDS
        kind = data.draw(st.sampled_from(kinds))
        likely = {"bid": ("s1", "s2"), "join": ("v1", "v2", "v3"), "verdict": ("v1", "v2", "v3"),
                  "whistle": ("w",), "commit": (task.solver or "s1",), "reveal": (task.solver or "s1",)}
        party = data.draw(st.sampled_from(likely.get(kind, PARTIES) if data.draw(st.booleans()) else PARTIES))
        now += data.draw(st.sampled_from([0, 1, 2, 5, 10]))
        move = _move(kind, party, data.draw(st.integers(0, 11)), data.draw(st.booleans()), now)
        before = (ledger.get_accounts(), ledger.get_escrows(), len(ledger.events()))
        try:
            new = apply_move(ledger, task, move)
        except GameError:
            assert (ledger.get_accounts(), ledger.get_escrows(), len(ledger.events())) == before
            continue
        assert new.phase in (POSTED, ASSIGNED, COMMITTED, CHALLENGED, FINAL)
        task = new
        assert ledger.total_supply() == supply
        held = sum(v for k, v in ledger.get_escrows().items() if k.startswith(get_task_escrows("f")))
        assert held == locked_by_state(task), f"{task.phase}: escrows hold {held}"
        assert min(ledger.get_accounts().values()) >= 0
    verify_ledger(ledger)
    assert sum(ledger.get_accounts().values()) + sum(ledger.get_escrows().values()) == supply
    event(f"ended {task.phase} {task.outcome}".strip())
