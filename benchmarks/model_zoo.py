"""The model zoo (pol.zoo) on this machine: per zoo model, native and exact train-step times (interleaved round by
round, one run), bundle bytes per step, verify time at the default sample, and the native thresholds calibrated.

    python benchmarks/model_zoo.py [--rounds 7] [--steps 20] [--threads 1]
    python benchmarks/model_zoo.py --profile [--steps 20] [--top 15]

Writes benchmarks/results/model_zoo.{json,md}; with --profile, where an exact step's time goes instead: per zoo
model, the time of each aten operator's handler summed over a step (outermost operator routed by the exact dispatch
mode, including what its handler dispatches again), its calls per step and share of the step, and the time outside
the handlers (Python, autograd, the optimizer's own code, data), in the fastest of --steps steps; written to
benchmarks/results/model_zoo_profile.{json,md}."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import markdown_table, write_results
from benchmarks.exact_overhead import profile_operators
from pol.engine import build_runtime, initial_state, run_steps
from pol.errors import CannotVerifySoundly
from pol.exact import native
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import verify
from pol.zoo import ZOO_MODELS


def _runtime(model: str, numerics: str):  # type: ignore[no-untyped-def]
    rt = build_runtime(spec_from_dict({"model": model, "steps": 1000, "every": 1000, "numerics": numerics}))
    initial_state(rt)
    run_steps(rt, 1)  # warm-up (and the first step, which finds out whether the model draws)
    return rt


def _one_step(rt) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    run_steps(rt, rt.step + 1)
    return time.perf_counter() - start


def step_times(model: str, rounds: int) -> dict[str, Any]:
    rts = {"native": _runtime(model, "native"), "exact": _runtime(model, "exact")}
    times: dict[str, list[float]] = {k: [] for k in rts}
    for _ in range(rounds):
        for k, rt in rts.items():
            times[k].append(_one_step(rt))
    params = sum(p.numel() for p in rts["native"].model.parameters())
    return {"model": model, "params": params, "batch": rts["native"].spec.batch_size,
            "native_ms": min(times["native"]) * 1e3, "exact_ms": min(times["exact"]) * 1e3,
            "ratio": min(times["exact"]) / min(times["native"]),
            "paired_ratio": statistics.median(e / n for e, n in zip(times["exact"], times["native"], strict=True))}


def bundle_and_verify(model: str, numerics: str, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = spec_from_dict({"model": model, "steps": steps, "numerics": numerics})
        result = train_and_prove(spec, Path(tmp) / "b")
        size = sum(f.stat().st_size for f in Path(result.path).rglob("*") if f.is_file())
        start = time.perf_counter()
        try:
            report = verify(result.path)
        except CannotVerifySoundly as exc:  # native thresholds beyond the caps: recorded, not a crash
            return {f"{numerics}_bytes_per_step": size / steps, f"{numerics}_verify_s": time.perf_counter() - start,
                    f"{numerics}_verdict": "cannot verify soundly", "rel_l2": f"needs {10 * exc_rel_l2(exc):.3g} > cap"}
        seconds = time.perf_counter() - start
    row: dict[str, Any] = {f"{numerics}_bytes_per_step": size / steps, f"{numerics}_verify_s": seconds,
                           f"{numerics}_verdict": report.verdict, f"{numerics}_replayed": len(report.checks)}
    if numerics == "native" and report.thresholds is not None:
        t = report.thresholds
        row.update(rel_l2=t.rel_l2, min_cosine=t.min_cosine, max_log_ratio=t.max_log_ratio, loss_rel=t.loss_rel)
    return row


def exc_rel_l2(exc: CannotVerifySoundly) -> float:
    import re

    found = re.search(r"'rel_l2': ([0-9.e-]+)", str(exc))
    return float(found.group(1)) if found else float("nan")


def profile(models: list[str], steps: int, top: int, command: str) -> None:
    """Per model, the exact step's time per operator handler (see the module docstring)."""
    text = f"Command: `{command}`\n\nCompiled kernels: {native.status()}; {torch.get_num_threads()} thread(s); "
    text += f"the fastest of {steps} exact steps after one warm-up step. `ms`: time in the operator's handler "
    text += "in that step (outermost operator the exact dispatch mode routes, with whatever its handler dispatches again), "
    text += "`calls`: per step, `share`: of the whole step.\n"
    payload: dict[str, Any] = {}
    for model in models:
        per_op, total = profile_operators(_runtime(model, "exact"), steps, fastest=True)
        inside = sum(t for t, _ in per_op.values())
        rows = [{"operator": op, "ms": t * 1e3, "calls": n, "share": t / total}
                for op, (t, n) in sorted(per_op.items(), key=lambda kv: -kv[1][0])]
        payload[model] = {"step_ms": total * 1e3, "outside_ms": (total - inside) * 1e3, "operators": rows}
        shown = rows[:top] + [{"operator": f"({len(rows) - top} other operators)", "ms": sum(r["ms"] for r in rows[top:]),
                               "calls": sum(r["calls"] for r in rows[top:]), "share": sum(r["share"] for r in rows[top:])}]
        shown.append({"operator": "outside the handlers", "ms": (total - inside) * 1e3, "calls": "", "share": 1 - inside / total})
        text += f"\n## {model}: {total * 1e3:.1f} ms per exact step, {sum(r['calls'] for r in rows)} operators\n\n"
        text += markdown_table(shown, ["operator", "ms", "calls", "share"]) + "\n"
        print(f"{model}: {total * 1e3:.1f} ms", flush=True)
    write_results("model_zoo_profile", {"command": command, "steps": steps, "profiles": payload}, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(ZOO_MODELS))
    parser.add_argument("--profile", action="store_true", help="per-operator profile of the exact step instead")
    parser.add_argument("--top", type=int, default=15, help="--profile: operators listed per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.models.split(","), args.steps, args.top, "python benchmarks/model_zoo.py " + " ".join(sys.argv[1:]))
        return
    rows = []
    for model in args.models.split(","):
        row = step_times(model, args.rounds)
        for numerics in ("native", "exact"):
            row.update(bundle_and_verify(model, numerics, args.steps))
        print(row, flush=True)
        rows.append(row)
    columns = ["model", "params", "batch", "native_ms", "exact_ms", "ratio", "paired_ratio", "native_bytes_per_step",
               "native_verify_s", "native_verdict", "exact_verify_s", "exact_verdict", "exact_replayed", "rel_l2", "min_cosine", "max_log_ratio", "loss_rel"]
    write_results("model_zoo", {"args": vars(args), "rows": rows}, markdown_table(rows, columns))


if __name__ == "__main__":
    main()
