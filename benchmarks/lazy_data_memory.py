"""Peak memory of a job whose data is larger than the memory cap: `dir:` safetensors shards read lazily.

Writes `--mib` MiB of rows as 8 shards, then, in a fresh process each, (a) hashes and trains on them as a `dir:`
dataset under POL_DATA_MEMORY=`--cap` and (b) loads the same rows in memory (what pol did before: concatenate
every shard). Reports each process's peak resident memory above its baseline after imports (VmHWM: it counts the
shards' memory-mapped pages, page cache the kernel may drop) and its peak anonymous memory (RssAnon sampled every
2 ms: what the process itself holds), and the time to hash (lazy) or load (in memory) the data. Run: python benchmarks/lazy_data_memory.py [--mib 512] [--cap 64M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from safetensors.torch import load_file
from pol import engine
from pol.components import CodePolicy
from pol.data import build_dataset, data_digest
from pol.spec import spec_from_dict
import threading
root, mode = sys.argv[1], sys.argv[2]

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak_anon = [anon_kib()]
base_anon = peak_anon[0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], anon_kib())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "lazy":
    ds = build_dataset(f"dir:{root}", {}, code=CodePolicy.trust_all_code())
    digest = data_digest(ds)
    hashed = time.perf_counter() - t
    time.sleep(0.01)
    hash_peak = round((peak_anon[0] - base_anon) / 1024, 1)
    d = ds.layout["x"][1][0]
    spec = spec_from_dict({"model": {"name": "mlp", "kwargs": {"d_in": d, "hidden": 32, "classes": 10}}, "data": f"dir:{root}",
                           "steps": 20, "every": 10, "batch_size": 64})
    rt = engine.build_runtime(engine.resolve_spec(spec, ds), dataset=ds)
    engine.initial_state(rt)
    engine.run_steps(rt, 20)
else:
    from pathlib import Path
    parts = [load_file(str(f)) for f in sorted(Path(root).glob("*.safetensors"))]
    x = torch.cat([p["x"] for p in parts]); del parts
    digest, hashed, hash_peak = None, time.perf_counter() - t, None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
time.sleep(0.01)
print(json.dumps({"mode": mode, "peak_rss_above_baseline_mib": round((peak - base) / 1024, 1),
                  "peak_anonymous_above_baseline_mib": round((peak_anon[0] - base_anon) / 1024, 1), "peak_anonymous_while_hashing_mib": hash_peak, "seconds": round(hashed, 2), "digest": digest}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--cap", default="64M")
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    d = 1024
    rows_per_shard = args.mib * (1 << 20) // (8 * 4 * d)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(8):
            g = torch.Generator().manual_seed(k)
            x = torch.randn(rows_per_shard, d, generator=g)
            y = torch.randint(0, 10, (rows_per_shard,), generator=g)
            save_file({"x": x, "y": y}, str(Path(tmp) / f"part-{k}.safetensors"))
            del x, y
        out = []
        for mode in ("lazy", "in-memory"):
            env = {**os.environ, "POL_DATA_MEMORY": args.cap} if mode == "lazy" else dict(os.environ)
            done = subprocess.run([sys.executable, "-c", CHILD, tmp, mode], env=env, capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parent.parent)
            out.append(json.loads(done.stdout))
        print(json.dumps({"data_mib": args.mib, "cap": args.cap, "runs": out}, indent=1))


if __name__ == "__main__":
    main()
