"""Economic simulation of the game: many tasks played through the real lifecycle (`games.task`) on the in-memory
ledger, with strategies drawn per task, reporting each strategy's expected profit and the stakes at which
dishonesty stops paying.

Strategies
- solver: honest, or cheating a fraction f of segments (each segment faked independently with probability f;
  a cheater saves that share of the training cost). A checker that replays s distinct beacon-drawn segments
  catches it with probability q(f) = 1 - (1 - f)^s.
- verifier: honest (replays its s segments, rejects if one is wrong) or lazy (approves without checking).
- whistleblower: with probability r per task, replays the samples the approving verifiers attested to and blows
  the whistle if one is wrong (it never accuses wrongly, so its deposit is never lost here).
Costs are off-ledger and come from the protocol's cost model (`games.cost.CostModel`, `SimConfig.cost`, whose
figures `benchmarks/protocol_tax.py` measures): training C for an honest run of N = n x k steps; the solver's
proof overhead C x proof / training (it writes every checkpoint, cheater or not); for each replayed segment
c1 = C x (k t + reading and hashing its two checkpoints) / (N t), so a replay of s segments costs about C s / n;
each replaying verifier also pays its setup and, in native numerics, calibrates (C x calibration steps / N). Each verifier's workload
follows `params.sampling`: its own sample of s segments (independent), or its share of ONE committee sample of s
(shared: about s / 3 each with three verifiers). Profit per task = change of the party's ledger balance - its
compute cost, and the report gives each strategy's mean compute cost and the realised protocol tax (protocol
compute / training compute). The referee of a dispute is truthful and names the wrong segments among those the
challengers and the approvers sampled.

Default parameters (`GameParams()` and `SimConfig()`), with P the price, F = P (1 - v - t) the solver's pay
(v the verifiers' share, t the jackpot tax), R = P v / k the share of each of k approving verifiers, p the
forced-error rate, J the jackpot payout, B the solver bond, S the verifier stake:

    P = 1400 (max price 1500 from 1.5e15 FLOPs at 1 unit per 1e12), C = 1000, n = 200, s = 8, c = 40,
    v = 15%, t = 5%  ->  F = 1120, R = 70 (k = 3), tax 70 per task
    p = 5%, J = 1000, B = 3000, S = 5000, deposits 100 (bid) and 500 (whistle)

1. Honest solver:   F - C = 120 > 0.
2. Cheating solver: caught with probability P(f) = 1 - (1 - q(f))^h (h honest checkers, plus whistleblowers).
   Its expected profit (1 - P) F - (1 - f) C - P B is negative iff
        B > ((1 - P(f)) F - (1 - f) C) / P(f),
   and it earns less than an honest solver iff f C < P(f) (F + B). For small f, P(f) ~ h s f, so the second
   condition becomes C < h s (F + B), independent of f: with s = 8 and a single honest checker, C / s = 125 < F
   already. So cheating never pays *relative to honest work* once one checker is honest, and the bond B sizes the
   absolute loss; the simulation reports the bond at which each cheat's expected profit crosses zero (a cheater
   faking under one segment in n in expectation is close to honest work, and is caught rarely: that is the
   regime where B matters; B = 3000 makes even f = 0.5% lose, see the report).
3. Lazy verifier:   saves c, but loses S whenever it approves a forced error (probability p) or attests to a
   segment proven wrong. Even with no cheating solver at all, its profit R - p S is negative iff S > R / p
   = 1400 (equivalently p > R / S = 1.4% at S = 5000); S = 5000 leaves margin for rounds where its share R is
   larger (fewer approvers). `benchmarks/game_economics.py` sweeps p with no cheater: laziness pays at p = 0
   (the verifier's dilemma), about breaks even near 1%, and loses from 2.5% on.
4. Honest verifier: R - c + p J / (challengers) - p c > 0: 70 - 40 + ~20 - 2 > 0. The forced-error term pays
   for checking even when no solver cheats (Truebit's answer to the verifier's dilemma): c < p (S + J / k).
5. Jackpot: inflow t P = 70 per task (plus forfeited stakes) exceeds the outflow p J = 50 per task.
6. Whistleblower: pays c per approver it re-checks, earns the stakes of lazy approvers it proves wrong and a share
   of the bond and jackpot; positive while some verifiers are lazy (which is exactly when it is needed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3

from games.auction import make_capabilities
from games.consensus import WEIGHT_ONE, Weight
from games.cost import CostModel, compute_task_cost
from games.errors import BadMove
from games.ledger import Amount, mint, open_account
from games.ledger_memory import MemoryLedger
from games.task import (
    CHALLENGED,
    COMMITTED,
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
    Whistle,
    apply_move,
    apply_post,
    compute_fee_estimate,
    compute_is_forced,
    compute_salt_digest,
    get_verifier_segments,
    is_approval,
    verify_params,
)

__all__ = [
    "SimConfig",
    "SimulationReport",
    "StrategyResult",
    "compute_break_even",
    "compute_detection_probability",
    "compute_sim_costs",
    "render_markdown",
    "report_to_dict",
    "save_plot",
    "simulate",
]

_CAPS = make_capabilities()
_FUNDS = 10**15


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What to simulate. `solver_mix` is (cheat fraction f, share of tasks); f = 0 is the honest solver.

    The default population is deliberately hostile (40% of solvers cheat, 30% of verifier seats are lazy) so
    that every dishonest strategy is played often enough to measure; `benchmarks/game_economics.py` also plays
    an honest-solver world, where only forced errors keep verifiers checking."""

    params: GameParams = dataclasses.field(default_factory=GameParams)
    n_tasks: int = 4_000
    seed: int = 0
    train_cost: float = 1_000.0  # compute cost of an honest training run, in base units
    price: Amount = 1_400  # what solvers bid
    flops: int = 1_500 * 10**12  # -> maximum price 1500 at the default gas price
    solver_mix: tuple[tuple[float, float], ...] = ((0.0, 0.6), (0.005, 0.1), (0.05, 0.1), (0.25, 0.1), (1.0, 0.1))
    verifiers_per_task: int = 3
    lazy_fraction: float = 0.3  # each verifier seat is lazy with this probability
    whistle_rate: float = 0.2  # a whistleblower re-checks a task with this probability
    jackpot_seed: Amount = 20_000  # minted into the jackpot at genesis
    detection: tuple[float, float] | tuple[()] = ()  # the required detection every task posts (sizes the sample)
    # the compute figures (its steps, sample and committee are set from the game: n_segments x every steps);
    # default: the built-in transformer in exact numerics at k = 10, as benchmarks/protocol_tax.py measured it
    # (CPU seconds, benchmarks/results/protocol_tax.md); only ratios matter here, the price is `train_cost`
    cost: CostModel = dataclasses.field(default_factory=lambda: CostModel(
        step_seconds=0.0476, state_bytes=1_274_904, write_bytes_per_s=2.5e8, hash_bytes_per_s=1.55e9,
        read_bytes_per_s=1.87e9, every=10, numerics="exact", verifier_setup_seconds=0.038))


