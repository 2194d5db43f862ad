"""Issue 17, the protocol tax: compute accounting that adds up, committees that share one sample (and what happens
to a lazy or silent member), detection posted with the task, the cost model and its choice of k, and the
simulation's profits net of compute."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pol.engine
from games.auction import Requirements, make_capabilities
from games.consensus import WEIGHT_ONE
from games.cost import (
    ComputeEntry,
    CostModel,
    best_every,
    compute_escape_probability,
    compute_required_samples,
    compute_task_cost,
    compute_tax,
    compute_tax_curve,
)
from games.errors import BadMove, CostError, DeadlineMissed, DuplicateMove, MarketError, WrongPhase
from games.ledger import mint, open_account
from games.ledger_memory import MemoryLedger
from games.market import MarketReport, get_market_params, render_compute, replay_dispute, report_to_dict, run_market
from games.simulate import SimConfig, compute_sim_costs, render_markdown, simulate
from games.task import (
    Bid,
    CloseAuction,
    Commit,
    GameParams,
    Join,
    Post,
    Task,
    Verdict,
    apply_move,
    apply_post,
    compute_salt_digest,
    compute_shared_sample,
    compute_shares,
    get_committee,
    get_sample_size,
    get_verifier_segments,
)
from pol.spec import spec_from_dict
from pol.verify import compute_escape_probability as pol_escape
from pol.verify import compute_required_samples as pol_required

SPEC = spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 16}},
                       "data": {"name": "synthetic", "kwargs": {"n": 256}},
                       "steps": 16, "every": 4, "batch_size": 8})
SHARED = dataclasses.replace(GameParams(), sampling="shared")
# the simulation's committee: one shared sample of 16 segments, 5 or 6 per verifier (against 8 each replays alone)
SIM_SHARED = dataclasses.replace(SHARED, sample_count=16)


# ---------------------------------------------------------------------------------------------------- a market run


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MarketReport, int]]:
    """One market with every kind of compute: a cheating winner, a forced error (round 0 every segment wrong, round 1
    the forged bundle), a lazy verifier, a silent one replaced from the reserve, the replay referee; shared samples
    sized by a posted detection (seed 1: the lazy member does not hold every forged segment of round 1, so the
    cheat is caught and disputed). Training steps are counted by wrapping `pol.engine.one_step`, independently of the
    market's own accounting."""
    calls = Counter[str]()
    real = pol.engine.one_step

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["steps"] += 1
        return real(*args, **kwargs)

    params = dataclasses.replace(get_market_params(SPEC), forced_error_bps=10_000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pol.engine, "one_step", counting)
        report = run_market(tmp_path_factory.mktemp("market"), spec=SPEC, params=params, n_tasks=1, n_verifiers=4,
                            committee=3, cheaters=("solver-1", "solver-2", "solver-3"),
                            lazy_verifiers=("verifier-1",), silent_verifiers=("verifier-2",), sampling="shared",
                            detection=(0.99, 0.5), dispute=replay_dispute, seed=1)
    yield report, calls["steps"]


def test_reported_compute_adds_up_to_the_steps_run(counted_run: tuple[MarketReport, int]) -> None:
    report, counted = counted_run
    (task,) = report.tasks
    assert task.cheated and task.forced and task.outcome == "solver_wrong" and task.disputes
    steps = Counter[str]()
    for e in task.compute:
        steps[e.kind] += e.steps
    assert sum(steps.values()) == counted  # every step the engine ran is some party's reported compute
    assert steps["train"] == SPEC.steps and {"replay", "referee"} <= set(steps)
    assert task.tax == report.tax
    assert task.tax.training_steps == SPEC.steps and task.tax.protocol_steps == counted - SPEC.steps
    assert task.tax.tax_steps == pytest.approx((counted - SPEC.steps) / SPEC.steps)
    assert task.tax.training_seconds > 0 and task.tax.protocol_seconds > 0
    kinds = {e.kind for e in task.compute}
    assert {"train", "proof", "forced_error", "replay", "calibration", "referee"} <= kinds
    assert not {e.party for e in task.compute if e.kind in ("replay", "calibration")} & {"verifier-1", "verifier-2"}
    body = json.loads(json.dumps(report_to_dict(report)))
    assert body["tax"]["protocol_steps"] == counted - SPEC.steps and body["tasks"][0]["compute"]
    text = render_compute(report)
    assert "tax" in text and "verifier-4" in text and text.splitlines()[-1].startswith("total")


