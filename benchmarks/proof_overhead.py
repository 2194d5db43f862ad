"""What does proving cost? The same training as a plain torch loop and as `pol train`, at several k.

    python benchmarks/proof_overhead.py            # ~10M-parameter MLP and the character transformer
    python benchmarks/proof_overhead.py --quick    # smaller, for a smoke run

For each model it reports medians over interleaved rounds: the plain loop's time, pol's engine alone (no proof),
`pol train` at each k (the default k marked); the overhead against the plain loop as the median over rounds of each
round's own ratio (runs side by side in time share the machine's drift), and as the ratio of the best rounds (noise
only ever adds time), and in CPU seconds (all threads, user and system: the work proving adds, which other tenants
of the machine cannot inflate; with training on every core it bounds the wall-time overhead from above); the
overhead against the engine alone (the proof's own cost, paired the same way), bytes per checkpoint and in total, the hashing throughput of the state digest, and how far
the plain loop's own time spread between rounds (this machine's noise floor). The plain loop is what a user would write: the same
model, data and batch order, torch.optim.AdamW (foreach kernels), no checkpoints.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import markdown_table, write_results
from pol.data import batch_indices
from pol.digest import state_digest
from pol.engine import build_runtime, compute_default_every, initial_state, resolve_spec, run_steps
from pol.prove import train_and_prove
from pol.spec import spec_from_dict


def plain_loop(spec) -> float:
    """A user's ordinary loop: same model, data and order; torch.optim.AdamW; torch's own dropout RNG."""
    start = time.perf_counter()  # like pol train, the plain loop builds its model and data inside the timer
    rt = build_runtime(spec)
    initial_state(rt)
    for m in rt.dropouts:
        m.mask_source = lambda shape, p=m.p: torch.bernoulli(torch.full(shape, 1 - p)) / (1 - p)
    opt = torch.optim.AdamW(rt.model.parameters(), lr=spec.optimizer.lr, weight_decay=spec.optimizer.weight_decay)
    n = len(rt.dataset)
    for s in range(spec.steps):
        batch = rt.dataset.batch(batch_indices(spec.seed, n, spec.batch_size, s))
        out = rt.model(batch["x"])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), batch["y"].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time used so far by this process, all threads (training, torch's pool, the checkpoint writer, blake3's
    pool), user and system: unlike wall time, it does not count time the machine gave to someone else."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hashing_throughput(spec) -> float:
    rt = build_runtime(spec)
    rt.spec = resolve_spec(spec, rt.dataset)
    state = initial_state(rt)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    state_digest(state)
    start = time.perf_counter()
    for _ in range(3):
        state_digest(state)
    return 3 * nbytes / (time.perf_counter() - start) / 1e9


def engine_only(spec) -> float:
    """pol's own training engine (same steps as pol train) with no checkpoints, hashing or bundle."""
    start = time.perf_counter()
    rt = build_runtime(spec)
    initial_state(rt)
    run_steps(rt, spec.steps)
    return time.perf_counter() - start


def measure(label: str, fields: dict, ks: list[int], repeats: int) -> list[dict]:
    """Median times over `repeats` interleaved rounds (plain loop, engine alone, pol train at each k): this
    machine's speed drifts by tens of percent between runs, and interleaving makes the drift hit all alike."""
    rows = []
    spec = spec_from_dict(fields)
    params = sum(p.numel() for p in build_runtime(spec).model.parameters())
    gbps = hashing_throughput(spec)
    default_k = compute_default_every(spec)
    all_k = sorted({default_k, *ks})
    warm = spec.replace(steps=5, every=5)  # one-time costs (thread pools, allocator, lazy imports) outside the rounds
    plain_loop(warm)
    engine_only(warm)
    plain, engine, proved, sizes = [], [], {k: [] for k in all_k}, {}
    cpu_plain, cpu_proved = [], {k: [] for k in all_k}
    for _ in range(repeats):
        cpu = cpu_seconds()
        plain.append(plain_loop(spec))
        cpu_plain.append(cpu_seconds() - cpu)
        engine.append(engine_only(spec))
        for k in all_k:
            tmp = Path(tempfile.mkdtemp(prefix="pol-bench-"))
            start, cpu = time.perf_counter(), cpu_seconds()
            result = train_and_prove(spec.replace(every=k), tmp / "b")
            proved[k].append(time.perf_counter() - start)
            cpu_proved[k].append(cpu_seconds() - cpu)
            sizes[k] = [e.size for e in result.manifest.files.values()]
            shutil.rmtree(tmp)
    plain_s, engine_s = statistics.median(plain), statistics.median(engine)
    for k in all_k:
        pol_s = statistics.median(proved[k])
        rows.append({
            "model": label, "params": params, "steps": spec.steps, "k": f"{k} (default)" if k == default_k else k,
            "plain_s": plain_s, "engine_s": engine_s, "pol_train_s": pol_s,
            "overhead_pct": 100 * (statistics.median(p / q for p, q in zip(proved[k], plain, strict=True)) - 1),
            "proof_only_pct": 100 * (statistics.median(p / q for p, q in zip(proved[k], engine, strict=True)) - 1),
            "overhead_best_pct": 100 * (min(proved[k]) / min(plain) - 1),
            "cpu_overhead_pct": 100 * (statistics.median(p / q for p, q in zip(cpu_proved[k], cpu_plain, strict=True)) - 1),
            "mb_per_checkpoint": max(sizes[k]) / 1e6, "mb_total": sum(sizes[k]) / 1e6, "hash_gb_per_s": gbps,
            "spread_plain_pct": 100 * (max(plain) / min(plain) - 1),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and few steps (smoke run)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated: mlp, transformer")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        mlp = {"model": {"name": "mlp", "kwargs": {"hidden": 256}}, "steps": 40}
        gpt = {"model": "transformer", "steps": 40}
        ks = [10, 40]
    else:
        mlp = {"model": {"name": "mlp", "kwargs": {"hidden": 2240, "depth": 3}}, "steps": 200}
        gpt = {"model": "transformer", "steps": 300}
        ks = [10, 100]
    models = {"mlp": mlp, "transformer": gpt}
    rows = [row for name in args.models.split(",") for row in measure(name, models[name], ks, args.repeats)]
    columns = ["model", "params", "steps", "k", "plain_s", "engine_s", "pol_train_s", "overhead_pct", "overhead_best_pct", "cpu_overhead_pct", "proof_only_pct",
               "mb_per_checkpoint", "mb_total", "hash_gb_per_s", "spread_plain_pct"]
    write_results("proof_overhead", {"rows": rows, "quick": args.quick}, markdown_table(rows, columns))


if __name__ == "__main__":
    main()
