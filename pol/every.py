"""The checkpoint interval k: proof cost against verification granularity (the protocol tax, issue 17).

A run of N steps checkpointed every k steps has n = ceil(N / k) segments and n + 1 checkpoints. In units of one
training step, with c the cost of one checkpoint (capturing, hashing and writing the state) and s(n) the segments
a verifier committee must replay to catch a cheater faking a fraction f of them with probability `confidence`
(the hypergeometric bound `compute_required_samples`; one sample shared by the committee):

    tax(k) = [ (n + 1) c  +  s(n) (k + 2 c) ] / N

(each replayed segment also reads and hashes its two end checkpoints, about a checkpoint's cost each). Proof falls
as 1/k and replay grows as k: once n is large s(n) is nearly constant (66 at 99.9% against f = 0.1) and the tax
is least near k* = sqrt(N c / s), where the two are equal. Short runs are different: s(n) approaches n, so replay
costs nearly the whole run whatever k is.

Two ways to choose k:

- **The default** (`pol.engine.compute_default_every`, what `pol train`/`pol job` use without `--every`): the
  smallest multiple of 10 (at least 10) keeping checkpoint output under `CHECKPOINT_BYTES_PER_STEP` bytes per step.
  A pure function of the model and optimizer, so the same flags give the same job id on every machine; it cannot
  know what a step costs, so it bounds the proof's bytes, not the tax.
- **Measured** (`--every auto`, `measured_every`): the step time and one checkpoint's cost measured on this
  machine (a few steps and one checkpoint of the job itself), and the k of least modelled tax over 1..N
  (`least_tax_every`). It grows with the run (about sqrt(N)); the job id then depends on the machine that
  measured, which is the caller's choice: it posts that spec. `benchmarks/protocol_tax.py` tabulates the tax
  against k (`games.cost`, the same model with the market's committee and read costs spelled out).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .components import CodePolicy
    from .spec import JobSpec

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_CHEAT_FRACTION",
    "MeasuredEvery",
    "compute_escape_probability",
    "compute_required_samples",
    "modelled_tax",
    "least_tax_every",
    "measured_every",
]

DEFAULT_CONFIDENCE, DEFAULT_CHEAT_FRACTION = 0.999, 0.1  # the detection the default k is sized for


def compute_escape_probability(n: int, samples: int, fraction: float) -> float:
    """Probability that `samples` distinct uniform segments out of `n` miss every one of ceil(fraction * n) faked."""
    bad = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    p = 1.0
    for i in range(min(samples, n)):
        p *= max(0, n - bad - i) / (n - i)
    return p


def compute_required_samples(n: int, confidence: float = DEFAULT_CONFIDENCE, fraction: float = DEFAULT_CHEAT_FRACTION) -> int:
    """Fewest uniform samples that catch a cheater of `fraction` with probability >= `confidence`: the smallest s
    with compute_escape_probability(n, s, fraction) <= 1 - confidence, found in one pass (the product grows by one
    factor per s, in the same order, so the same floats). The verifier (`pol.verify`) and the market
    (`games.cost`) size their samples with it; this module imports no torch."""
    bad = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    p = 1.0
    for s in range(1, n + 1):
        p *= max(0, n - bad - (s - 1)) / (n - (s - 1))
        if p <= 1.0 - confidence:
            return s
    return n


def modelled_tax(steps: int, every: int, checkpoint_steps: float, confidence: float = DEFAULT_CONFIDENCE,
                 fraction: float = DEFAULT_CHEAT_FRACTION) -> float:
    """tax(k) of the module docstring: protocol compute over training compute, for a checkpoint costing
    `checkpoint_steps` training steps."""
    n = -(-steps // every)
    s = compute_required_samples(n, confidence, fraction)
    return ((n + 1) * checkpoint_steps + s * (min(every, steps) + 2 * checkpoint_steps)) / steps


def _candidates(lo: int, hi: int) -> Iterable[int]:
    """Every k in [lo, hi] up to 200 values, else a geometric grid (ratio about 1.02) with both ends."""
    if hi - lo <= 200:
        return range(lo, hi + 1)
    grid = {lo, hi}
    k = float(lo)
    while k < hi:
        grid.add(int(round(k)))
        k *= 1.02
    return sorted(x for x in grid if lo <= x <= hi)


def least_tax_every(steps: int, checkpoint_steps: float, lo: int = 1, hi: int | None = None, *,
                    confidence: float = DEFAULT_CONFIDENCE, fraction: float = DEFAULT_CHEAT_FRACTION) -> int:
    """The k in [lo, hi] (default hi: the step count) of least modelled tax; ties go to the larger k."""
    hi = steps if hi is None else min(hi, steps)
    lo = max(1, min(lo, hi))
    best: tuple[float, int] | None = None
    for k in _candidates(lo, hi):
        tax = modelled_tax(steps, k, checkpoint_steps, confidence, fraction)
        if best is None or tax < best[0] or (tax == best[0] and k > best[1]):
            best = (tax, k)
    assert best is not None
    return best[1]


@dataclass(frozen=True, slots=True)
class MeasuredEvery:
    """What `measured_every` measured and chose."""

    every: int
    step_seconds: float  # median of the timed steps
    checkpoint_seconds: float  # capturing, hashing and writing one checkpoint
    checkpoint_steps: float  # checkpoint_seconds / step_seconds
    tax: float  # the modelled tax at `every`
    tax_at_default: float  # ... and at the default k
    default_every: int


def measured_every(spec: JobSpec, *, device: str = "cpu", data_dir: str | None = None, code: CodePolicy | None = None,
                   steps: int = 3) -> MeasuredEvery:
    """Measure this job on this machine (one warm-up step, `steps` timed steps, one checkpoint written to a
    temporary directory and removed) and choose the k of least modelled tax over 1..N. `spec.every` is ignored.
    Raises what building and stepping the job raises."""
    import statistics
    import tempfile
    import time

    from .bundle import write_checkpoint
    from .engine import build_runtime, capture_state, compute_default_every, initial_state, one_step

    rt = build_runtime(spec, device=device, data_dir=data_dir, code=code)
    initial_state(rt)
    times = []
    for i in range(min(steps + 1, spec.steps)):
        started = time.perf_counter()
        one_step(rt)
        if i:  # the first step warms caches and allocators
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times) if times else 1e-3
    with tempfile.TemporaryDirectory(prefix="pol-every-") as tmp:
        started = time.perf_counter()
        write_checkpoint(Path(tmp), rt.step, capture_state(rt), spec.job_id if spec.is_resolved else "0" * 64, {})
        checkpoint_s = time.perf_counter() - started
    c = checkpoint_s / max(step_s, 1e-9)
    k = least_tax_every(spec.steps, c)
    default = compute_default_every(spec, code)
    return MeasuredEvery(k, step_s, checkpoint_s, c, modelled_tax(spec.steps, k, c), modelled_tax(spec.steps, default, c),
                         default)