def test_shares_are_disjoint_and_reach_the_detection(counted_run: tuple[MarketReport, int]) -> None:
    report, _ = counted_run
    (task,) = report.tasks
    n = SPEC.steps // SPEC.every
    need = compute_required_samples(n, 0.99, 0.5)
    for r in (0, 1):
        mine = {v.verifier: v.segments for v in task.verifications if v.round == r}
        assert set(mine) == {"verifier-1", "verifier-3", "verifier-4"}  # verifier-2 is silent
        everything = [s for segs in mine.values() for s in segs]
        assert len(everything) == len(set(everything)) == need  # disjoint shares of one sample of the right size


def test_lazy_member_is_exposed_by_the_forced_error(counted_run: tuple[MarketReport, int]) -> None:
    """A forced error makes every segment wrong, so every share holds a wrong one: a member that skips its share
    and approves is slashed, the members that replayed share the jackpot."""
    report, _ = counted_run
    (task,) = report.tasks
    lazy = next(v for v in task.verifications if v.round == 0 and v.verifier == "verifier-1")
    assert lazy.verdict == "unchecked" and lazy.segments  # it had a share, and did not look
    assert all(v.verdict == "reject" for v in task.verifications if v.round == 0 and v.verifier != "verifier-1")
    changes = dict(task.changes)
    assert changes["verifier-1"] < 0 < changes["verifier-3"] and changes["verifier-4"] > 0


def test_silent_member_is_replaced_and_slashed(counted_run: tuple[MarketReport, int]) -> None:
    report, _ = counted_run
    (task,) = report.tasks
    stake = get_market_params(SPEC).verifier_stake
    assert dict(task.changes)["verifier-2"] == -2 * stake  # silent in both rounds: both stakes to the jackpot
    assert not [v for v in task.verifications if v.verifier == "verifier-2"]
    assert {v.round for v in task.verifications if v.verifier == "verifier-4"} == {0, 1}  # took over each time


def test_silent_share_goes_to_a_fresh_verifier_in_the_state_machine() -> None:
    """The rules of replacement, each refusal leaving the ledger as it was."""
    ledger, task = _committed(SHARED)
    t = task.task_id
    for v in ("v1", "v2", "v3"):
        task = apply_move(ledger, task, Join(t, task.last_tick, v))
    share = get_verifier_segments(task, "v2", SHARED)
    task = apply_move(ledger, task, Verdict(t, task.last_tick, "v1", WEIGHT_ONE))
    with pytest.raises(WrongPhase, match="join.committee"):  # the shares are dealt: nobody joins the committee now
        apply_move(ledger, task, Join(t, task.last_tick, "v4"))
    task = apply_move(ledger, task, Verdict(t, task.last_tick, "v3", WEIGHT_ONE))
    before = (ledger.get_accounts(), len(ledger.events()))
    with pytest.raises(DeadlineMissed, match="join.replace_window"):  # v2 may still speak before the deadline
        apply_move(ledger, task, Join(t, task.last_tick, "v4", "v2"))
    at = task.verify_deadline
    with pytest.raises(BadMove, match="join.replaces"):  # v1 gave its verdict
        apply_move(ledger, task, Join(t, at, "v4", "v1"))
    with pytest.raises(BadMove, match="join.replaces"):
        apply_move(ledger, task, Join(t, at, "v4", "nobody"))
    with pytest.raises(DeadlineMissed, match="join.replace_deadline"):
        apply_move(ledger, task, Join(t, task.whistle_deadline, "v4", "v2"))
    with pytest.raises(DeadlineMissed, match="verdict.deadline"):  # the silent one itself is too late
        apply_move(ledger, task, Verdict(t, at, "v2", WEIGHT_ONE))
    assert (ledger.get_accounts(), len(ledger.events())) == before
    task = apply_move(ledger, task, Join(t, at, "v4", "v2"))
    assert get_verifier_segments(task, "v4", SHARED) == share and get_committee(task) == ("v1", "v2", "v3")
    with pytest.raises(DuplicateMove, match="join.replaces"):
        apply_move(ledger, task, Join(t, at, "v5", "v2"))
    task = apply_move(ledger, task, Verdict(t, at + 1, "v4", WEIGHT_ONE))  # in the whistle window: allowed
    assert ("v4", WEIGHT_ONE) in task.verdicts


