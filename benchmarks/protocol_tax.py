"""The protocol tax: what a verified task costs beyond its training, for the built-in transformer and a ~10M-parameter
MLP, at 99.9% detection of a cheat of f = 0.1, for runs of 100 and 1,000 segments, with independent samples (each of
three verifiers reaches the detection alone) and one shared committee sample, in native and exact numerics.

    python benchmarks/protocol_tax.py            # ~3-5 min on 2 shared cores
    python benchmarks/protocol_tax.py --quick    # smaller MLP and fewer steps, for a smoke run

What is MEASURED (short real runs, per model and numerics, on this machine):
- step_s: the training step, the median of single `pol.engine.run_steps` steps after warm-up;
- state_bytes: one checkpoint's tensors (parameters, optimizer state, buffers) after training started;
- hash_bytes_per_s: `pol.digest.state_digest` over that state;
- proof per checkpoint: the median of three real `pol.prove.train_and_prove` runs of four segments at the spec's default k (or a
  smaller k so the run stays short), split into training and proof overhead exactly as `pol game run` does it
  (`games.market._compute_run_timing`: steps x the median step interval, the rest is the proof); the model's write
  bandwidth is the one that reproduces that per-checkpoint cost;
- verification: a real `pol.verify.verify` of one beacon-drawn segment of that bundle: the calibration steps a
  native verifier replays (`Report.calibration_steps`; exact numerics: none) and the verifier's fixed cost (its
  seconds less its steps at step_s and two checkpoint loads); the checkpoint load (read and digest check) timed
  on the bundle's own checkpoints. A replayed step is assumed to cost a training step.
What is MODELLED (`games.cost.compute_task_cost`): the tax of a run of n = 100 and n = 1,000 segments at the
default k (N = n x k steps), from those figures, and the tax against k (`games.cost.best_every` picks the least).
Every time is CPU seconds of this process (all threads, user and system), not wall time: the machine is shared
with other engineers' test runs (its load average was above 4 on 2 cores while this was written), which inflates
wall time by up to 10x and CPU time far less; still, figures are noisy (tens of percent between runs). Step counts
and sample sizes are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, machine, markdown_table, write_results
from games.cost import CostModel, best_every, compute_required_samples, compute_task_cost
from games.market import _compute_run_timing
from pol.bundle import open_bundle
from pol.digest import state_digest
from pol.engine import build_runtime, capture_state, compute_default_every, initial_state, run_steps
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import verify

CONFIDENCE, FRACTION, COMMITTEE = 0.999, 0.1, 3
SEGMENTS = (100, 1_000)
KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def cpu_seconds() -> float:
    """CPU time of this process, every thread, user and system: what the work costs, which other tenants of a shared
    machine inflate far less than wall time (benchmarks/proof_overhead.py does the same)."""
    return time.process_time()  # CLOCK_PROCESS_CPUTIME_ID: nanosecond resolution, every thread


def _mark(marks: list[tuple[int, float]], step: int, total: int, loss: float) -> None:
    marks.append((step, cpu_seconds()))


def measure(label: str, fields: dict[str, Any], numerics: str, quick: bool) -> dict[str, Any]:
    """Every measured figure of one model in one numerics mode (see the module docstring)."""
    spec = spec_from_dict({**fields, "numerics": numerics, "steps": 100_000})
    default_k = compute_default_every(spec)
    rt = build_runtime(spec)
    initial_state(rt)
    run_steps(rt, 2)  # warm-up: thread pools, allocator, lazy imports
    times = []
    for _ in range(4 if quick else 6):
        start = cpu_seconds()
        run_steps(rt, rt.step + 1)
        times.append(cpu_seconds() - start)
    step_s = statistics.median(times)
    state = capture_state(rt)
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    start = cpu_seconds()
    for _ in range(3):
        state_digest(state)
    hash_bps = 3 * state_bytes / (cpu_seconds() - start)
    # a short real proved run: a few segments of k steps (k capped so that the run stays short)
    k = max(2, min(default_k, 10 if quick else 20))
    segments = 4
    run = spec.replace(steps=k * segments, every=k)
    per_checkpoint, trained, proved = [], [], []
    for attempt in range(3):  # the median of three runs: the machine is shared
        tmp = Path(tempfile.mkdtemp(prefix="pol-tax-"))
        try:
            marks: list[tuple[int, float]] = []
            train_and_prove(run, tmp / "b", on_progress=functools.partial(_mark, marks))
            timing = _compute_run_timing(marks, cpu_seconds(), set(run.checkpoint_steps))
            per_checkpoint.append(timing["proof_s"] / segments)  # the step-0 checkpoint is written before the first mark
            trained.append(timing["train_s"])
            proved.append(timing["proof_s"])
            if attempt == 0:
                began = cpu_seconds()
                one = verify(tmp / "b", segments=[1], beacon="ab" * 32)
                verify_s = cpu_seconds() - began
                with open_bundle(tmp / "b") as b:  # a verifier reads (and digest-checks) two checkpoints a segment
                    start = cpu_seconds()
                    for rec in b.records:
                        b.load_state(rec.step)
                    load_s = (cpu_seconds() - start) / len(b.records)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    timing = {"train_s": statistics.median(trained), "proof_s": statistics.median(proved)}
    per_checkpoint_s = statistics.median(per_checkpoint)
    assert one.accepted, one.reason
    setup_s = max(0.0, verify_s - one.steps_replayed * step_s - 2 * load_s)  # opening, building, calibrating apart
    inv_write = max(per_checkpoint_s / max(state_bytes, 1) - 1 / hash_bps, 1e-12)
    inv_read = max(load_s / max(state_bytes, 1) - 1 / hash_bps, 1e-12)
    return {"model": label, "numerics": numerics, "params": sum(p.numel() for p in rt.params.values()),
            "default_k": default_k, "step_s": step_s, "state_mb": state_bytes / 1e6, "hash_gb_per_s": hash_bps / 1e9,
            "proof_run_k": k, "proof_per_checkpoint_s": per_checkpoint_s, "train_s_measured": timing["train_s"],
            "proof_s_measured": timing["proof_s"], "verifier_setup_s": setup_s,
            "checkpoint_load_s": load_s, "calibration_steps": one.calibration_steps,
            "_model": CostModel(step_seconds=step_s, state_bytes=state_bytes, write_bytes_per_s=1 / inv_write,
                                hash_bytes_per_s=hash_bps, read_bytes_per_s=1 / inv_read, steps=1000, every=default_k,
                                confidence=CONFIDENCE, cheat_fraction=FRACTION, numerics=numerics,
                                calibration_steps=one.calibration_steps, verifier_setup_seconds=setup_s,
                                committee=COMMITTEE)}


def tax_rows(measured: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    base: CostModel = measured["_model"]
    for n in SEGMENTS:
        for shared in (False, True):
            model = dataclasses.replace(base, steps=n * base.every, shared=shared)
            cost = compute_task_cost(model)
            rows.append({"model": measured["model"], "numerics": measured["numerics"], "segments": n,
                         "k": base.every, "steps": model.steps, "sampling": "shared" if shared else "independent",
                         "sample": cost.samples, "proof_pct": 100 * cost.proof_tax,
                         "verify_pct": 100 * cost.verify_tax,
                         "per_verifier_pct": 100 * cost.per_verifier_seconds / cost.training_seconds,
                         "tax_pct": 100 * cost.tax})
    return rows


def k_rows(measured: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """The tax against k for a run of `steps` steps, one shared sample."""
    model = dataclasses.replace(measured["_model"], steps=steps, shared=True)
    row: dict[str, Any] = {"model": measured["model"], "numerics": measured["numerics"], "steps": steps}
    for k in KS:
        if k <= steps:
            row[f"k={k}"] = f"{100 * compute_task_cost(dataclasses.replace(model, every=k)).tax:.1f}%"
    best = best_every(model)
    row["best k"] = best
    row["tax at best k"] = f"{100 * compute_task_cost(dataclasses.replace(model, every=best)).tax:.1f}%"
    checkpoint = model.state_bytes * (1 / model.hash_bytes_per_s + 1 / model.write_bytes_per_s)
    s = compute_task_cost(dataclasses.replace(model, every=best)).samples
    row["sqrt rule k"] = round((steps * checkpoint / (s * model.step_seconds)) ** 0.5, 1)
    row["checkpoint / step"] = round(checkpoint / model.step_seconds, 2)
    row["default k"] = measured["default_k"]
    row["tax at default k"] = f"{100 * compute_task_cost(dataclasses.replace(model, every=measured['default_k'])).tax:.1f}%"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1M MLP instead of ~10M, fewer timed steps")
    args = parser.parse_args()
    started = time.perf_counter()
    mlp = {"model": {"name": "mlp", "kwargs": {"hidden": 512 if args.quick else 2240, "depth": 3}}}
    models = {"transformer": {"model": "transformer"}, "mlp-10M" if not args.quick else "mlp-1M": mlp}
    measured = [measure(label, fields, numerics, args.quick) for label, fields in models.items()
                for numerics in ("native", "exact")]
    for m in measured:
        print({k: v for k, v in m.items() if k != "_model"}, flush=True)
    taxes = [row for m in measured for row in tax_rows(m)]
    curve = [k_rows(m, steps) for steps in (10_000, 100_000) for m in measured]
    samples = {n: compute_required_samples(n, CONFIDENCE, FRACTION) for n in SEGMENTS}
    m_cols = ["model", "numerics", "params", "default_k", "step_s", "state_mb", "hash_gb_per_s", "proof_run_k",
              "proof_per_checkpoint_s", "checkpoint_load_s", "verifier_setup_s", "calibration_steps"]
    t_cols = ["model", "numerics", "segments", "k", "steps", "sampling", "sample", "proof_pct", "verify_pct",
              "per_verifier_pct", "tax_pct"]
    k_cols = ["model", "numerics", "steps", *[f"k={k}" for k in KS], "best k", "tax at best k", "sqrt rule k",
              "checkpoint / step", "default k", "tax at default k"]
    text = "\n".join([
        "# Protocol tax",
        "",
        f"`python benchmarks/protocol_tax.py{' --quick' if args.quick else ''}` ({time.perf_counter() - started:.0f} s; "
        f"torch {machine()['torch']}, {machine()['threads']} threads). Detection {CONFIDENCE:.1%} against a cheat "
        f"of f = {FRACTION} (hypergeometric sample: {samples[100]} of 100 segments, {samples[1000]} of 1,000); "
        f"a committee of {COMMITTEE} verifiers. Times are CPU seconds (all threads), since the machine is shared with "
        "other engineers' test runs; they are still noisy (tens of percent between runs). Sample sizes and step "
        "counts are exact.",
        "",
        "## Measured (short real runs)",
        "",
        markdown_table([{k: v for k, v in m.items() if k != "_model"} for m in measured], m_cols),
        "",
        "## Modelled tax (`games.cost.compute_task_cost` on the measured figures, default k)",
        "",
        "tax = (proof + every verifier's replays, calibration and setup) / training. `independent`: each of the 3 "
        "verifiers replays the whole required sample (today's market); `shared`: the committee splits one sample.",
        "",
        markdown_table(taxes, t_cols),
        "",
        "## Tax against k (shared sample, runs of 10,000 and 100,000 steps; `games.cost.best_every`)",
        "",
        "Proof falls as 1/k, verification grows as k (s segments of k steps, s nearly constant once n is large). "
        "The least tax is near k* = sqrt(N c / s), with c = one checkpoint's cost in steps (`checkpoint / step`) and "
        "s the sample size (about 64 here); `sqrt rule k` is that closed form, `best k` the exact search.",
        "",
        markdown_table(curve, k_cols),
        "",
    ])
    payload = {"quick": args.quick, "measured": [{k: v for k, v in m.items() if k != "_model"} for m in measured],
               "models": [dataclasses.asdict(m["_model"]) for m in measured], "taxes": taxes, "curve": curve}
    write_results("protocol_tax", payload, text)
    print(f"results under {RESULTS}")


if __name__ == "__main__":
    main()