@dataclass(frozen=True, slots=True)
class StrategyResult:
    strategy: str
    role: str
    honest: bool
    samples: int
    mean_profit: float  # net of the party's compute cost
    stderr: float
    loss_rate: float  # share of its tasks in which it lost its bond or stake
    break_even_stake: float | None  # bond (solvers) or stake (verifiers) at which expected profit is 0
    mean_compute: float = 0.0  # its mean compute cost per task (training, proof, replays), in base units


@dataclass(frozen=True, slots=True)
class SimulationReport:
    config: dict[str, Any]
    n_tasks: int
    forced_errors: int
    disputes: int
    jackpot_start: Amount
    jackpot_end: Amount
    strategies: tuple[StrategyResult, ...]
    min_unprofitable_bond: float  # the smallest solver bond at which every simulated cheat loses money
    min_unprofitable_stake: float  # the smallest verifier stake at which laziness loses money
    protocol_tax: float = 0.0  # protocol compute (proof, replays, whistleblowers' re-checks) / training compute


def compute_detection_probability(f: float, s: int) -> float:
    """Probability that a replay of s segments hits at least one of a fraction f of faked segments."""
    return 1.0 - (1.0 - f) ** s


def compute_break_even(mean_profit: float, loss_rate: float, stake: float) -> float | None:
    """The stake at which expected profit is zero, given that the stake is lost in `loss_rate` of tasks
    (profit is linear in the stake: profit(x) = mean_profit + loss_rate (stake - x)). None if never lost."""
    if loss_rate <= 0:
        return None
    return max(0.0, stake + mean_profit / loss_rate)


