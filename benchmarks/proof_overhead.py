"""What does proving cost? The same training as a plain torch loop and as `pol train`, at several k.

    python benchmarks/proof_overhead.py            # ~10M-parameter MLP and the character transformer
    python benchmarks/proof_overhead.py --quick    # smaller, for a smoke run
    python benchmarks/proof_overhead.py --user-loop [--quick]   # only the user-loop comparison below

For each model it reports medians over interleaved rounds: the plain loop's time, pol's engine alone (no proof),
`pol train` at each k (the default k marked); the overhead against the plain loop as the median over rounds of each
round's own ratio (runs side by side in time share the machine's drift), and as the ratio of the best rounds (noise
only ever adds time), and in CPU seconds (all threads, user and system: the work proving adds, which other tenants
of the machine cannot inflate; with training on every core it bounds the wall-time overhead from above); the
overhead against the engine alone (the proof's own cost, paired the same way), bytes per checkpoint and in total, the hashing throughput of the state digest, and how far
the plain loop's own time spread between rounds (this machine's noise floor). The plain loop is what a user would write: the same
model, data and batch order, torch.optim.AdamW (foreach kernels), no checkpoints.

The user-loop comparison (`proof_overhead_user_loop.{json,md}`) is a job as people write it: torch.optim.AdamW by
name, a CosineAnnealingLR scheduler, clip_grad_norm, EMA weights and a certified evaluation (loss and accuracy on
held-out data) at every checkpoint, against the same loop in plain PyTorch (the same evaluation at the same steps).
The evaluation's time is reported separately on both sides (pol's: time inside `pol.evaluate.Evaluator`).
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

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import markdown_table, write_results
from pol.data import batch_indices, build_dataset
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


def user_loop_fields(hidden: int, steps: int, every: int | None, depth: int | None = None) -> dict:
    """The user-loop job's fields; `every` None: pol's default k for it (`compute_default_every`)."""
    model_kwargs = {"hidden": hidden, **({"depth": depth} if depth else {})}
    return {"model": {"name": "mlp", "kwargs": model_kwargs}, "data": {"name": "synthetic", "kwargs": {"n": 4096}},
            "steps": steps, **({"every": every} if every else {}), "batch_size": 64,
            "optimizer": {"name": "AdamW", "lr": 1e-3, "kwargs": {"weight_decay": 0.01}, "clip_grad_norm": 1.0, "ema": 0.999,
                          "scheduler": {"name": "CosineAnnealingLR", "kwargs": {"T_max": steps}}},
            "evaluation": {"data": {"name": "synthetic", "kwargs": {"seed": 1, "n": 2048}}, "metrics": ["loss", "accuracy"],
                           "batch_size": 256}}


def plain_user_loop(spec) -> tuple[float, float]:
    """The same job in plain PyTorch: AdamW, CosineAnnealingLR, clip_grad_norm_, an EMA copy of the parameters, and
    loss and accuracy on the held-out data at every checkpoint step. Returns (total seconds, evaluation seconds)."""
    start = time.perf_counter()
    rt = build_runtime(spec)
    initial_state(rt)
    model, opt_spec, ev = rt.model, spec.optimizer, spec.evaluation
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=opt_spec.lr, **dict(opt_spec.kwargs))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, **dict(opt_spec.scheduler.kwargs))
    ema = [p.detach().clone() for p in params]
    held = build_dataset(ev.data.name, ev.data.kwargs)
    n, eval_s = len(rt.dataset), 0.0

    def evaluate_now() -> None:
        nonlocal eval_s
        t = time.perf_counter()
        model.eval()
        loss_sum, hits, rows = 0.0, 0, 0
        with torch.no_grad():
            for i in range(0, len(held), ev.batch_size):
                b = held.batch(np.arange(i, min(i + ev.batch_size, len(held))))
                out = model(b["x"])
                loss_sum += float(F.cross_entropy(out, b["y"])) * len(b["y"])
                hits += int((out.argmax(-1) == b["y"]).sum())
                rows += len(b["y"])
        model.train()
        eval_s += time.perf_counter() - t

    evaluate_now()
    for s in range(spec.steps):
        batch = rt.dataset.batch(batch_indices(spec.seed, n, spec.batch_size, s))
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt_spec.clip_grad_norm)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - opt_spec.ema)
        float(loss.detach())
        if (s + 1) % spec.every == 0 or s + 1 == spec.steps:
            evaluate_now()
    return time.perf_counter() - start, eval_s


def measure_user_loop(label: str, fields: dict, repeats: int) -> list[dict]:
    """Interleaved rounds of the plain user loop and `pol train` on the same job; pol's evaluation time is summed
    inside `Evaluator.__call__`."""
    import pol.evaluate as evaluate_module
    from pol.engine import build_spec

    spec = build_spec(fields)  # without `every`: pol's default k, as `pol train` sizes it
    spent = [0.0]
    original = evaluate_module.Evaluator.__call__

    def timed(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    evaluate_module.Evaluator.__call__ = timed  # type: ignore[method-assign]
    try:
        plain_user_loop(spec.replace(steps=5, every=5))  # warm-up outside the rounds
        plain, plain_eval, proved, proved_eval = [], [], [], []
        for _ in range(repeats):
            total, ev = plain_user_loop(spec)
            plain.append(total)
            plain_eval.append(ev)
            tmp = Path(tempfile.mkdtemp(prefix="pol-bench-"))
            spent[0] = 0.0
            start = time.perf_counter()
            train_and_prove(spec, tmp / "b")
            proved.append(time.perf_counter() - start)
            proved_eval.append(spent[0])
            shutil.rmtree(tmp)
    finally:
        evaluate_module.Evaluator.__call__ = original  # type: ignore[method-assign]
    params = sum(p.numel() for p in build_runtime(spec).model.parameters())
    row = {
        "job": label, "params": params, "steps": spec.steps, "k": spec.every, "evaluations": len(spec.checkpoint_steps),
        "eval_rows": len(build_dataset(spec.evaluation.data.name, spec.evaluation.data.kwargs)),
        "plain_s": statistics.median(plain), "plain_eval_s": statistics.median(plain_eval),
        "pol_train_s": statistics.median(proved), "pol_eval_s": statistics.median(proved_eval),
        "overhead_pct": 100 * (statistics.median(p / q for p, q in zip(proved, plain, strict=True)) - 1),
        "pol_eval_share_pct": 100 * statistics.median(e / p for e, p in zip(proved_eval, proved, strict=True)),
        "plain_eval_share_pct": 100 * statistics.median(e / p for e, p in zip(plain_eval, plain, strict=True)),
        "spread_plain_pct": 100 * (max(plain) / min(plain) - 1),
    }
    print(row, flush=True)
    return [row]


USER_COLUMNS = ["job", "params", "steps", "k", "evaluations", "eval_rows", "plain_s", "plain_eval_s", "pol_train_s", "pol_eval_s",
                "overhead_pct", "pol_eval_share_pct", "plain_eval_share_pct", "spread_plain_pct"]


def run_user_loop(quick: bool, repeats: int) -> None:
    label = "mlp: AdamW + cosine + clip + EMA + eval"
    if quick:
        rows = measure_user_loop(label, user_loop_fields(256, 60, 10), repeats)
    else:  # at the default k: the main table's 10M-parameter MLP, and a 1M one whose steps are 10x cheaper per state byte
        rows = measure_user_loop(f"{label} (10M, default k)", user_loop_fields(2240, 200, None, depth=3), repeats)
        rows += measure_user_loop(f"{label} (1M, default k)", user_loop_fields(1024, 300, None), repeats)
    write_results("proof_overhead_user_loop", {"rows": rows, "quick": quick}, markdown_table(rows, USER_COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and few steps (smoke run)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated: mlp, transformer")
    parser.add_argument("--user-loop", action="store_true", help="only the user-loop comparison (AdamW, scheduler, "
                        "clipping, EMA, evaluation at every checkpoint)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.user_loop:
        run_user_loop(args.quick, args.repeats)
        return
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
    run_user_loop(args.quick, args.repeats)


if __name__ == "__main__":
    main()
