"""What serving torch's random operators from pol.rng costs a native step, and what watching costs instead.

    python benchmarks/random_mode_overhead.py

`pol.randomness.RandomMode` is a dispatch mode: every operator of a step passes through Python. The engine pays it
only for models that draw random numbers (found in their first step); a model that draws nothing runs without it
while torch's generators are watched. This measures, for the built-in transformer (which draws nothing through
torch: its dropout masks come from pol.rng directly) at one thread, native steps (interleaved, best of 6 rounds
of 15 steps) with the mode forced on, and as the engine runs it (watched).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pol.engine as engine
from benchmarks._common import markdown_table, write_results
from pol.randomness import random_context
from pol.spec import spec_from_dict


def _timer(rt: engine.Runtime, n: int) -> float:
    started = time.perf_counter()
    engine.run_steps(rt, rt.step + n)
    return (time.perf_counter() - started) / n


def main() -> None:
    torch.set_num_threads(1)
    spec = spec_from_dict({"model": "transformer", "steps": 1000, "every": 1000})
    rt = engine.build_runtime(spec)
    engine.initial_state(rt)
    _timer(rt, 5)  # the first step runs under the mode and finds the model draws nothing
    assert rt.uses_random is False
    forced, watched = [], []
    for _ in range(6):
        rt.uses_random = None  # every step under the mode (as if its first)
        original = engine._randomness

        def always(rt_: engine.Runtime, step: int, micro: int):  # type: ignore[no-untyped-def]
            return random_context(rt_.spec.seed, "step", [step, micro])

        engine._randomness = always
        forced.append(_timer(rt, 15))
        engine._randomness = original
        rt.uses_random = False
        watched.append(_timer(rt, 15))
    rows = [{"model": "transformer (draws nothing)", "mode on every step, ms": min(forced) * 1e3,
             "as the engine runs it (watched), ms": min(watched) * 1e3, "ratio": min(forced) / min(watched)}]
    write_results("random_mode_overhead", {"rows": rows},
                  markdown_table(rows, ["model", "mode on every step, ms", "as the engine runs it (watched), ms", "ratio"]))


if __name__ == "__main__":
    main()
