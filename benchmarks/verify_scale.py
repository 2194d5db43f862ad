"""Does verification cost what it samples, or what the bundle holds? Verify time and checkpoint bytes read against
bundle length, with the sample size fixed.

    python benchmarks/verify_scale.py                   # 20, 200 and 2000 checkpoints, 3 rounds each
    python benchmarks/verify_scale.py --lengths 20 200  # a quicker run

One honest bundle per length (tiny MLP, k = 1, so n checkpoints are n steps), verified locally with 4 samples in
three ways, each timed from opening the bundle to the report:

- `lazy, uniform`: `pol verify` as now (checkpoint digests checked when read), 4 uniform samples;
- `lazy, top-Q`: the same with the default largest-update share (1 of the 4), whose ranking still reads every
  checkpoint (issue 16 item 2 is to commit the norms in the records so ranking reads nothing);
- `full (old)`: the previous behaviour: every file hashed when the bundle is opened, then the default sample with
  ranking (so every checkpoint is read twice).

- `http, directory` and `http, archive`: `lazy, top-Q` over loopback HTTP, the bundle directory (or its `pol pack`
  archive, read by range requests) published by `pol serve`'s thread API and verified by URL with no cache, so
  every read is a request. `bytes_fetched` counts the body bytes the server sent (the manifest and, for the
  archive, one 512-byte tar header per checkpoint touched, included), counted at the server.

Bytes are checkpoint bytes read from the bundle (headers and digests included), counted by the bundle's reader.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import markdown_table, write_results
from pol.bundle import open_bundle, pack_bundle
from pol.prove import train_and_prove
from pol.remote import Remote
from pol.spec import spec_from_dict
from pol.verify import verify

SAMPLES = 4


def _spec(n: int):
    return spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 32}}, "data": {"name": "synthetic", "kwargs": {"n": 512}},
                           "steps": n, "every": 1, "batch_size": 16})


def _run(path: Path, mode: str, seed: int, server=None) -> dict:
    started = time.perf_counter()
    if server is not None:  # over loopback HTTP: fetched bytes counted at the server
        before = len(server.requests)
        report = verify(Remote(server.url, cache_dir=None), samples=SAMPLES, seed=seed)
        read = report.bytes_read
        fetched = sum(r.length for r in server.requests[before:])
    elif mode == "full (old)":
        with open_bundle(path, full=True) as b:
            report = verify(b, samples=SAMPLES, seed=seed)
            read = b.bytes_read
    else:
        report = verify(path, samples=SAMPLES, seed=seed, largest=0 if mode == "lazy, uniform" else None)
        read = report.bytes_read
    seconds = time.perf_counter() - started
    assert report.accepted, report.reason
    return {"seconds": seconds, "bytes_read": read, "checkpoints_read": report.checkpoints_read,
            "steps_replayed": report.steps_replayed, "bytes_fetched": fetched if server is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true", help="Skip the loopback HTTP modes.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lengths:
            t = time.perf_counter()
            path = train_and_prove(_spec(n), Path(tmp) / f"b{n}").path
            files = sorted((path / "checkpoints").iterdir())
            total = sum(f.stat().st_size for f in files)
            print(f"n={n}: trained in {time.perf_counter() - t:.1f} s, {total / 1e6:.2f} MB of checkpoints", flush=True)
            modes = [("lazy, uniform", None), ("lazy, top-Q", None), ("full (old)", None)]
            if not args.no_http:
                modes += [("http, directory", path), ("http, archive", pack_bundle(path, Path(tmp) / f"b{n}.tar"))]
            for mode, served in modes:
                if served is None:
                    runs = [_run(path, mode, seed) for seed in range(args.rounds)]
                else:
                    from pol.serve import serve_in_thread

                    with serve_in_thread(served) as server:
                        runs = [_run(path, mode, seed, server) for seed in range(args.rounds)]
                fetched = [r["bytes_fetched"] for r in runs if r["bytes_fetched"] is not None]
                row = {"checkpoints": n + 1, "mode": mode, "samples": SAMPLES,
                       "seconds_median": statistics.median(r["seconds"] for r in runs),
                       "bytes_read_median": int(statistics.median(r["bytes_read"] for r in runs)),
                       "bundle_bytes": total,
                       "checkpoints_read_median": statistics.median(r["checkpoints_read"] for r in runs),
                       "steps_replayed": runs[0]["steps_replayed"],
                       "bytes_fetched_median": int(statistics.median(fetched)) if fetched else None}
                rows.append(row)
                print(row, flush=True)
    for row in rows:  # growth against the shortest bundle, same mode
        base = next(r for r in rows if r["mode"] == row["mode"])
        row["time_vs_shortest"] = row["seconds_median"] / base["seconds_median"]
        row["bytes_vs_shortest"] = row["bytes_read_median"] / base["bytes_read_median"]
    columns = ["checkpoints", "mode", "samples", "seconds_median", "time_vs_shortest", "bytes_read_median",
               "bytes_vs_shortest", "bytes_fetched_median", "checkpoints_read_median", "bundle_bytes", "steps_replayed"]
    write_results("verify_scale", {"rows": rows, "rounds": args.rounds, "model": "mlp hidden 32, k = 1"},
                  markdown_table(rows, columns))


if __name__ == "__main__":
    main()