def compute_sim_costs(config: SimConfig) -> tuple[float, float, float]:
    """(proof cost of a task, cost of replaying one segment, fixed cost of a verifier that replays anything: its
    setup and, in native numerics, its calibration), in base units:
    `config.cost` on a run of n_segments x every steps, priced so that the training costs `config.train_cost`.
    Raises CostError for figures out of range."""
    p, model = config.params, config.cost
    model = dataclasses.replace(model, steps=p.n_segments * model.every)
    cost = compute_task_cost(model)
    unit = config.train_cost / cost.training_seconds  # base units per second of compute
    segment = (model.every * model.step_seconds
               + 2 * model.state_bytes * (1 / model.hash_bytes_per_s + 1 / model.read_bytes_per_s))
    calibration = model.calibration_steps * model.step_seconds if model.numerics == "native" else 0.0
    return cost.proof_seconds * unit, segment * unit, (calibration + model.verifier_setup_seconds) * unit


_sim_costs = functools.lru_cache(maxsize=8)(compute_sim_costs)


def _digest(*parts: object) -> str:
    return blake3("/".join(map(str, parts)).encode()).hexdigest()


def _draw_fraction(rng: random.Random, mix: tuple[tuple[float, float], ...]) -> float:
    u, acc = rng.random() * sum(w for _, w in mix), 0.0
    for f, w in mix:
        acc += w
        if u < acc:
            return f
    return mix[-1][0]


def _solver_name(f: float) -> str:
    return "solver honest" if f == 0 else f"solver cheat f={f:g}"


def _verify_config(config: SimConfig) -> None:
    verify_params(config.params)
    if config.n_tasks <= 0 or config.verifiers_per_task <= 0 or not config.solver_mix:
        raise BadMove("sim.config", "need tasks, verifiers and a solver mix")
    if not config.train_cost > 0:
        raise BadMove("sim.train_cost", "the training's cost must be positive")
    if config.price > compute_fee_estimate(config.flops, config.params):
        raise BadMove("sim.price", "the solvers' price exceeds the task's maximum price")
    if any(not 0 <= f <= 1 or w < 0 for f, w in config.solver_mix):
        raise BadMove("sim.solver_mix", "fractions in [0, 1], non-negative shares")


@dataclass(slots=True)
class _Play:
    """One task being played (mutable scratch; never leaves this module)."""

    task: Task
    costs: dict[str, float]
    fakes: frozenset[int]
    true_commitment: str
    forced: bool
    wrong: frozenset[int] = frozenset()
    disputed: bool = False
    protocol: float = 0.0  # compute spent for the protocol (proof, replays, re-checks), base units


def _play_round(ledger: MemoryLedger, cfg: SimConfig, play: _Play, verifiers: dict[str, bool],
                rng: random.Random) -> None:
    """Joins, verdicts, an optional whistle, the reveal and, if challenged, the truthful ruling."""
    p, tid, now = cfg.params, play.task.task_id, play.task.last_tick
    _, segment_cost, calibration_cost = _sim_costs(cfg)
    for v in verifiers:
        play.task = apply_move(ledger, play.task, Join(tid, now, v))
    samples = {v: set(get_verifier_segments(play.task, v, p)) for v in verifiers}

    def check(segments: set[int]) -> float:
        return segment_cost * len(segments) + (calibration_cost if segments else 0.0)

    for v, lazy in verifiers.items():
        weight: Weight = WEIGHT_ONE
        if not lazy:
            play.costs[v] += check(samples[v])
            play.protocol += check(samples[v])
            weight = 0 if play.wrong & samples[v] else WEIGHT_ONE
        play.task = apply_move(ledger, play.task, Verdict(tid, now, v, weight))
    approvers = [v for v, w in play.task.verdicts if is_approval(w)]
    if approvers and rng.random() < cfg.whistle_rate:
        recheck = sum(check(samples[a]) for a in approvers)
        play.costs["wb"] += recheck
        play.protocol += recheck
        if any(play.wrong & samples[a] for a in approvers):
            play.task = apply_move(ledger, play.task, Whistle(tid, play.task.verify_deadline, "wb"))
    reveal = play.true_commitment if play.forced and play.task.round == 0 else ""
    play.task = apply_move(ledger, play.task, Reveal(tid, play.task.whistle_deadline, "solver", f"salt/{tid}",
                                                     reveal))
    if play.task.phase == CHALLENGED:
        play.disputed = True
        found = sorted(play.wrong & set().union(*samples.values()))
        play.task = apply_move(ledger, play.task, Rule(tid, play.task.reveal_deadline, "solver_wrong",
                                                       tuple(found)))


