"""Does verification cost what it samples, or what the bundle holds? Verify time and checkpoint bytes read against
bundle length, with the sample size fixed.

    python benchmarks/verify_scale.py                   # 20, 200 and 2000 checkpoints, 3 rounds each
    python benchmarks/verify_scale.py --lengths 20 200  # a quicker run
    python benchmarks/verify_scale.py --model transformer --every 10   # segments of real steps (~4 min to train)

One honest bundle per length (tiny MLP, k = 1, so n checkpoints are n steps), verified locally with 4 samples in
three ways, each timed from opening the bundle to the report:

- `lazy, uniform`: `pol verify` as now (checkpoint digests checked when read), 4 uniform samples;
- `lazy, top-Q`: the same with the default largest-update share (1 of the 4), ranked by the update norms the
  records commit (`pol.verify.committed_update_norms`), so ranking reads no checkpoint;
- `full (old)`: the previous behaviour: every file hashed when the bundle is opened, then the default sample.

- `http, directory` and `http, archive`: `lazy, top-Q` over loopback HTTP, the bundle directory (or its `pol pack`
  archive, read by range requests) published by `pol serve`'s thread API and verified by URL with no cache, so
  every read is a request. `bytes_fetched` counts the body bytes the server sent (the manifest and, for the
  archive, one 512-byte tar header per checkpoint touched, included), counted at the server.

Bytes are checkpoint bytes read from the bundle (headers and digests included), counted by the bundle's reader.
`cpu_seconds` is the process's CPU time over the same span (all its threads, the HTTP server's included; other
tenants cannot inflate it, though waiting threads can). `open_seconds` times opening the bundle alone the same way (manifest parsed, every record checked, the Merkle root
and commitment recomputed, the file table checked; `full (old)` hashes every file too): the part of a verification
that grows with the bundle, apart from the replay, whose time on a shared machine swings by more than the whole
open costs. Rounds are interleaved (each round runs every length and mode once), so load from other tenants falls
on all lengths alike; the tables give medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _spec(n: int, model: str = "mlp", every: int = 1):
    """n segments of `every` steps: the tiny MLP (the default), or a built-in model with its default data."""
    if model == "mlp":
        return spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 32}}, "data": {"name": "synthetic", "kwargs": {"n": 512}},
                               "steps": n * every, "every": every, "batch_size": 16})
    return spec_from_dict({"model": model, "steps": n * every, "every": every})


def _open_seconds(location, full: bool) -> float:
    started = time.perf_counter()
    open_bundle(location, full=full).close()
    return time.perf_counter() - started


def _run(path: Path, mode: str, seed: int, server=None) -> dict:
    if server is not None:  # over loopback HTTP: fetched bytes counted at the server
        opened = _open_seconds(Remote(server.url, cache_dir=None), full=False)
        before = len(server.requests)
        started, cpu = time.perf_counter(), time.process_time()
        report = verify(Remote(server.url, cache_dir=None), samples=SAMPLES, seed=seed)
        read = report.bytes_read
        fetched = sum(r.length for r in server.requests[before:])
    elif mode == "full (old)":
        opened = _open_seconds(path, full=True)
        started, cpu = time.perf_counter(), time.process_time()
        with open_bundle(path, full=True) as b:
            report = verify(b, samples=SAMPLES, seed=seed)
            read = b.bytes_read
    else:
        opened = _open_seconds(path, full=False)
        started, cpu = time.perf_counter(), time.process_time()
        report = verify(path, samples=SAMPLES, seed=seed, largest=0 if mode == "lazy, uniform" else None)
        read = report.bytes_read
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert report.accepted, report.reason
    return {"seconds": seconds, "cpu_seconds": cpu, "open_seconds": opened, "bytes_read": read, "checkpoints_read": report.checkpoints_read,
            "steps_replayed": report.steps_replayed, "bytes_fetched": fetched if server is not None else None}


def _row(n: int, mode: str, runs: list[dict], total: int) -> dict:
    fetched = [r["bytes_fetched"] for r in runs if r["bytes_fetched"] is not None]
    return {"checkpoints": n + 1, "mode": mode, "samples": SAMPLES,
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in runs),
            "open_seconds_median": statistics.median(r["open_seconds"] for r in runs),
            "bytes_read_median": int(statistics.median(r["bytes_read"] for r in runs)),
            "bundle_bytes": total,
            "checkpoints_read_median": statistics.median(r["checkpoints_read"] for r in runs),
            "steps_replayed": runs[0]["steps_replayed"],
            "bytes_fetched_median": int(statistics.median(fetched)) if fetched else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true", help="Skip the loopback HTTP modes.")
    parser.add_argument("--model", default="mlp", help="mlp (the tiny MLP, default) or a built-in model with its default data.")
    parser.add_argument("--every", type=int, default=1, help="Steps per segment (default 1).")
    args = parser.parse_args()
    modes = ["lazy, uniform", "lazy, top-Q", "full (old)"] + ([] if args.no_http else ["http, directory", "http, archive"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        bundles, totals, servers = {}, {}, {}
        for n in args.lengths:
            t = time.perf_counter()
            path = bundles[n] = train_and_prove(_spec(n, args.model, args.every), Path(tmp) / f"b{n}").path
            totals[n] = sum(f.stat().st_size for f in (path / "checkpoints").iterdir())
            print(f"n={n}: trained in {time.perf_counter() - t:.1f} s, {totals[n] / 1e6:.2f} MB of checkpoints", flush=True)
            if not args.no_http:
                from pol.serve import serve_in_thread

                servers[n, "http, directory"] = stack.enter_context(serve_in_thread(path))
                servers[n, "http, archive"] = stack.enter_context(serve_in_thread(pack_bundle(path, Path(tmp) / f"b{n}.tar")))
        runs: dict[tuple[int, str], list[dict]] = {(n, mode): [] for n in args.lengths for mode in modes}
        for seed in range(args.rounds):  # interleaved: every length and mode once per round
            for n in args.lengths:
                for mode in modes:
                    runs[n, mode].append(_run(bundles[n], mode, seed, servers.get((n, mode))))
            print(f"round {seed + 1} of {args.rounds} done", flush=True)
        for (n, mode), done in runs.items():
            rows.append(_row(n, mode, done, totals[n]))
            print(rows[-1], flush=True)
    for row in rows:  # growth against the shortest bundle, same mode
        base = next(r for r in rows if r["mode"] == row["mode"])
        row["time_vs_shortest"] = row["seconds_median"] / base["seconds_median"]
        row["open_vs_shortest"] = row["open_seconds_median"] / base["open_seconds_median"]
        row["bytes_vs_shortest"] = row["bytes_read_median"] / base["bytes_read_median"]
    columns = ["checkpoints", "mode", "samples", "seconds_median", "time_vs_shortest", "cpu_seconds_median", "open_seconds_median",
               "open_vs_shortest", "bytes_read_median", "bytes_vs_shortest", "bytes_fetched_median",
               "checkpoints_read_median", "bundle_bytes", "steps_replayed"]
    default = args.model == "mlp" and args.every == 1
    name = "verify_scale" if default else f"verify_scale_{args.model}_k{args.every}"
    model = "mlp hidden 32" if args.model == "mlp" else f"{args.model} (default size and data)"
    write_results(name, {"rows": rows, "rounds": args.rounds, "model": f"{model}, k = {args.every}"}, markdown_table(rows, columns))


if __name__ == "__main__":
    main()
