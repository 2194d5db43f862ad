"""Data-parallel training (pol.distributed, gloo on CPU): step time at 1, 2, ... processes, exact against native,
and the bytes each process all-reduces per step for gradients.

Step time: the median interval between consecutive steps on rank 0 (`--steps` steps, checkpoints at the first and
last only), so process start-up, model building and checkpoints stay out. Each process runs one torch thread. Exact gradients travel as int64
fixed-point digits (one per 16-bit exponent bin a tensor's gradients span, plus 3 carry digits and a count of
non-(-0) terms): their width over float32 is reported as `bytes x native`.

    python benchmarks/distributed.py --procs 1 2 --steps 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, write_results
from pol.distributed import train_spawned
from pol.spec import spec_from_dict

MODELS = {
    "transformer": {"model": {"name": "transformer", "kwargs": {"n_layer": 1, "n_embd": 32, "block_size": 16}},
                    "data": {"name": "chars", "kwargs": {"length": 8192, "block_size": 16}}},
    "mlp-256": {"model": {"name": "mlp", "kwargs": {"hidden": 256}}, "data": {"name": "synthetic", "kwargs": {"n": 2048}}},
}


def measure(model: str, numerics: str, nproc: int, steps: int, batch: int, micro: int) -> dict[str, object]:
    spec = spec_from_dict({**MODELS[model], "steps": steps, "every": steps, "batch_size": batch, "microbatch": micro,
                           "numerics": numerics})
    with tempfile.TemporaryDirectory() as d:
        run = train_spawned(spec, Path(d) / "b", nproc)
    if run.errors:
        raise SystemExit(f"{model} {numerics} {nproc} processes: {run.errors}")
    return {"model": model, "numerics": numerics, "processes": nproc, "step_ms": 1000 * run.step_seconds,
            "allreduce_bytes_per_step": int(run.bytes_reduced / steps), "root": run.root}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for numerics in ("native", "exact"):
            base = None
            for nproc in args.procs:
                row = measure(model, numerics, nproc, args.steps, args.batch, args.micro)
                base = base or row["step_ms"]
                row["speedup"] = base / row["step_ms"]
                row["efficiency"] = row["speedup"] / nproc
                rows.append(row)
                print(row, flush=True)
        for nproc in args.procs:
            ex = next(r for r in rows if r["model"] == model and r["numerics"] == "exact" and r["processes"] == nproc)
            na = next(r for r in rows if r["model"] == model and r["numerics"] == "native" and r["processes"] == nproc)
            ex["bytes_x_native"] = ex["allreduce_bytes_per_step"] / max(na["allreduce_bytes_per_step"], 1)
            ex["exact_x_native_time"] = ex["step_ms"] / na["step_ms"]
        exact_roots = {r["root"] for r in rows if r["model"] == model and r["numerics"] == "exact"}
        print(f"{model}: exact commitments over {args.procs} processes: {'one' if len(exact_roots) == 1 else exact_roots}")
    cols = ["model", "numerics", "processes", "step_ms", "speedup", "efficiency", "allreduce_bytes_per_step",
            "bytes_x_native", "exact_x_native_time"]
    write_results("distributed", {"args": vars(args), "rows": rows}, markdown_table(rows, cols))


if __name__ == "__main__":
    main()