def _play_task(ledger: MemoryLedger, cfg: SimConfig, index: int, rng: random.Random,
               f: float, lazy: dict[str, bool]) -> _Play:
    p, tid = cfg.params, f"sim{index}"
    fakes = frozenset(i for i in range(p.n_segments) if rng.random() < f)
    salt = f"salt/{tid}"
    task = apply_post(ledger, p, Post(tid, 0, "submitter", cfg.flops, detection=cfg.detection))
    task = apply_move(ledger, task, Bid(tid, 1, "solver", cfg.price, _CAPS, compute_salt_digest(salt)))
    task = apply_move(ledger, task, CloseAuction(tid, p.bid_window))
    forced = compute_is_forced(bytes.fromhex(task.forced_beacon), salt, p.forced_error_bps)
    true_commitment = _digest("result", tid, sorted(fakes))
    posted = _digest("forced", tid) if forced else true_commitment
    costs: dict[str, float] = defaultdict(float)
    proof = _sim_costs(cfg)[0]
    costs["solver"] = cfg.train_cost * (1 - len(fakes) / p.n_segments) + proof
    task = apply_move(ledger, task, Commit(tid, p.bid_window + 1, "solver", posted))
    play = _Play(task, costs, fakes, true_commitment, forced,
                 wrong=frozenset(range(p.n_segments)) if forced else fakes, protocol=proof)
    _play_round(ledger, cfg, play, lazy, rng)
    if play.task.phase == COMMITTED:  # a forced error was revealed: verify the true commitment
        play.wrong = fakes
        _play_round(ledger, cfg, play, lazy, rng)
    return play


def _summarise(name: str, role: str, honest: bool, profits: list[float], losses: int,
               stake: float, compute: float) -> StrategyResult:
    n = len(profits)
    mean = sum(profits) / n
    var = sum((x - mean) ** 2 for x in profits) / (n - 1) if n > 1 else 0.0
    rate = losses / n
    return StrategyResult(name, role, honest, n, mean, math.sqrt(var / n), rate,
                          compute_break_even(mean, rate, stake) if not honest else None, compute / n)


def simulate(config: SimConfig | None = None) -> SimulationReport:
    """Play `config.n_tasks` tasks and report each strategy's expected profit per task.
    Raises BadMove ('sim.*' or 'params.*') for an invalid configuration."""
    config = config if config is not None else SimConfig()
    _verify_config(config)
    compute_sim_costs(config)  # raises CostError before anything is played
    p, rng = config.params, random.Random(config.seed)
    ledger = MemoryLedger(blake3(f"pol.games.simulate/{config.seed}".encode()).digest())
    verifiers = [f"v{j}" for j in range(config.verifiers_per_task)]
    for account in ("submitter", "solver", "wb", *verifiers, p.jackpot_account):
        open_account(ledger, f"genesis/open/{account}", account)
        mint(ledger, f"genesis/mint/{account}", account,
             config.jackpot_seed if account == p.jackpot_account else _FUNDS)
    profits: dict[tuple[str, str, bool], list[float]] = defaultdict(list)
    losses: dict[tuple[str, str, bool], int] = defaultdict(int)
    computes: dict[tuple[str, str, bool], float] = defaultdict(float)
    forced = disputes = 0
    training = protocol = 0.0
    for index in range(config.n_tasks):
        f = _draw_fraction(rng, config.solver_mix)
        lazy = {v: rng.random() < config.lazy_fraction for v in verifiers}
        before, start = ledger.get_accounts(), len(ledger.events())
        play = _play_task(ledger, config, index, rng, f, lazy)
        after = ledger.get_accounts()
        forced += play.forced
        disputes += play.disputed
        training += config.train_cost * (1 - len(play.fakes) / p.n_segments)
        protocol += play.protocol
        slashed = {ev.src.rsplit("/", 1)[-1] for ev in ledger.events(start) if ev.kind == "slash"}
        roles = {"solver": ("solver", _solver_name(f), f == 0), "wb": ("whistleblower",
                 f"whistleblower r={config.whistle_rate:g}", True), "submitter": ("submitter", "submitter", True)}
        roles.update({v: ("verifier", "verifier lazy" if lazy[v] else "verifier honest", not lazy[v])
                      for v in verifiers})
        for account, (role, name, honest) in roles.items():
            key = (name, role, honest)
            profits[key].append(after[account] - before[account] - play.costs[account])
            computes[key] += play.costs[account]
            lost = play.task.outcome == "solver_wrong" if account == "solver" else account in slashed
            losses[key] += lost
    stakes = {"solver": p.solver_bond, "verifier": p.verifier_stake, "whistleblower": p.whistle_deposit,
              "submitter": 0}
    results = tuple(_summarise(name, role, honest, profits[(name, role, honest)], losses[(name, role, honest)],
                               stakes[role], computes[(name, role, honest)])
                    for name, role, honest in sorted(profits, key=lambda k: (k[1], k[0])))
    return SimulationReport(
        config=_config_to_dict(config), n_tasks=config.n_tasks, forced_errors=forced, disputes=disputes,
        jackpot_start=config.jackpot_seed, jackpot_end=ledger.balance(p.jackpot_account), strategies=results,
        min_unprofitable_bond=max((r.break_even_stake or 0.0 for r in results if r.role == "solver"),
                                  default=0.0),
        min_unprofitable_stake=max((r.break_even_stake or 0.0 for r in results if r.role == "verifier"),
                                   default=0.0),
        protocol_tax=protocol / training if training else 0.0)