def _committed(params: GameParams, detection: tuple[float, float] | tuple[()] = ()) -> tuple[MemoryLedger, Task]:
    ledger = MemoryLedger(b"tax")
    for a in ("sub", "sol", "v1", "v2", "v3", "v4", "v5", params.jackpot_account):
        open_account(ledger, f"o/{a}", a)
        mint(ledger, f"m/{a}", a, 10**9)
    task = apply_post(ledger, params, Post("t", 0, "sub", 10**15, detection=detection))
    task = apply_move(ledger, task, Bid("t", 1, "sol", 100, make_capabilities(), compute_salt_digest("s")))
    task = apply_move(ledger, task, CloseAuction("t", params.bid_window))
    return ledger, apply_move(ledger, task, Commit("t", params.bid_window + 1, "sol", "ab" * 32))


# ---------------------------------------------------------------------------------------------------- sampling


def test_shared_sample_catches_at_the_committee_rate() -> None:
    """Over many beacons, a cheater faking a fraction f of segments is caught exactly when some member's share hits
    a fake, at the hypergeometric rate of the committee's one sample."""
    n, f, confidence, trials = 100, 0.1, 0.9, 3_000
    params = dataclasses.replace(SHARED, n_segments=n)
    base = Task("t", "sub", 1, 1, Requirements(), params=params, detection=(confidence, f), joined=("a", "b", "c"))
    need = get_sample_size(base, params)
    assert need == compute_required_samples(n, confidence, f) == pol_required(n, confidence, f)
    rng = random.Random(17)
    caught = 0
    sizes = Counter[int]()
    for _ in range(trials):
        task = dataclasses.replace(base, segment_beacon=rng.randbytes(32).hex())
        fakes = set(rng.sample(range(n), round(f * n)))
        shares = [set(get_verifier_segments(task, v, params)) for v in task.joined]
        union = set().union(*shares)
        assert sum(map(len, shares)) == len(union) == need  # disjoint, the whole sample
        sizes.update(len(s) for s in shares)
        caught += any(s & fakes for s in shares)
    p = 1 - compute_escape_probability(n, need, f)
    assert p >= confidence
    assert abs(caught / trials - p) < 4 * (p * (1 - p) / trials) ** 0.5 + 1e-9
    assert max(sizes) - min(sizes) <= 1  # shares differ by at most one segment


def test_no_member_chooses_its_share() -> None:
    """The deal depends on the beacon and the committee as a set, not on the order of joining."""
    sample = compute_shared_sample(b"\x01" * 32, 50, 12)
    one = compute_shares(b"\x01" * 32, ("a", "b", "c"), sample)
    assert one == compute_shares(b"\x01" * 32, ("c", "a", "b"), sample)
    owners = Counter(next(v for v, s in compute_shares(i.to_bytes(2, "big") * 16, ("a", "b", "c"), sample).items()
                          if sample[0] in s) for i in range(300))
    assert min(owners.values()) > 60  # the first segment goes to each member about a third of the time


def test_independent_mode_is_kept() -> None:
    params = dataclasses.replace(GameParams(), n_segments=100)
    task = Task("t", "sub", 1, 1, Requirements(), params=params, detection=(0.999, 0.1), joined=("a", "b"),
                segment_beacon="cd" * 32)
    need = compute_required_samples(100, 0.999, 0.1)
    assert all(len(get_verifier_segments(task, v, params)) == need for v in ("a", "b"))
    shared = dataclasses.replace(params, sampling="shared")
    assert sum(len(get_verifier_segments(task, v, shared)) for v in ("a", "b")) == need
    assert get_verifier_segments(task, "outsider", shared) == ()


