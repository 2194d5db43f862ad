"""The protocol tax: what a verified task costs in compute beyond its training, measured and modelled.

    tax = protocol compute / training compute

Protocol compute is everything spent because the task is verified: the solver's proof overhead (hashing and writing
its checkpoints), the verifiers' replays (their sampled segments, and in native numerics the few steps each replays to
calibrate its thresholds), forced errors, and disputes (their rounds and the referee's work). `games.market` records
what a real market spends as `ComputeEntry`s and sums them with `compute_tax`; `CostModel` predicts the same figures
from a handful of measured quantities, so the simulation (`games.simulate`) and `benchmarks/protocol_tax.py` use one
model.

The model. A run of N steps of t seconds, checkpointed every k steps, has n = ceil(N / k) segments and n + 1
checkpoints of B bytes, each hashed (H bytes/s) and written (W bytes/s) by the solver:

    proof(k)  = (n + 1) * B * (1/H + 1/W)                                    seconds
    s(n)      = compute_required_samples(n, confidence, f)                   the hypergeometric bound of pol.verify
    verify(k) = m * s(n) * (k t + 2 B / H + 2 B / R) + m' * (c t + V)        m = 1 with one shared committee sample,
                                                                             m = committee size with independent ones
    tax(k)    = (proof(k) + verify(k)) / (N t)

where each replayed segment also reads (R bytes/s) and hashes its two end checkpoints, and each of the m' verifiers
that replays anything pays a fixed V (opening the bundle, building the model and data) and calibrates for c steps
(native numerics only; exact numerics compares bits, c = 0). A shared
sample is one sample of s(n) segments split among the committee, so the committee together reaches the task's
detection and m = 1; independent samples make every verifier reach it alone, m = committee size.

The rule for k (`best_every`). Since s(n) barely moves once n is large (it tends to ln(1 / (1 - confidence)) / f,
about 66 for 99.9% against f = 0.1), proof falls as 1/k and verify grows as k, and the tax is least near

    k* = sqrt(N * C / (m * s * t)),   C = B (1/H + 1/W) the cost of one checkpoint,

where the two terms are equal. `best_every` searches k exactly (s(n) included) rather than trusting the square
root. As a default for a spec (a pure function of the model and the run, the same on every machine), c can be
estimated as kappa x state bytes / FLOPs of one step, kappa the machine's FLOP rate over its checkpoint bandwidth
(about 30 FLOPs per byte on the 2-core CPU of benchmarks/protocol_tax.py), and k capped at N / (10 s) where the
run is long enough, so that replay stays near 10% or less: k = min(round(sqrt(N c / s)), max(1, N // (10 s))).
Unlike a rule from the state size alone, it grows with the run: the 10M-parameter MLP's k = 100 costs 49% at
10,000 steps (100 segments need 48 replayed) against 15% at k = 12, and 7% against 5% at 100,000 steps. The model leaves out disputes (none in an honest task; a dispute replays one segment on each side and the
referee one step, so it adds about 2 k t to a task that was cheated on) and forced errors (the solver re-publishes a
bundle it already has: checkpoint writes only).

Errors: `CostModel` and the functions here raise `games.errors.CostError` (a `BadMove`, rule 'cost.<field>') on a
figure out of range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from games.errors import CostError
from pol.every import compute_escape_probability  # the verifier's hypergeometric bound (pol.every imports no torch)
from pol.every import compute_required_samples as pol_required_samples

__all__ = [
    "COMPUTE_KINDS",
    "PROTOCOL_KINDS",
    "ComputeEntry",
    "CostError",
    "CostModel",
    "TaskCost",
    "TaxSummary",
    "best_every",
    "compute_escape_probability",
    "compute_required_samples",
    "compute_task_cost",
    "compute_tax",
    "compute_tax_curve",
]

Seconds = float
Steps = int

# what a party's compute was for: the training itself, or one of the protocol's costs
COMPUTE_KINDS = ("train", "proof", "forced_error", "replay", "calibration", "dispute", "referee")
PROTOCOL_KINDS = COMPUTE_KINDS[1:]
NUMERICS = ("exact", "native")


# ---------------------------------------------------------------------------------------------------- measured


@dataclass(frozen=True, slots=True)
class ComputeEntry:
    """Compute one party spent for a task: `steps` training steps (replayed ones for a verifier) and `seconds` of
    wall time, for `kind` (one of COMPUTE_KINDS) in verification round `round`."""

    party: str
    kind: str
    round: int
    steps: Steps
    seconds: Seconds
    note: str = ""


@dataclass(frozen=True, slots=True)
class TaxSummary:
    """Training compute, protocol compute and their ratio, in steps and in seconds."""

    training_steps: Steps
    training_seconds: Seconds
    protocol_steps: Steps
    protocol_seconds: Seconds
    tax_steps: float  # protocol steps / training steps (0 with no training)
    tax_seconds: float


def compute_tax(entries: Iterable[ComputeEntry]) -> TaxSummary:
    """Sum `entries` into training and protocol compute and their ratios. Raises CostError for an unknown kind or a
    negative figure."""
    train_steps = protocol_steps = 0
    train_s = protocol_s = 0.0
    for e in entries:
        if e.kind not in COMPUTE_KINDS or e.steps < 0 or e.seconds < 0:
            raise CostError("cost.entry", f"{e!r} has an unknown kind or a negative figure")
        if e.kind == "train":
            train_steps, train_s = train_steps + e.steps, train_s + e.seconds
        else:
            protocol_steps, protocol_s = protocol_steps + e.steps, protocol_s + e.seconds
    return TaxSummary(train_steps, train_s, protocol_steps, protocol_s,
                      protocol_steps / train_steps if train_steps else 0.0,
                      protocol_s / train_s if train_s > 0 else 0.0)


# ---------------------------------------------------------------------------------------------------- sampling


def compute_required_samples(n: int, confidence: float, fraction: float) -> int:
    """Fewest uniform samples out of `n` segments that catch a cheater of `fraction` with probability >=
    `confidence` (`pol.every.compute_required_samples`, after checking its arguments). Raises CostError for n < 1 or a probability outside
    (0, 1)."""
    if type(n) is not int or n < 1:
        raise CostError("cost.n_segments", f"{n!r} is not a positive int")
    _verify_probability(confidence, "cost.confidence")
    _verify_probability(fraction, "cost.cheat_fraction", upper_inclusive=True)
    return pol_required_samples(n, confidence, fraction)


def _verify_probability(value: object, rule: str, *, upper_inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and not (value <= 1 if upper_inclusive else value < 1):  # type: ignore[operator]
        ok = False
    if not ok:
        raise CostError(rule, f"{value!r} is not a probability in (0, 1{']' if upper_inclusive else ')'}")


# ---------------------------------------------------------------------------------------------------- modelled


@dataclass(frozen=True, slots=True)
class CostModel:
    """What the model needs; the first four are measured (`benchmarks/protocol_tax.py` measures them)."""

    step_seconds: Seconds  # one training step
    state_bytes: int  # one checkpoint (parameters, optimizer state, buffers)
    write_bytes_per_s: float = 1.0e9  # checkpoint write bandwidth
    hash_bytes_per_s: float = 1.0e9  # state hashing speed (blake3 over the tensors)
    read_bytes_per_s: float = 2.0e9  # a verifier reading a checkpoint back
    steps: Steps = 1_000  # N, the training run
    every: Steps = 10  # k, the checkpoint interval
    confidence: float = 0.999  # the task's required detection ...
    cheat_fraction: float = 0.1  # ... against a cheater faking this fraction of segments
    numerics: str = "exact"  # exact: no calibration; native: each replaying verifier calibrates
    calibration_steps: Steps = 6  # steps one native verifier replays to calibrate (pol.verify; measured)
    verifier_setup_seconds: Seconds = 0.0  # a verifier's fixed cost: opening the bundle, building the model and data
    committee: int = 3  # verifiers per task
    shared: bool = True  # one committee sample (True) or one independent sample per verifier (False)

    def __post_init__(self) -> None:
        if not isinstance(self.verifier_setup_seconds, (int, float)) or not 0 <= self.verifier_setup_seconds < math.inf:
            raise CostError("cost.verifier_setup_seconds", f"{self.verifier_setup_seconds!r} is not a non-negative number")
        for name in ("step_seconds", "write_bytes_per_s", "hash_bytes_per_s", "read_bytes_per_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise CostError(f"cost.{name}", f"{value!r} is not a positive number")
        for name in ("state_bytes", "steps", "every", "committee"):
            value = getattr(self, name)
            if type(value) is not int or value < (0 if name == "state_bytes" else 1):
                raise CostError(f"cost.{name}", f"{value!r} is not a positive int")
        if type(self.calibration_steps) is not int or self.calibration_steps < 0:
            raise CostError("cost.calibration_steps", f"{self.calibration_steps!r} is not a non-negative int")
        if self.numerics not in NUMERICS:
            raise CostError("cost.numerics", f"{self.numerics!r} is not one of {NUMERICS}")
        _verify_probability(self.confidence, "cost.confidence")
        _verify_probability(self.cheat_fraction, "cost.cheat_fraction", upper_inclusive=True)


@dataclass(frozen=True, slots=True)
class TaskCost:
    """The modelled compute of one honest task, in seconds (and the replayed steps), and the tax."""

    n_segments: int
    samples: int  # segments the committee replays in all (a shared sample) or each verifier replays (independent)
    training_seconds: Seconds
    proof_seconds: Seconds
    verify_seconds: Seconds  # every verifier together, calibration included
    verify_steps: Steps  # steps replayed by every verifier together, calibration included
    per_verifier_seconds: Seconds  # one verifier's share
    tax: float  # (proof + verify) / training

    @property
    def proof_tax(self) -> float:
        return self.proof_seconds / self.training_seconds

    @property
    def verify_tax(self) -> float:
        return self.verify_seconds / self.training_seconds


def compute_task_cost(model: CostModel) -> TaskCost:
    """The modelled compute of an honest task under `model` (see the module docstring for the formulas)."""
    n = -(-model.steps // model.every)
    k = model.steps / n  # mean segment length (the last one may be shorter)
    checkpoint = model.state_bytes * (1 / model.hash_bytes_per_s + 1 / model.write_bytes_per_s)
    proof = (n + 1) * checkpoint
    s = compute_required_samples(n, model.confidence, model.cheat_fraction)
    readers = 1 if model.shared else model.committee  # how many times the required sample is replayed
    replaying = min(model.committee, s) if model.shared else model.committee  # verifiers with a non-empty share
    calibration = model.calibration_steps if model.numerics == "native" else 0
    per_segment = k * model.step_seconds + 2 * model.state_bytes * (1 / model.hash_bytes_per_s
                                                                     + 1 / model.read_bytes_per_s)
    verify = (readers * s * per_segment + replaying * calibration * model.step_seconds
              + replaying * model.verifier_setup_seconds)
    steps = round(readers * s * k) + replaying * calibration
    training = model.steps * model.step_seconds
    return TaskCost(n, s, training, proof, verify, steps, verify / model.committee, (proof + verify) / training)


def compute_tax_curve(model: CostModel, everies: Sequence[int]) -> tuple[tuple[int, TaskCost], ...]:
    """The task cost for each k in `everies` (other figures as in `model`). Raises CostError for a bad k."""
    return tuple((k, compute_task_cost(dataclasses.replace(model, every=k))) for k in everies)


def best_every(model: CostModel, *, candidates: Sequence[int] | None = None) -> int:
    """The checkpoint interval k that minimises the tax of `model` (its own `every` is ignored). Searches
    `candidates` (default: every k from 1 to the step count, thinned geometrically above 1000 candidates); ties go
    to the larger k (fewer checkpoints to store). The closed-form optimum it approximates is
    sqrt(N C / (m s t)) (module docstring)."""
    if candidates is None:
        top = model.steps
        candidates = range(1, top + 1) if top <= 1000 else sorted({max(1, round(top ** (i / 1000)))
                                                                     for i in range(1001)})
    best: tuple[float, int] | None = None
    for k in candidates:
        tax = compute_task_cost(dataclasses.replace(model, every=k)).tax
        if best is None or tax < best[0] or (tax == best[0] and k > best[1]):
            best = (tax, k)
    if best is None:
        raise CostError("cost.candidates", "no candidate k")
    return best[1]
