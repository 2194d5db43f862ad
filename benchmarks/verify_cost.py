"""How much replay does it take to catch a cheater, and does the theory hold on real cheating bundles?

    python benchmarks/verify_cost.py             # n = 200 segments, 24 cheating bundles per fraction
    python benchmarks/verify_cost.py --quick     # smaller smoke run

A cheater who skipped a fraction f of segments (copied the start state as the end state, then trained honestly
from there on) is verified with s uniform samples. Theory: it escapes with probability C(n-b, s) / C(n, s), b =
ceil(f n). For each f the script reports the samples and replay cost (as a fraction of training) needed for 99.9%
detection at n = 200 (measured) and n = 1000 (theory), the detection rate measured over real bundles at that s,
and full re-execution as the baseline. It writes JSON, a markdown table and a PNG of detection probability
against verification cost: measured points over the theoretical curves.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, markdown_table, write_results
from pol import rng
from pol.bundle import write_bundle
from pol.engine import build_runtime, capture_state, initial_state, resolve_spec, restore_state, run_steps
from pol.spec import spec_from_dict
from pol.trace import EMPTY_DATA
from pol.verify import (
    choose_segments,
    compute_escape_probability,
    compute_required_samples,
    derive_randomness,
    verify,
)

FRACTIONS = (0.01, 0.05, 0.1, 0.25)
CONFIDENCE = 0.999


def cheating_bundle(spec, faked: set[int], out: Path, honest_data: dict[int, str]) -> Path:
    """Train `spec` but skip the segments in `faked` (end state := start state), claiming the committed data and,
    for the real segments, their real losses (the loss of a faked segment is claimed as the last real one)."""
    rt = build_runtime(spec)

    def checkpoints():
        yield 0, initial_state(rt), EMPTY_DATA, None
        loss = None
        for i, step in enumerate(spec.checkpoint_steps[1:], start=1):
            if i in faked:
                frozen = capture_state(rt)
                frozen["meta/step"] = torch.tensor(step, dtype=torch.int64)
                restore_state(rt, frozen)
            else:
                loss = run_steps(rt, step).loss
            yield step, capture_state(rt), honest_data[step], loss if loss is not None else 2.3

    write_bundle(out, spec, checkpoints(), {})
    return out


def honest_data_digests(spec) -> dict[int, str]:
    rt = build_runtime(spec)
    initial_state(rt)
    return {step: run_steps(rt, step).data_digest for step in spec.checkpoint_steps[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--segments", type=int, default=200)
    parser.add_argument("--bundles", type=int, default=24, help="cheating bundles per fraction")
    parser.add_argument("--draws", type=int, default=50, help="independent verifier samples per bundle")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and immune to other processes' load
    n, bundles, draws = (60, 6, 20) if args.quick else (args.segments, args.bundles, args.draws)
    fields = {"model": {"name": "mlp", "kwargs": {"hidden": 16}}, "data": {"name": "synthetic", "kwargs": {"n": 512}},
              "steps": n, "every": 1, "batch_size": 16}
    spec = spec_from_dict(fields)
    spec = resolve_spec(spec, build_runtime(spec).dataset)
    data = honest_data_digests(spec)
    started = time.perf_counter()
    rows, points = [], []
    with tempfile.TemporaryDirectory(prefix="pol-verify-cost-") as tmp:
        for f in FRACTIONS:
            b = max(1, math.ceil(f * n))
            need = compute_required_samples(n, CONFIDENCE, f)
            grid = sorted({1, 2, 4, 8, 16, 32, need, min(n, 2 * need)} - {0})
            caught = {s: 0 for s in grid}
            trials = 0
            for j in range(bundles):
                order = rng.permutation(j, f"bench/faked/{f}", [], n)
                faked = {int(i) + 1 for i in order[:b]}
                path = cheating_bundle(spec, faked, Path(tmp) / f"f{f}-{j}", data)
                # Replay every segment once for real; a sample is caught iff it holds a failing segment. This is
                # what verify() decides segment by segment, at a fraction of the cost of one verify() per sample.
                full = verify(path, segments=range(1, n + 1), seed=j)
                failing = {c.index for c in full.checks if not c.ok}
                assert failing == faked, (sorted(failing), sorted(faked))
                for d in range(draws):
                    trials += 1
                    randomness, _ = derive_randomness(seed=10_000 * j + d)
                    for s in grid:
                        sample = {i for i, _ in choose_segments(n, randomness, full.root, s, 0, None)}
                        caught[s] += bool(sample & failing)
                spot = verify(path, samples=need, largest=0, seed=10_000 * j)  # one real end-to-end verify() per bundle
                expected = {i for i, _ in choose_segments(n, derive_randomness(seed=10_000 * j)[0], full.root, need, 0, None)}
                assert (spot.verdict == "reject") == bool(expected & failing)
            for s in grid:
                points.append({"f": f, "samples": s, "cost": s / n, "measured": caught[s] / trials,
                               "theory": 1 - compute_escape_probability(n, s, f), "trials": trials})
            need_1000 = compute_required_samples(1000, CONFIDENCE, f)
            rows.append({
                "cheat_fraction": f, "n": n, "samples_for_0.999": need, "replay_cost": need / n,
                "measured_detection": caught[need] / trials, "trials": trials,
                "theory_detection": 1 - compute_escape_probability(n, need, f),
                "samples_n1000": need_1000, "replay_cost_n1000": need_1000 / 1000, "full_reexecution_cost": 1.0,
            })
            print(rows[-1], flush=True)
    plot(points, n)
    columns = ["cheat_fraction", "n", "samples_for_0.999", "replay_cost", "measured_detection", "theory_detection", "trials",
               "samples_n1000", "replay_cost_n1000", "full_reexecution_cost"]
    note = ("\n\nReplay cost counts replayed steps only; native numerics adds one calibration segment per verification "
            "(exact numerics none). Full re-execution replays every step (cost 1.0) and catches any f > 0.")
    write_results("verify_cost", {"rows": rows, "points": points, "seconds": time.perf_counter() - started},
                  markdown_table(rows, columns) + note)


def plot(points: list[dict], n: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in FRACTIONS:
        xs = [s / n for s in range(1, n + 1)]
        ax.plot(xs, [1 - compute_escape_probability(n, s, f) for s in range(1, n + 1)], label=f"theory f={f}")
        pts = [p for p in points if p["f"] == f]
        ax.scatter([p["cost"] for p in pts], [p["measured"] for p in pts], marker="o", s=18)
    ax.axhline(CONFIDENCE, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"verification cost (fraction of training replayed, n = {n} segments)")
    ax.set_ylabel("probability the cheater is caught")
    ax.set_title("Detection vs cost: theory (lines) and real cheating bundles (dots)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "verify_cost.png", dpi=120)


if __name__ == "__main__":
    main()