def _config_to_dict(config: SimConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["solver_mix"] = [list(x) for x in config.solver_mix]
    data["detection"] = list(config.detection)
    return data


def report_to_dict(report: SimulationReport) -> dict[str, Any]:
    """A JSON-ready dict of the report."""
    return dataclasses.asdict(report)


def render_markdown(report: SimulationReport) -> str:
    """The report as a markdown table plus the headline numbers."""
    header = ("| strategy | role | honest | tasks | compute cost / task | expected profit / task (net of compute) "
              "| ± s.e. | loses stake in | break-even stake |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report.strategies:
        even = "-" if r.break_even_stake is None else f"{r.break_even_stake:,.0f}"
        lines.append(f"| {r.strategy} | {r.role} | {'yes' if r.honest else 'no'} | {r.samples} | "
                     f"{r.mean_compute:,.1f} | {r.mean_profit:,.1f} | {r.stderr:,.1f} | {100 * r.loss_rate:.1f}% | "
                     f"{even} |")
    p = report.config["params"]
    counts = (f"{report.n_tasks} tasks, {report.forced_errors} forced errors, {report.disputes} disputes; "
              f"jackpot {report.jackpot_start:,} -> {report.jackpot_end:,}; {p['sampling']} sampling, protocol "
              f"tax {100 * report.protocol_tax:.1f}% (proof, replays and re-checks / training compute).")
    headline = (f"Solver bond {p['solver_bond']:,}: every simulated cheat loses money from a bond of "
                f"{report.min_unprofitable_bond:,.0f}. Verifier stake {p['verifier_stake']:,}: laziness loses "
                f"money from a stake of {report.min_unprofitable_stake:,.0f}.")
    lines += ["", counts, headline]
    return "\n".join(lines) + "\n"


def save_plot(report: SimulationReport, path: str | Path) -> Path:
    """Save a PNG: expected profit per strategy (with standard errors) and each cheat's expected profit as a
    function of the solver bond. Uses matplotlib's Agg backend; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r.strategy for r in report.strategies]
    colors = ["tab:grey" if r.role == "submitter" else "tab:green" if r.honest else "tab:red"
              for r in report.strategies]
    bars.barh(names, [r.mean_profit for r in report.strategies], xerr=[r.stderr for r in report.strategies],
              color=colors)
    bars.axvline(0, color="black", lw=0.8)
    bars.set_xlabel("expected profit per task (base units)")
    bars.set_title("profit by strategy (green honest, red dishonest, grey the paying submitter)")
    bond = report.config["params"]["solver_bond"]
    xs = [bond * i / 20 for i in range(41)]
    for r in report.strategies:
        if r.role == "solver":
            lines.plot(xs, [r.mean_profit + r.loss_rate * (bond - x) for x in xs], label=r.strategy)
    lines.axhline(0, color="black", lw=0.8)
    lines.axvline(bond, color="grey", ls="--", lw=0.8, label="default bond")
    lines.set_xlabel("solver bond (base units)")
    lines.set_ylabel("expected profit per task")
    lines.set_title("solver profit vs bond")
    lines.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
