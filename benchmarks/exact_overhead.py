"""How much does exact numerics cost? Exact vs native time, measured in one run, as ratios:

1. matrix products of several sizes (`exact_mm`, int8 limb GEMMs) against a native float32 GEMM;
2. a whole training step (forward, backward, optimizer) of the built-in models through the trainer's engine: small
   configs, the character transformer as `pol train --model transformer` builds it (the issue's 3x target), and a
   larger one where the GEMMs carry more of the time. Native and exact steps run interleaved (this machine's speed
   drifts), with the compiled kernels (pol/exact/native.py) and on the torch path alone; the table gives the best
   of each and the median of the per-round exact/native ratios;
3. where the exact step's time goes (per operator family, timed at the dispatch mode);
4. what split-independent micro-batching would add: an exact sum over the batch of per-sample gradients, and the
   int8 slice pairs that products keeping every float32 term (so independent of the split) would need, measured on
   the operands of one exact step of the transformer and the MLP (matrix products; the CNN's convolutions are not
   counted).

    python benchmarks/exact_overhead.py [--repeats 5] [--threads N]

Writes benchmarks/results/exact_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, write_results
from pol.engine import build_runtime, initial_state, run_steps
from pol.exact import exact_mm, exact_sum, native
from pol.exact import mode as exact_mode_module
from pol.spec import spec_from_dict

MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"model": {"name": "mlp", "kwargs": {"hidden": 32}}, "data": {"name": "synthetic", "kwargs": {"n": 512}}},
    "cnn": {"model": {"name": "cnn", "kwargs": {"width": 4}}, "data": {"name": "images", "kwargs": {"n": 256}}},
    "transformer": {"model": "transformer"},  # the built-in defaults: what `pol train --model transformer` runs
    "transformer-small": {
        "model": {"name": "transformer", "kwargs": {"n_layer": 1, "n_embd": 32, "block_size": 16}},
        "data": {"name": "chars", "kwargs": {"length": 8192, "block_size": 16}},
    },
    "transformer-256": {
        "model": {"name": "transformer", "kwargs": {"n_layer": 2, "n_embd": 256, "block_size": 64}},
        "data": {"name": "chars", "kwargs": {"length": 32768, "block_size": 64}},
    },
}

FAMILIES = {
    "products": ("mm", "addmm", "bmm", "convolution"),
    "reductions": ("sum", "mean", "var", "std", "index_put", "embedding_dense_backward", "nll_loss", "scatter_add"),
    "norm/softmax/loss (decomposed)": ("native_layer_norm", "_softmax", "_log_softmax", "mse_loss"),
    "transcendentals": ("gelu", "exp", "log", "tanh", "erf", "sigmoid", "rsqrt", "pow"),
    "pooling": ("pool",),
}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def limb_gemms(n: int) -> Callable[[], None]:
    """The exact product's int8 GEMMs alone (5 `_int_mm` calls covering the 13 limb pairs), on random digits."""
    left = torch.randint(-64, 65, (n, 4 * n), dtype=torch.int8)
    right = torch.randint(-64, 65, (4 * n, n), dtype=torch.int8)
    diag = torch.empty((5, n, n), dtype=torch.int32)

    def run() -> None:
        for d in range(5):
            lo, hi = max(0, d - 3), min(d, 3)
            torch._int_mm(left[:, lo * n : (hi + 1) * n], right[(3 - d + lo) * n : (4 - d + hi) * n], out=diag[d])

    return run