@pytest.mark.parametrize(("n", "confidence", "f"), [(1, 0.5, 0.5), (7, 0.9, 0.3), (100, 0.999, 0.1),
                                                    (1000, 0.999, 0.1), (1000, 0.99, 0.01), (200, 0.5, 1.0)])
def test_sample_size_is_pol_verify_s(n: int, confidence: float, f: float) -> None:
    assert compute_required_samples(n, confidence, f) == pol_required(n, confidence, f)
    assert compute_escape_probability(n, 5, f) == pol_escape(n, 5, f)


@pytest.mark.parametrize(("detection", "rule"), [((1.0, 0.1), "post.detection"), ((0.9, 0.0), "post.detection"),
                                                 ((0.9,), "post.detection"), ((True, 0.1), "post.detection")])
def test_bad_detection_is_refused_and_changes_nothing(detection: Any, rule: str) -> None:
    ledger = MemoryLedger(b"x")
    open_account(ledger, "o", "sub")
    mint(ledger, "m", "sub", 10**9)
    before = (ledger.get_accounts(), len(ledger.events()))
    with pytest.raises(BadMove, match=rule):
        apply_post(ledger, GameParams(), Post("t", 0, "sub", 10**15, detection=detection))
    assert (ledger.get_accounts(), len(ledger.events())) == before


def test_bad_sampling_and_committee_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadMove, match="params.sampling"):
        apply_post(MemoryLedger(b"x"), dataclasses.replace(GameParams(), sampling="mine"), Post("t", 0, "s", 1))
    with pytest.raises(MarketError, match="market.committee"):
        run_market(tmp_path, spec=SPEC, n_verifiers=2, committee=3)
    with pytest.raises(MarketError, match="market.silent_verifiers"):
        run_market(tmp_path, spec=SPEC, silent_verifiers=("verifier-9",))


# ---------------------------------------------------------------------------------------------------- the cost model


MODEL = CostModel(step_seconds=0.01, state_bytes=4_000_000, write_bytes_per_s=1e9, hash_bytes_per_s=1e9,
                  read_bytes_per_s=2e9, steps=10_000, every=10)


def test_shared_sample_cuts_the_verification_by_the_committee() -> None:
    shared, independent = compute_task_cost(MODEL), compute_task_cost(dataclasses.replace(MODEL, shared=False))
    assert shared.samples == independent.samples == compute_required_samples(1000, 0.999, 0.1)
    assert independent.verify_seconds == pytest.approx(3 * shared.verify_seconds)
    assert shared.proof_seconds == independent.proof_seconds == pytest.approx(1001 * 4e6 * 2e-9)
    assert shared.tax == pytest.approx((shared.proof_seconds + shared.verify_seconds) / 100.0)
    native = compute_task_cost(dataclasses.replace(MODEL, numerics="native"))
    assert native.verify_steps == shared.verify_steps + 3 * MODEL.calibration_steps  # exact: no calibration


def test_best_every_balances_proof_against_replay() -> None:
    curve = dict(compute_tax_curve(MODEL, range(1, 201)))
    best = best_every(MODEL)
    assert curve[best].tax == min(c.tax for c in curve.values())
    checkpoint = MODEL.state_bytes * (1 / MODEL.hash_bytes_per_s + 1 / MODEL.write_bytes_per_s)
    s = curve[best].samples
    rule = (MODEL.steps * checkpoint / (s * MODEL.step_seconds)) ** 0.5  # the closed form in games.cost
    assert 0.5 * rule <= best <= 2 * rule
    assert curve[1].tax > curve[best].tax < curve[200].tax


