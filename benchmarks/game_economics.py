"""Does honesty pay, and how fast is the ledger? Expected profit per strategy across solver bonds and forced-error
rates (the simulation of `games.simulate`, played through the real task lifecycle on the in-memory ledger), and
ledger throughput in operations per second on both backends.

    python benchmarks/game_economics.py            # default: ~30 s on 2 cores
    python benchmarks/game_economics.py --quick    # smaller, for a smoke run

Writes benchmarks/results/game_economics.{json,md,png} and game_simulation.png (the headline run's plot).
- headline: the default parameters and population (see `games.simulate` for why these parameters); profits are
  net of each party's compute (`games.cost`: training, proof overhead, replays, re-checks);
- shared: the same with one committee sample of 16 segments split among the three verifiers (issue 17): each
  verifier replays 5 or 6 segments instead of 8, and laziness must still lose;
- bond sweep: the default population at several solver bonds (cheaters' profit should fall through zero);
- forced-error sweep: a population with no cheating solver, where only forced errors can catch a lazy verifier:
  at rate 0 laziness pays (the verifier's dilemma), at the default rate it does not;
- throughput: a settlement-like mix of lock / release / transfer / slash operations, each its own op id;
  SQLite in its default durable mode (WAL, synchronous=FULL, one transaction per operation) and with
  synchronous=NORMAL for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, markdown_table, write_results
from games.ledger import Ledger, lock, mint, open_account, release, slash, transfer
from games.ledger_memory import MemoryLedger
from games.ledger_sqlite import SqliteLedger
from games.simulate import SimConfig, SimulationReport, render_markdown, save_plot, simulate
from games.task import GameParams

BONDS = (1, 250, 500, 1_000, 3_000, 6_000)
FORCED_BPS = (0, 100, 250, 500, 1_000)


def _profits(report: SimulationReport) -> dict[str, int]:
    return {r.strategy: round(r.mean_profit) for r in report.strategies if r.role != "submitter"}


def bond_sweep(n_tasks: int) -> list[dict[str, Any]]:
    rows = []
    for bond in BONDS:
        cfg = SimConfig(n_tasks=n_tasks, seed=11, params=dataclasses.replace(GameParams(), solver_bond=bond))
        rows.append({"solver_bond": bond, **_profits(simulate(cfg))})
    return rows


def forced_sweep(n_tasks: int) -> list[dict[str, Any]]:
    rows = []
    for bps in FORCED_BPS:
        cfg = SimConfig(n_tasks=n_tasks, seed=12, solver_mix=((0.0, 1.0),),
                        params=dataclasses.replace(GameParams(), forced_error_bps=bps))
        rows.append({"forced_error_bps": bps, **_profits(simulate(cfg))})
    return rows


def _settlement_ops(ledger: Ledger, n_ops: int) -> int:
    """A settlement-like workload; returns the number of operations applied."""
    parties = [f"p{i}" for i in range(16)]
    for p in parties:
        open_account(ledger, f"open/{p}", p)
        mint(ledger, f"mint/{p}", p, 10**12)
    done, i = 0, 0
    while done < n_ops:
        a, b = parties[i % 16], parties[(i * 7 + 3) % 16]
        escrow = f"task/{i}/stake"
        lock(ledger, f"{i}/lock", a, escrow, 1_000)
        release(ledger, f"{i}/release", escrow, b, 600)
        slash(ledger, f"{i}/slash", escrow, a, 400, reason="bench")
        done += 3
        if a != b:
            transfer(ledger, f"{i}/transfer", b, a, 10)
            done += 1
        i += 1
    return done


def throughput(n_memory: int, n_sqlite: int) -> list[dict[str, Any]]:
    rows = []
    runs = [("memory", "-", n_memory), ("sqlite", "FULL", n_sqlite // 4), ("sqlite", "NORMAL", n_sqlite)]
    for backend, sync, n in runs:
        with tempfile.TemporaryDirectory() as tmp:
            ledger: Any = MemoryLedger(b"bench") if backend == "memory" else SqliteLedger(
                Path(tmp) / "bench.db", b"bench", synchronous=sync)
            start = time.perf_counter()
            ops = _settlement_ops(ledger, n)
            elapsed = time.perf_counter() - start
            retry_start = time.perf_counter()
            lock(ledger, "0/lock", "p0", "task/0/stake", 1_000)  # a retry is answered from the op record
            retry = time.perf_counter() - retry_start
            if backend == "sqlite":
                ledger.close()
        rows.append({"backend": backend, "synchronous": sync, "ops": ops, "seconds": round(elapsed, 3),
                     "ops_per_s": round(ops / elapsed), "retry_us": round(retry * 1e6, 1)})
    return rows


def plot_sweeps(bonds: list[dict[str, Any]], forced: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in [k for k in bonds[0] if k.startswith("solver ")]:
        left.plot([r["solver_bond"] for r in bonds], [r.get(name, float("nan")) for r in bonds], marker="o",
                  label=name)
    left.axhline(0, color="black", lw=0.8)
    left.set_xlabel("solver bond")
    left.set_ylabel("expected profit per task")
    left.set_title("solvers: profit vs bond (default population)")
    left.legend(fontsize=8)
    for name in [k for k in forced[0] if k.startswith(("verifier", "whistle"))]:
        right.plot([r["forced_error_bps"] / 100 for r in forced], [r.get(name, float("nan")) for r in forced],
                   marker="o", label=name)
    right.axhline(0, color="black", lw=0.8)
    right.set_xlabel("forced-error rate (%)")
    right.set_title("verifiers: profit vs forced-error rate (no cheating solver)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and operations")
    args = parser.parse_args()
    headline_tasks, sweep_tasks = (800, 200) if args.quick else (6_000, 1_500)
    n_memory, n_sqlite = (4_000, 400) if args.quick else (40_000, 4_000)
    start = time.perf_counter()
    headline = simulate(SimConfig(n_tasks=headline_tasks, seed=7))
    # one committee sample of 16 segments split among the 3 verifiers (5 or 6 each, against 8 each alone)
    shared = simulate(SimConfig(n_tasks=headline_tasks, seed=7,
                                params=dataclasses.replace(GameParams(), sampling="shared", sample_count=16)))
    bonds = bond_sweep(sweep_tasks)
    forced = forced_sweep(sweep_tasks)
    speed = throughput(n_memory, n_sqlite)
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_plot(headline, RESULTS / "game_simulation.png")
    plot_sweeps(bonds, forced, RESULTS / "game_economics.png")
    solver_cols = [k for k in bonds[0] if k.startswith("solver ")]
    verifier_cols = [k for k in forced[0] if k.startswith(("verifier", "whistle"))]
    table = "\n\n".join([
        "## Headline (default parameters)\n\n" + render_markdown(headline),
        "## Shared committee sample (16 segments split among the 3 verifiers; otherwise the headline's parameters)"
        "\n\n" + render_markdown(shared),
        "## Expected profit per task vs solver bond (default population, "
        f"{sweep_tasks} tasks each)\n\n" + markdown_table(bonds, ["solver_bond", *solver_cols]),
        "## Expected profit per task vs forced-error rate (no cheating solver, "
        f"{sweep_tasks} tasks each)\n\n" + markdown_table(forced, ["forced_error_bps", *verifier_cols]),
        "## Ledger throughput\n\n" + markdown_table(speed, ["backend", "synchronous", "ops", "seconds",
                                                            "ops_per_s", "retry_us"]),
        "![simulation](game_simulation.png)\n\n![sweeps](game_economics.png)",
    ])
    payload = {"headline": dataclasses.asdict(headline), "shared": dataclasses.asdict(shared), "bond_sweep": bonds, "forced_sweep": forced,
               "throughput": speed, "wall_seconds": round(time.perf_counter() - start, 1),
               "quick": args.quick}
    write_results("game_economics", payload, table)


if __name__ == "__main__":
    main()