def bench_products(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t_native = median_time(lambda a=a, b=b: a @ b, repeats)
        t_exact = median_time(lambda a=a, b=b: exact_mm(a, b), repeats)
        t_limbs = median_time(limb_gemms(n), repeats)
        rows.append(
            {
                "what": f"mm {n}x{n}x{n}",
                "native_ms": t_native * 1e3,
                "exact_ms": t_exact * 1e3,
                "ratio": t_exact / t_native,
                "limb_gemms_ms": t_limbs * 1e3,
                "limb_gemms_ratio": t_limbs / t_native,
            }
        )
    return rows


def _runtime(model: str, numerics: str, batch: int):  # type: ignore[no-untyped-def]
    spec = spec_from_dict({**MODELS[model], "steps": 1000, "every": 1000, "batch_size": batch, "numerics": numerics})
    rt = build_runtime(spec)
    initial_state(rt)
    run_steps(rt, 1)  # warm-up
    return rt


def _one_step(rt) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    run_steps(rt, rt.step + 1)
    return time.perf_counter() - start


class PassThrough(TorchDispatchMode):
    """A dispatch mode that runs every operator natively: what routing alone costs, before any exact arithmetic."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def step_times(model: str, batch: int, rounds: int, torch_path: bool) -> dict[str, Any]:
    """Native, exact, native under a pass-through dispatch mode (and exact on the torch path) steps interleaved
    round by round: best times and the median of the per-round ratios (rounds share the machine's drift)."""
    rts = {"native": _runtime(model, "native", batch), "exact": _runtime(model, "exact", batch)}
    rts["dispatch"] = _runtime(model, "native", batch)
    if torch_path:
        with native.disabled():
            rts["exact_torch"] = _runtime(model, "exact", batch)
    times: dict[str, list[float]] = {k: [] for k in rts}
    for _ in range(rounds):
        for k, rt in rts.items():
            if k == "exact_torch":
                with native.disabled():
                    times[k].append(_one_step(rt))
            elif k == "dispatch":
                with PassThrough():
                    times[k].append(_one_step(rt))
            else:
                times[k].append(_one_step(rt))
    row: dict[str, Any] = {"what": f"train step {model} (batch {batch})"}
    for k, ts in times.items():
        row[f"{k}_ms"] = min(ts) * 1e3
    row["ratio"] = min(times["exact"]) / min(times["native"])
    row["paired_ratio"] = statistics.median(e / n for e, n in zip(times["exact"], times["native"], strict=True))
    row["dispatch_ratio"] = min(times["dispatch"]) / min(times["native"])
    if torch_path:
        row["torch_path_ratio"] = min(times["exact_torch"]) / min(times["native"])
    return row


def family(op: str) -> str:
    name = op.split(".")[1] if op.startswith("aten.") else op
    for fam, keys in FAMILIES.items():
        if any(name.startswith(k) or k in name for k in keys):
            return fam
    return "other routed ops (data movement, + - * / sqrt)"


def profile_operators(rt, steps: int, fastest: bool = False) -> tuple[dict[str, tuple[float, int]], float]:  # type: ignore[no-untyped-def]
    """Run `steps` exact steps of `rt`, timing each outermost operator the dispatch mode routes (its handler, with
    whatever it dispatches again). Returns {operator: (seconds per step, calls per step)} and seconds per step: the
    mean over the steps, or with `fastest` the fastest step's own (on a shared machine, the least disturbed one)."""
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    original = exact_mode_module.ExactMode.__torch_dispatch__
    depth = [0]

    def timed(mode, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        depth[0] += 1
        start = time.perf_counter()
        try:
            return original(mode, func, types, args, kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                spent[str(func)] += time.perf_counter() - start
                calls[str(func)] += 1

    runs: list[tuple[float, dict[str, tuple[float, int]]]] = []
    exact_mode_module.ExactMode.__torch_dispatch__ = timed  # type: ignore[method-assign]
    try:
        for _ in range(steps if fastest else 1):
            spent.clear()
            calls.clear()
            n = 1 if fastest else steps
            start = time.perf_counter()
            run_steps(rt, rt.step + n)
            total = time.perf_counter() - start
            runs.append((total / n, {op: (t / n, calls[op] // n) for op, t in spent.items()}))
    finally:
        exact_mode_module.ExactMode.__torch_dispatch__ = original  # type: ignore[method-assign]
    total, per_op = min(runs, key=lambda r: r[0])
    return per_op, total


def profile_step(model: str, batch: int, steps: int) -> dict[str, float]:
    """Seconds per exact step by operator family (outermost dispatched operator only), plus the remainder."""
    per_op, total = profile_operators(_runtime(model, "exact", batch), steps)
    out: dict[str, float] = defaultdict(float)
    for op, (seconds, _) in per_op.items():
        out[family(op)] += seconds
    out["outside the mode (python, autograd, data)"] = total - sum(out.values())
    return dict(out)


def split_independence_cost(batch: int, params: int, repeats: int) -> dict[str, float]:
    """Time to sum `batch` per-sample gradients of `params` entries exactly (what a split-independent definition
    'per-sample gradients, each rounded once, summed exactly' adds per step), against a native sum."""
    g = torch.randn(batch, params)
    return {
        "batch": batch,
        "params": params,
        "exact_sum_ms": median_time(lambda: exact_sum(g, [0]), repeats) * 1e3,
        "native_sum_ms": median_time(lambda: g.sum(0), repeats) * 1e3,
    }


def _slices_needed(x: torch.Tensor, dim: int) -> int:
    """int8 slices of 7 bits that hold every float32 of x exactly on a grid shared along `dim`: the widest slice
    (row or column) spans its exponent range plus the 24 significand bits."""
    nz = (x != 0) & torch.isfinite(x)
    e = torch.frexp(torch.where(nz, x, torch.ones_like(x)))[1].to(torch.int64)
    hi = torch.where(nz, e, torch.full_like(e, -(1 << 20))).amax(dim=dim)
    lo = torch.where(nz, e, torch.full_like(e, 1 << 20)).amin(dim=dim)
    span = int(torch.where(hi >= lo, hi - lo, torch.zeros_like(hi)).max()) if hi.numel() else 0
    return -(-(span + 24) // 7)


def split_independent_products(model: str, batch: int) -> dict[str, Any]:
    """What exact, split-independent products would cost, measured on the operands of one exact training step.

    The definition quantises each row to 28 bits under the row's own maximum over the reduction dim; for a weight
    gradient that dim is the batch, so the bits depend on which rows share a micro-batch. A product that keeps every
    float32 term exactly and rounds the sum once does not depend on the split at all, but each operand then needs
    as many 7-bit int8 slices as its widest row spans (exponent range + 24 bits), and every slice pair: per product
    the pairs against the 13 kept now, weighted by the product's multiply-adds."""
    rt = _runtime(model, "exact", batch)
    seen: list[dict[str, Any]] = []
    original = exact_mode_module.ExactMode.__torch_dispatch__
    depth = [0]

    def record(mode, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func).split(".")[1]
        if depth[0] == 0 and name in ("mm", "addmm", "bmm"):
            a, b = args[1:3] if name == "addmm" else args[:2]
            sa, sb = _slices_needed(a, -1), _slices_needed(b, -2)
            macs = a.numel() * b.shape[-1]
            seen.append({"op": name, "k": a.shape[-1], "slices_a": sa, "slices_b": sb, "pairs": sa * sb, "macs": macs})
        depth[0] += 1
        try:
            return original(mode, func, types, args, kwargs)
        finally:
            depth[0] -= 1

    exact_mode_module.ExactMode.__torch_dispatch__ = record  # type: ignore[method-assign]
    try:
        run_steps(rt, rt.step + 1)
    finally:
        exact_mode_module.ExactMode.__torch_dispatch__ = original  # type: ignore[method-assign]
    total = sum(r["macs"] for r in seen)
    pairs = sorted(r["pairs"] for r in seen)
    return {
        "model": model,
        "products": len(seen),
        "min_pairs": pairs[0],
        "median_pairs": pairs[len(pairs) // 2],
        "max_pairs": pairs[-1],
        "limb_gemm_cost_vs_now": sum(r["pairs"] * r["macs"] for r in seen) / (13 * total),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sizes", default="128,256,512,1024")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    products = bench_products([int(s) for s in a.sizes.split(",")], a.repeats)
    steps = []
    for model, batch in (("mlp", 16), ("cnn", 16), ("transformer-small", 16), ("transformer", 16), ("transformer-256", 32)):
        steps.append(step_times(model, batch, a.repeats, torch_path=model != "transformer-256"))
    profiles = {m: profile_step(m, b, a.repeats) for m, b in (("transformer", 16), ("transformer-256", 32))}
    split = split_independence_cost(16, 1 << 20, a.repeats)
    exact_products = [split_independent_products(m, b) for m, b in (("transformer", 16), ("mlp", 16))]
    rows = products + steps
    one_pass = "one-pass AVX-512 VNNI products" if native.vnni() else "int8 products by torch._int_mm"
    table = f"Compiled kernels: {native.status()} ({one_pass}); {torch.get_num_threads()} thread(s).\n\n"
    table += "## Exact vs native products (CPU, one run)\n\n"
    table += "limb_gemms: the exact product's 5 int8 GEMMs (13 limb pairs) alone.\n\n"
    table += markdown_table(products, ["what", "native_ms", "exact_ms", "ratio", "limb_gemms_ms", "limb_gemms_ratio"])
    table += "\n\n## Training steps (best of interleaved rounds)\n\n"
    table += "dispatch: native kernels under a pass-through dispatch mode (routing alone); torch path: exact without "
    table += "the compiled kernels.\n\n"
    table += markdown_table(
        steps,
        ["what", "native_ms", "exact_ms", "ratio", "paired_ratio", "dispatch_ratio", "exact_torch_ms", "torch_path_ratio"],
    )
    for m, prof in profiles.items():
        total = sum(prof.values())
        prow = [{"family": k, "ms_per_step": v * 1e3, "share": v / total} for k, v in sorted(prof.items(), key=lambda kv: -kv[1])]
        table += f"\n\n## Where an exact {m} step goes\n\n" + markdown_table(prow, ["family", "ms_per_step", "share"])
    table += "\n\n## Split-independent micro-batching, estimated extra per step\n\n" + markdown_table(
        [split], ["batch", "params", "exact_sum_ms", "native_sum_ms"]
    )
    table += "\n\nProducts that do not depend on the split (every float32 term kept, the sum rounded once): int8 "
    table += "slice pairs each product of one exact step would need, against the 13 limb pairs now, and the limb GEMM "
    table += "cost of the whole step's products relative to now.\n\n"
    table += markdown_table(exact_products, ["model", "products", "min_pairs", "median_pairs", "max_pairs", "limb_gemm_cost_vs_now"])
    write_results(
        "exact_overhead",
        {"kernels": native.status(), "rows": rows, "profiles": profiles, "split_independence": split, "exact_products": exact_products},
        table,
    )


if __name__ == "__main__":
    main()