@pytest.mark.parametrize(("change", "rule"), [({"step_seconds": 0}, "cost.step_seconds"),
                                              ({"state_bytes": -1}, "cost.state_bytes"),
                                              ({"every": 0}, "cost.every"), ({"numerics": "fast"}, "cost.numerics"),
                                              ({"confidence": 1.0}, "cost.confidence"),
                                              ({"cheat_fraction": 0}, "cost.cheat_fraction"),
                                              ({"calibration_steps": -1}, "cost.calibration_steps"),
                                              ({"verifier_setup_seconds": -1.0}, "cost.verifier_setup_seconds")])
def test_bad_cost_figures_are_refused(change: dict[str, Any], rule: str) -> None:
    with pytest.raises(CostError, match=rule):
        dataclasses.replace(MODEL, **change)


def test_tax_sums_entries_and_refuses_bad_ones() -> None:
    entries = [ComputeEntry("s", "train", 0, 100, 10.0), ComputeEntry("s", "proof", 0, 0, 1.0),
               ComputeEntry("v", "replay", 0, 8, 0.8), ComputeEntry("v", "calibration", 0, 2, 0.2)]
    tax = compute_tax(entries)
    assert (tax.training_steps, tax.protocol_steps, tax.tax_steps) == (100, 10, 0.1)
    assert tax.tax_seconds == pytest.approx(0.2)
    with pytest.raises(CostError, match="cost.entry"):
        compute_tax([ComputeEntry("s", "nap", 0, 1, 1.0)])
    with pytest.raises(CostError, match="cost.n_segments"):
        compute_required_samples(0, 0.9, 0.1)
    with pytest.raises(CostError, match="cost.candidates"):
        best_every(MODEL, candidates=[])


# ---------------------------------------------------------------------------------------------------- simulation


@pytest.fixture(scope="module")
def shared_report():  # type: ignore[no-untyped-def]
    return simulate(SimConfig(n_tasks=8_000, seed=7, params=SIM_SHARED))


def test_shared_committee_keeps_honesty_paying_net_of_compute(shared_report) -> None:  # type: ignore[no-untyped-def]
    """At the smaller per-verifier workload of a shared sample, every honest strategy still earns and every dishonest
    one (cheats of every size, lazy verifiers) still loses, at 3 standard errors, net of compute."""
    for r in shared_report.strategies:
        if r.role == "submitter":
            continue
        if r.honest:
            assert r.mean_profit - 3 * r.stderr > 0, f"{r.strategy} should earn: {r}"
        else:
            assert r.mean_profit + 3 * r.stderr < 0, f"{r.strategy} should lose: {r}"
    independent = simulate(SimConfig(n_tasks=300, seed=7))
    honest = {r.strategy: r.mean_compute for r in independent.strategies}
    shared = {r.strategy: r.mean_compute for r in shared_report.strategies}
    assert shared["verifier honest"] < 0.75 * honest["verifier honest"]  # a share, not a whole sample
    assert 0 < shared_report.protocol_tax < independent.protocol_tax
    assert "compute cost / task" in render_markdown(shared_report) and "shared sampling" in render_markdown(shared_report)


def test_simulation_prices_compute_with_the_cost_model() -> None:
    cfg = SimConfig(n_tasks=10)
    proof, segment, calibration = compute_sim_costs(cfg)
    m, n = cfg.cost, cfg.params.n_segments
    read = 2 * m.state_bytes * (1 / m.hash_bytes_per_s + 1 / m.read_bytes_per_s)
    assert segment == pytest.approx(cfg.train_cost * (m.every * m.step_seconds + read) / (n * m.every * m.step_seconds))
    assert segment > cfg.train_cost / n  # a replayed segment also reads two checkpoints
    setup = cfg.train_cost * m.verifier_setup_seconds / (n * m.every * m.step_seconds)
    assert calibration == pytest.approx(setup)  # exact numerics: a verifier's setup, no calibration
    native = compute_sim_costs(dataclasses.replace(cfg, cost=dataclasses.replace(cfg.cost, numerics="native")))
    assert native[2] == pytest.approx(setup + cfg.train_cost * m.calibration_steps / (n * m.every))
    with pytest.raises(BadMove, match="sim.train_cost"):
        simulate(dataclasses.replace(cfg, train_cost=-1.0))
