"""Exact numerics across devices: does each built-in model train to the same commitment on the CPU and on CUDA?

The prepared device check of issue 4, to run in one call on a machine with a GPU:

    python benchmarks/exact_gpu_check.py                       # cpu against cuda (cpu against itself without CUDA)
    python benchmarks/exact_gpu_check.py --devices cpu --threads 1,2 --steps 4

Each built-in model (`mlp`, `cnn`, `transformer`, the built-in defaults, and the model zoo's `gpt2`, `llama`, `bert`,
`vit`, `resnet` when transformers is installed) trains `--steps` steps in exact numerics
with `pol.prove.train_and_prove` on every device (and thread count) named, checkpointing every `--every` steps; equal
commitments mean bit-identical full training states at every checkpoint. The script also times one exact and one
native step per model and device. It prints a table and writes benchmarks/results/exact_gpu_check.{json,md};
the exit code is 1 if any two runs of a model disagree.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, write_results
from pol.engine import build_runtime, initial_state, run_steps
from pol.prove import train_and_prove
from pol.spec import spec_from_dict

MODELS = ("mlp", "cnn", "transformer")
try:  # the model zoo, where transformers is installed (issue 13: each zoo model's commitment on CUDA must equal the CPU's)
    import transformers  # noqa: F401

    from pol.zoo import ZOO_MODELS

    MODELS = (*MODELS, *ZOO_MODELS)
except ImportError:
    pass


def step_ms(model: str, numerics: str, device: str) -> float:
    """Median wall time of one training step (after one warm-up step), in milliseconds."""
    rt = build_runtime(spec_from_dict({"model": model, "steps": 100, "every": 100, "numerics": numerics}), device=device)
    initial_state(rt)
    run_steps(rt, 1)
    times = []
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_steps(rt, rt.step + 1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[1] * 1e3


def check(models: list[str], devices: list[str], threads: list[int], steps: int, every: int, timing: bool) -> list[dict[str, Any]]:
    """One row per (model, device, threads): the commitment, whether it equals the model's first run, step times."""
    rows = []
    work = Path(tempfile.mkdtemp(prefix="pol-gpu-check-"))
    try:
        for model in models:
            first = None
            for device in devices:
                for n in threads:
                    torch.set_num_threads(n)
                    spec = spec_from_dict({"model": model, "steps": steps, "every": every, "numerics": "exact"})
                    start = time.perf_counter()
                    result = train_and_prove(spec, work / f"{model}-{device.replace(':', '')}-{n}", device=device)
                    root = result.manifest.root
                    first = first or root
                    row = {"model": model, "device": device, "threads": n, "root": root[:16], "same": root == first,
                           "train_s": time.perf_counter() - start}
                    if timing:
                        row["exact_step_ms"] = step_ms(model, "exact", device)
                        row["native_step_ms"] = step_ms(model, "native", device)
                        row["ratio"] = row["exact_step_ms"] / row["native_step_ms"]
                    rows.append(row)
                    print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--devices", default=default_devices, help=f"comma-separated (default here: {default_devices})")
    ap.add_argument("--threads", default="2", help="comma-separated CPU thread counts to run each device with")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true", help="skip the per-step timings")
    a = ap.parse_args()
    rows = check(a.models.split(","), a.devices.split(","), [int(t) for t in a.threads.split(",")], a.steps, a.every,
                 not a.no_timing)
    env = {"cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    columns = ["model", "device", "threads", "root", "same", "train_s", "exact_step_ms", "native_step_ms", "ratio"]
    write_results("exact_gpu_check", {"rows": rows, "env": env}, markdown_table(rows, columns))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
