"""What does a pinpoint dispute cost, against re-executing the disputed segment and the whole training?

For each built-in model (its default spec, as `pol train --model M` runs it), train a bundle whose computation
corrupts one operator at one step (drawn from a seed), then run the dispute between that solver and an honest
challenger, in one process, and record: rounds, messages and bytes exchanged; the referee's work (FLOPs and
seconds, and the worst case over every node of the step); both parties' work (training steps computed, seconds);
and the FLOPs and seconds of re-executing the disputed segment and the whole training.

FLOPs come from the capture's per-operator estimate (2*M*N*K for products, see pinpoint.capture.compute_flops).
A matrix product is ruled on one pointed-at output element (one K-long dot product); any other operator is
executed whole. Target: the referee's worst case is bounded by the largest operator of one step and is below
1e-5 of the training's FLOPs for the character-transformer demo run (200 steps).

    python benchmarks/dispute_cost.py [--models mlp cnn transformer] [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import markdown_table, write_results
from pinpoint.capture import Fault, capture_step_from_state, get_fault_candidates
from pinpoint.parties import Behaviour, Challenger, Solver, train_with_fault
from pinpoint.protocol import max_rounds
from pinpoint.referee import compute_referee_cost
from pinpoint.runner import run_dispute
from pol.bundle import open_bundle
from pol.digest import state_digest
from pol.engine import build_runtime, capture_state, initial_state, resolve_spec, restore_state, run_steps
from pol.spec import spec_from_dict

COLUMNS = [
    "model", "steps", "k", "nodes", "fault", "rounds", "round_bound", "messages", "bytes", "referee_op",
    "referee_flops", "referee_s", "referee_worst_flops", "largest_op_flops", "worst_vs_training", "referee_vs_training",
    "referee_vs_segment", "solver_steps", "solver_s", "challenger_steps", "challenger_s", "segment_s", "training_s",
]


def measure(model: str, steps: int | None, seed: int, workdir: Path) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": model} | ({"steps": steps} if steps else {})
    spec = spec_from_dict(fields)
    rt = build_runtime(spec)
    spec = rt.spec = resolve_spec(spec, rt.dataset)
    graph = capture_step_from_state(spec, initial_state(rt), runtime=rt)  # the same program runs every step
    step_flops = sum(n.flops for n in graph.nodes)
    rng = random.Random(f"{model}/{seed}")
    candidates = get_fault_candidates(graph)
    for attempt in range(10):
        fault = Fault(rng.randrange(spec.steps), rng.choice(candidates), rng.randrange(1 << 20))
        started = time.perf_counter()
        path = train_with_fault(spec, workdir / f"{model}-{attempt}", fault)
        training_s = time.perf_counter() - started
        bundle = open_bundle(path)
        segment = next(i for i, r in enumerate(bundle.records) if r.step > fault.step) - 1
        start, end = bundle.records[segment], bundle.records[segment + 1]
        replay = build_runtime(spec)
        restore_state(replay, bundle.load_state(start.step))
        started = time.perf_counter()
        run_steps(replay, end.step)
        segment_s = time.perf_counter() - started
        if state_digest(capture_state(replay)) != end.state:
            break  # the corruption reached the commitment: there is something to dispute
    else:
        raise SystemExit(f"{model}: no drawn fault changed the commitment")
    solver, challenger = Solver(bundle, Behaviour(fault=fault)), Challenger(bundle, segment)
    result = run_dispute(bundle, segment, solver_party=solver, challenger_party=challenger)
    assert result.outcome.loser == "solver" and (result.step, result.node) == (fault.step, fault.node), result.outcome
    k = end.step - start.step
    training_flops = step_flops * spec.steps
    worst = max(compute_referee_cost(n) for n in graph.nodes)
    return {
        "model": model, "steps": spec.steps, "k": k, "nodes": graph.n,
        "fault": f"step {fault.step} node {fault.node} {graph.nodes[fault.node].op.removeprefix('aten.')}",
        "rounds": result.rounds, "round_bound": max_rounds(k, graph.n), "messages": result.messages, "bytes": result.bytes,
        "referee_op": result.op, "referee_executed": result.referee_executed, "referee_flops": result.referee_flops,
        "referee_s": result.referee_seconds, "referee_worst_flops": worst,
        "largest_op_flops": max(n.flops for n in graph.nodes), "step_flops": step_flops,
        "segment_flops": step_flops * k, "training_flops": training_flops,
        "worst_vs_training": worst / training_flops, "referee_vs_training": result.referee_flops / training_flops,
        "referee_vs_segment": result.referee_flops / (step_flops * k),
        "solver_steps": solver.replayer.steps_run, "solver_s": result.solver_seconds,
        "challenger_steps": challenger.replayer.steps_run, "challenger_s": result.challenger_seconds,
        "segment_s": segment_s, "training_s": training_s, "ruling": result.outcome.reason,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--steps", type=int, default=None, help="override the default specs' 200 steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dispute-cost-") as tmp:
        rows = [measure(m, args.steps, args.seed, Path(tmp)) for m in args.models]
    transformer = next((r for r in rows if r["model"] == "transformer"), None)
    target = None
    if transformer is not None:
        target = {
            "referee_worst_vs_training": transformer["worst_vs_training"],
            "below_1e-5": transformer["worst_vs_training"] < 1e-5,
            "bounded_by_largest_op": transformer["referee_worst_flops"] <= transformer["largest_op_flops"],
        }
    table = markdown_table(rows, COLUMNS)
    if target is not None:
        table += (f"\n\nTarget (transformer demo, {transformer['steps']} steps): worst-case referee work "
                  f"{transformer['referee_worst_flops']} FLOPs = {target['referee_worst_vs_training']:.2e} of the training's "
                  f"{transformer['training_flops']:.3g} FLOPs ({'met' if target['below_1e-5'] else 'NOT met'}: < 1e-5; "
                  f"bounded by the largest operator of one step: {target['bounded_by_largest_op']}).")
    write_results("dispute_cost", {"rows": rows, "target": target, "seed": args.seed}, table)


if __name__ == "__main__":
    main()
