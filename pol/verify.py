"""Verification: replay a few randomly chosen segments of a proof bundle and accept or reject.

Checks, in order (DESIGN sections 5 and 8):
  1. the bundle: the manifest, records, Merkle root, commitment and file table (`open_bundle(full=False)`: no
     checkpoint byte is read to open it; each checkpoint's digest is checked on the bytes read, when and only when
     verification reads it, so a corrupt checkpoint outside the sample costs nothing and one inside it is a REJECT;
     `Report.bytes_read` counts what was read; largest-update ranking reads none: it ranks by the update norms the
     records commit, `committed_update_norms`); the job the caller asked
     for (`expected_job`, the job id of the spec it posted: any other job is a REJECT, "wrong job") and the
     commitment it expects, if it names them;
  2. its pol (and, for exact numerics, torch) must be the versions the spec names (else `VersionMismatch`), the
     user code it names must be on the verifier's allow-list (else `CodeNotAllowed`, said before anything is
     imported) and the same code as the spec pins (else `CodeDiffers`), and the verifier's data must hash to the
     spec's data digest (else `DataDiffers`): in each case the verifier cannot judge, which is not fraud;
  3. the step-0 state, recomputed from the seed, must equal the committed one exactly;
  4. segments drawn from randomness the solver could not know when it committed: fresh randomness by default, or a
     public beacon (at least 128 bits) drawn after the commitment; `seed` makes the sample reproducible and
     predictable, and the report says so. Uniform plus a share of largest-update segments, ranked by the records'
     committed update norms (the solver's claims: each replayed segment's claim must equal its checkpoints' norm,
     `check_update_norm`, else REJECT; a solver understating its faked segments' norms only turns the
     largest-update share into more uniform-like picks, so the escape probabilities count the uniform samples
     only). Before any replay, every
     sampled checkpoint's tensor names, dtypes and shapes are checked against the spec (a missing, extra or
     reshaped tensor is a REJECT naming it). Each segment is replayed from its committed start state with the
     batches re-derived from the spec, and compared: its data digest, its mean training loss (the committed loss
     is not a free field: exact numerics bit for bit, native within a calibrated tolerance) and its end state
     (exact numerics by digest, native numerics by distances against thresholds the verifier calibrates itself
     from honest replays under deliberately different conditions: threads, micro-batch split; on segments of at
     least 9 steps only the first CALIBRATION_STEPS are replayed perturbed and the spread is extrapolated, see
     `calibrate_thresholds`; calibration steps are counted in the compute fraction, `Report.calibration_steps`);
  5. certified evaluation (a spec with `evaluation`): the committed metrics of every checkpoint the verifier
     touches (step 0, the start and end of every replayed segment) and always of the final checkpoint, each
     state read from the bundle and checked against its digest first, are recomputed on the verifier's own copy of
     the evaluation data (`pol.evaluate`): exact numerics bit for bit, native within `pol.evaluate.eval_tolerance`.
     A mismatch is a REJECT naming the metric and the step; on ACCEPT the report states the final metrics as
     certified (`Report.evaluation`).

The solver never supplies randomness, hyper-parameters or thresholds: all come from the spec or the verifier.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, rng
from .bundle import Bundle, open_bundle
from .canonical import Digest, compute_hash, is_digest
from .components import CodePolicy
from .digest import state_digest, tensor_digests
from .engine import Runtime, build_runtime, capture_state, initial_state, restore_state, run_steps, verify_layout
from .errors import (
    BundleError,
    BundleNotFound,
    BundleVersionError,
    CannotVerifySoundly,
    PolError,
    RemoteError,
    UsageError,
    VersionMismatch,
)
from .evaluate import EVAL_ABS_TOL, EVAL_FLIP_SHARE, EVAL_REL_TOL, Evaluator, build_eval_dataset, compare_eval, values_of
from .every import compute_escape_probability, compute_required_samples  # the hypergeometric bound, re-exported
from .spec import JobSpec
from .trace import compute_update_norm
from .zoo import is_zoo_model

__all__ = [
    "Thresholds",
    "SegmentCheck",
    "EvalCheck",
    "EvalReport",
    "Report",
    "verify",
    "check_versions",
    "compute_escape_probability",
    "compute_required_samples",
    "derive_randomness",
    "choose_segments",
    "compare_states",
    "calibrate_thresholds",
    "MIN_BEACON_BYTES",
    "is_batch_coupled",
    "split_changes_math",
    "verify_sound",
]

ProgressCallback = Callable[[int, int], None]  # (steps replayed so far, steps to replay in all)

MAX_WORLD = 1 << 16  # data-parallel processes a bundle may say it was trained on (for calibration only)
CALIBRATION_MARGIN = 10.0  # thresholds sit this far above the largest honest spread the verifier observed
CALIBRATION_STEPS = 3  # calibration replays this many steps under perturbed conditions and extrapolates
# ... on segments of at least this many steps; shorter ones are calibrated whole (2 replays of at most 8 steps: the
# extrapolation's uncertainty buys little there, and one perturbed draw runs up to 2.5x below the largest of two)
FEW_STEP_MIN_SEGMENT = 3 * CALIBRATION_STEPS
FLOOR_REL_L2 = 1e-5  # never tighter than this relative L2 distance per tensor (float32 drift over k steps)
FLOOR_LOG_RATIO = 1e-4  # never tighter than this |log| of the update norm ratio
FLOOR_COSINE_GAP = 1e-6  # the update cosine threshold is at most 1 minus this
ABS_FLOOR_RMS = 1e-3  # relative L2 distances are measured against at least this RMS per element
FLOOR_LOSS_REL = 1e-5  # never tighter than this relative difference of a segment's mean loss (native numerics)
# Hard caps on native thresholds. The built-in models need at most rel L2 2.8e-2 (cnn: 10 x an honest spread of
# 2.8e-3), an update cosine of 0.999997, |log norm ratio| 1.2e-4 and a loss gap of 7e-6; the caps sit about 2x
# above. A threshold beyond them would accept updates a cheater can shape (a ResNet's BatchNorm split calibrated
# rel L2 <= 14.5 on main): the verdict is then "cannot verify soundly in native numerics", never ACCEPT.
CAP_REL_L2 = 5e-2
CAP_MIN_COSINE = 0.99
CAP_LOG_RATIO = 5e-2
CAP_LOSS_REL = 1e-3
MIN_BEACON_BYTES = 16  # a beacon carries at least 128 bits
REPORT_FRACTIONS = (0.01, 0.05, 0.1, 0.25)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How far a replay may stray from the claimed state before the segment is rejected (native numerics)."""

    rel_l2: float  # max per-tensor ||replayed - claimed|| / ||claimed||
    min_cosine: float  # min cosine between replayed and claimed update (end - start) of the parameters
    max_log_ratio: float  # max |log(||claimed update|| / ||replayed update||)|
    loss_rel: float = FLOOR_LOSS_REL  # max |claimed - replayed| / |replayed| of a segment's mean training loss
    calibrated_on: int | None = None  # the segment the spread was measured on
    observed: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SegmentCheck:
    index: int  # segment i goes from record i-1 to record i
    start: int
    end: int
    why: str  # "uniform" or "largest-update" (why it was sampled) or "forced"
    ok: bool
    problem: str | None  # for a failed check: what differed
    data_ok: bool
    max_rel_l2: float | None = None
    worst_tensor: str | None = None
    update_cosine: float | None = None
    log_norm_ratio: float | None = None
    differing_tensors: tuple[str, ...] = ()
    claimed_loss: float | None = None  # the segment's mean loss as committed
    replayed_loss: float | None = None  # ... and as the replay computed it


@dataclass(frozen=True, slots=True)
class EvalCheck:
    """One checkpoint's committed evaluation against the verifier's recomputation."""

    step: int
    ok: bool
    claimed: dict[str, float] | None
    recomputed: dict[str, float]
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class EvalReport:
    """What the verifier certifies about the evaluation: the final checkpoint's metrics (as committed; on ACCEPT
    each is the verifier's own value, bit for bit in exact numerics, within `tolerance` in native), on the
    evaluation data with digest `data`, and every checkpoint it checked."""

    data: Digest
    metrics: tuple[str, ...]
    final_step: int
    final_checked: bool  # the final checkpoint's metrics were recomputed (always, unless verification stopped early)
    final: dict[str, float] | None  # the committed final metrics
    final_recomputed: dict[str, float] | None  # ... and as this verifier computed them
    checked_steps: tuple[int, ...]
    checks: tuple[EvalCheck, ...]
    tolerance: str  # "bit for bit" or the native rule
    seconds: float = 0.0  # time spent evaluating

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def describe(self) -> str:
        """One line: the final metrics, the data and the steps checked."""
        final = self.final or {}
        values = ", ".join(f"{name} {final[name]:.4g}" for name in self.metrics if name in final)
        steps = ", ".join(str(s) for s in self.checked_steps)
        where = f"final checkpoint (step {self.final_step}) {'checked' if self.final_checked else 'NOT checked'}"
        return f"eval {values} on the committed evaluation set (data {self.data[:12]}), checked at steps {steps}; {where}"


@dataclass(frozen=True, slots=True)
class Report:
    verdict: str  # "accept" or "reject"
    reason: str
    job_id: Digest | None
    root: Digest | None
    numerics: str | None
    randomness: str  # hex: replay this exact sample with --beacon
    randomness_source: str  # "fresh", "beacon" or "seed" (predictable: see sample_predictable)
    segments_total: int
    checks: tuple[SegmentCheck, ...]
    steps_replayed: int
    steps_total: int
    compute_fraction: float  # steps replayed (including calibration) / training steps
    escape_probability: dict[str, float]  # cheat fraction -> probability a cheater of that fraction escaped
    thresholds: Thresholds | None
    seconds: float = 0.0
    expected_job: Digest | None = None  # the job the caller asked for, if it named one
    evaluation: EvalReport | None = None  # certified evaluation, when the spec names one
    calibration_steps: int = 0  # steps replayed only to calibrate (native numerics), counted in steps_replayed
    bytes_read: int = 0  # checkpoint bytes this verification read from the bundle (headers included)
    checkpoints_read: int = 0  # checkpoint files it read in full, each digest-checked on the bytes read
    uniform_samples: int = 0  # segments drawn uniformly: the escape probabilities count these only
    largest_samples: int = 0  # segments drawn among the largest committed update norms (the solver's claims)

    @property
    def certified_metrics(self) -> dict[str, float] | None:
        """The final checkpoint's metrics, if this report certifies them: accepted, and the final checkpoint's
        evaluation recomputed and matched. None otherwise (no evaluation, rejected, or not checked)."""
        ev = self.evaluation
        if not self.accepted or ev is None or not ev.final_checked or not ev.ok or ev.final is None:
            return None
        return dict(ev.final)

    @property
    def accepted(self) -> bool:
        return self.verdict == "accept"

    @property
    def sample_predictable(self) -> bool:
        """True when the sample came from a seed: a solver who knew it could have chosen what to fake, and the
        escape probabilities assume it did not."""
        return self.randomness_source == "seed"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sample_predictable": self.sample_predictable, "certified_metrics": self.certified_metrics}


def derive_randomness(seed: int | None = None, beacon: str | None = None) -> tuple[bytes, str]:
    """32 bytes of sampling randomness, and where they came from. Raises UsageError on a malformed beacon.

    Fresh randomness (the default) and a beacon drawn after the commitment are unknown to the solver when it
    commits; a seed is not secret once used, so a sample drawn from it is reproducible and predictable."""
    if seed is not None and beacon is not None:
        raise UsageError("give either a seed or a beacon, not both")
    if beacon is not None:
        if not isinstance(beacon, str) or len(beacon) > 128 or not all(c in "0123456789abcdefABCDEF" for c in beacon) or len(beacon) % 2:
            raise UsageError(f"beacon {str(beacon)[:20]!r} is not hex")
        value = bytes.fromhex(beacon)
        if not MIN_BEACON_BYTES <= len(value) <= 64:
            raise UsageError(f"a beacon must be {MIN_BEACON_BYTES} to 64 bytes ({8 * MIN_BEACON_BYTES} to 512 bits) of hex")
        return value, "beacon"
    if seed is not None:
        return compute_hash("pol/verifier-seed/v1", str(seed).encode()), "seed"
    return secrets.token_bytes(32), "fresh"


def committed_update_norms(bundle: Bundle) -> list[float]:
    """The update norm each segment i = 1..n claims (its record's `update`): largest-update ranking reads no
    checkpoint. They are the solver's claims, checked for every replayed segment (`check_update_norm`)."""
    return [float(r.update) for r in bundle.records[1:]]  # type: ignore[arg-type]  # non-null past record 0 (manifest)


def check_update_norm(start: Mapping[str, torch.Tensor], claimed: Mapping[str, torch.Tensor], committed: float | None) -> str | None:
    """None when a segment's committed update norm is the norm of its two committed checkpoints (bit for bit:
    `compute_update_norm` is a function of their bytes), else the problem."""
    actual = compute_update_norm(start, claimed)
    if committed != actual:
        return (f"the committed update norm {committed!r} is not its checkpoints' update norm {actual!r} (a solver "
                "misstating norms steers largest-update sampling)")
    return None


def choose_segments(
    n: int, randomness: bytes, root: Digest, uniform: int, largest: int, update_norms: Sequence[float] | None
) -> list[tuple[int, str]]:
    """Segments (1-based) to replay: `uniform` drawn uniformly, then `largest` drawn among the 2x`largest`
    segments with the biggest committed updates (PoL-style). All draws are keyed by the randomness and the root."""
    key = int.from_bytes(compute_hash("pol/verify-sample/v1", randomness, bytes.fromhex(root))[:8], "little")
    order = rng.permutation(key, "verify/uniform", [], n)
    chosen = [(int(i) + 1, "uniform") for i in order[: min(uniform, n)]]
    taken = {i for i, _ in chosen}
    if largest and update_norms:
        # by norm, largest first, ties by segment number (a stable sort of the negated norms: O(n log n) in C)
        ranked = [int(i) + 1 for i in np.argsort(-np.asarray(update_norms, dtype=np.float64), kind="stable")]
        pool = [i for i in ranked if i not in taken][: 2 * largest]
        picks = rng.permutation(key, "verify/largest", [], len(pool))[:largest]
        chosen += [(pool[int(j)], "largest-update") for j in picks]
    return sorted(chosen)


def _float_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in sorted(state) if state[n].is_floating_point()]


def _update_stats(start: dict, a: dict, b: dict) -> tuple[float | None, float | None]:
    """Cosine between the updates a-start and b-start (parameters), and |log| of their norm ratio."""
    names = [n for n in sorted(a) if n.startswith("param/")]
    ua = torch.cat([(a[n].double() - start[n].double()).reshape(-1) for n in names])
    ub = torch.cat([(b[n].double() - start[n].double()).reshape(-1) for n in names])
    na, nb = float(ua.norm()), float(ub.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0, 0.0
    if na == 0.0 or nb == 0.0:
        return 0.0, math.inf
    return float(ua @ ub) / (na * nb), abs(math.log(na / nb))


def compare_states(start: dict, claimed: dict, replayed: dict) -> dict[str, Any]:
    """Distances between a replayed and a claimed end state (both from the same start)."""
    differing = [n for n in sorted(claimed) if not torch.equal(claimed[n], replayed[n])]
    worst, worst_name = 0.0, None
    for n in _float_names(claimed):
        c, r = claimed[n].double(), replayed[n].double()
        # relative to the tensor's norm, floored at an RMS of ABS_FLOOR_RMS per element: a tensor the mathematics
        # keeps at zero (a bias before batch norm, its momentum) holds only rounding noise, and noise relative to
        # noise would make every honest replay look different
        rel = float((r - c).norm()) / max(float(c.norm()), ABS_FLOOR_RMS * math.sqrt(max(c.numel(), 1)))
        if not math.isfinite(rel):
            rel = math.inf
        if rel > worst or worst_name is None:
            worst, worst_name = rel, n
    exact_ints = all(torch.equal(claimed[n], replayed[n]) for n in claimed if not claimed[n].is_floating_point())
    cosine, log_ratio = _update_stats(start, claimed, replayed)
    return {"differing": differing, "max_rel_l2": worst, "worst_tensor": worst_name, "ints_equal": exact_ints,
            "cosine": cosine, "log_ratio": log_ratio}


@dataclass(frozen=True, slots=True)
class _Replayed:
    state: dict[str, torch.Tensor]
    data: Digest
    loss: float | None


def _replay(rt: Runtime, start_state: dict, end: int, *, microbatch: int | None = None, threads: int | None = None,
            mkldnn: int = 1, groups: int = 1, on_step: Callable[[int, float], None] | None = None) -> _Replayed:
    previous_threads, previous_mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    if threads:
        torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = bool(mkldnn)  # (its flags() context also sets TF32 and warns about it)
    rt.reduce_groups = groups
    try:
        restore_state(rt, start_state)
        segment = run_steps(rt, end, microbatch=microbatch, on_step=on_step)
        return _Replayed(capture_state(rt), segment.data_digest, segment.loss)
    finally:
        torch.set_num_threads(previous_threads)
        torch.backends.mkldnn.enabled = previous_mkldnn
        rt.reduce_groups = 1


def _loss_gap(claimed: float | None, replayed: float | None) -> float:
    """Relative difference of two segment losses (inf if one is missing)."""
    if claimed is None or replayed is None:
        return 0.0 if claimed == replayed else math.inf
    return abs(claimed - replayed) / max(abs(replayed), 1e-12)


def is_batch_coupled(model: torch.nn.Module) -> bool:
    """True if a layer mixes the rows of a batch (batch norm's statistics): splitting such a batch changes the
    step's mathematics, not only its rounding."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def split_changes_math(rt: Runtime) -> str | None:
    """Why splitting this runtime's batch into other micro-batches would change the step's mathematics (not only
    its rounding), or None if a split is a free execution choice: batch norm (its statistics), random draws (keyed
    by micro-batch), a user step (it sees one micro-batch and may couple its rows or draw per micro-batch)."""
    if is_batch_coupled(rt.model):
        return "has batch norm, whose statistics"
    if rt.uses_random:
        return "draws random numbers, which are keyed by micro-batch and"
    if rt.spec.step_fn is not None:
        return "runs a user step, whose results may"
    return None


def recorded_world(bundle: Bundle) -> int:
    """How many data-parallel processes the bundle says trained it (`env["processes"]`, information outside every
    digest: it only adds a calibration perturbation), 1 if it says nothing sensible."""
    value = bundle.manifest.env.get("processes", 1)
    return value if isinstance(value, int) and 1 <= value <= MAX_WORLD else 1


def _perturbations(rt: Runtime, world: int = 1) -> list[dict[str, int]]:
    """Honest ways to run a step that leave its mathematics unchanged: another thread count, and another batch
    split (an execution choice the solver may make) or, for a batch-coupled model or one that draws random numbers
    (keyed by micro-batch), oneDNN kernels off; and for a native bundle trained on `world` > 1 data-parallel
    processes, the micro-batch gradients summed in `world` groups as those processes' all-reduce would
    (`Runtime.reduce_groups`)."""
    batch_size, spec_micro = rt.spec.batch_size, rt.spec.microbatch
    out: list[dict[str, int]] = [{"threads": 1 if torch.get_num_threads() > 1 else 2}]
    if world > 1 and rt.spec.numerics == "native" and (spec_micro or batch_size) < batch_size:
        out.append({"groups": world})
    if split_changes_math(rt):  # e.g. random draws are keyed by micro-batch: a split redraws them
        return [*out, {"mkldnn": 0}]
    current = spec_micro or batch_size
    for parts in (2, 4, 3):
        if batch_size % parts == 0 and batch_size // parts != current:
            out.append({"microbatch": batch_size // parts})
            break
    else:
        if current != batch_size:
            out.append({"microbatch": batch_size})
    return out


def _combined_perturbation(rt: Runtime, world: int = 1) -> dict[str, int]:
    """Every change of `_perturbations` at once (another thread count and another batch split, or oneDNN off):
    one perturbed replay that differs from the reference in all the ways an honest solver's run may."""
    combined: dict[str, int] = {}
    for change in _perturbations(rt, world):
        combined.update(change)
    return combined


def _spread(start: dict, reference: dict, other: dict, ref_loss: float | None, other_loss: float | None) -> dict[str, float]:
    """The four spreads calibration measures between a reference and a perturbed replay from `start`: worst
    relative L2, update cosine gap (1 - cosine), |log| update norm ratio, relative loss gap."""
    d = compare_states(start, reference, other)
    return {"rel_l2": d["max_rel_l2"], "cosine_gap": 1.0 - d["cosine"] if d["cosine"] is not None else 0.0,
            "log_ratio": d["log_ratio"] if d["log_ratio"] is not None else 0.0, "loss_rel": _loss_gap(other_loss, ref_loss)}


def _extrapolate(first: float, after: float, s: int, span: int) -> float:
    """A spread measured after the first step (`first`) and after s steps (`after`), extrapolated to a segment of
    `span` steps: the growth per step after the first, (after - first) / (s - 1), goes on linearly. (The first step
    starts from one state, so its spread is one gradient's rounding; what compounds is the growth from there: for
    the built-in transformer, linear within 25% over 10 steps, where a power law fitted from the first step
    overshot 3x.) Never below `after`; a non-finite spread stays non-finite (`verify_sound` refuses it)."""
    if not math.isfinite(after) or not math.isfinite(first):
        return math.inf
    return after + max(0.0, after - first) * (span - s) / (s - 1)


def _thresholds_from(observed: dict[str, float], segment: int, **extra: Any) -> Thresholds:
    rel, gap, ratio, loss = observed["rel_l2"], observed["cosine_gap"], observed["log_ratio"], observed["loss_rel"]
    return Thresholds(
        rel_l2=max(CALIBRATION_MARGIN * rel, FLOOR_REL_L2),
        min_cosine=min(1.0 - CALIBRATION_MARGIN * gap, 1.0 - FLOOR_COSINE_GAP),
        max_log_ratio=max(CALIBRATION_MARGIN * ratio, FLOOR_LOG_RATIO),
        loss_rel=max(CALIBRATION_MARGIN * loss, FLOOR_LOSS_REL),
        calibrated_on=segment,
        observed={"rel_l2": rel, "cosine": 1.0 - gap, "log_ratio": ratio, "loss_rel": loss, **extra},
    )


def calibrate_thresholds(
    rt: Runtime, bundle: Bundle, segment: int, threads: int | None = None, *, steps: int | None = CALIBRATION_STEPS,
    start: dict[str, torch.Tensor] | None = None,
) -> tuple[Thresholds, int, _Replayed]:
    """Measure the honest spread of a replay under perturbed conditions; set thresholds above it.

    The reference is the segment's own replay (under the check's conditions), which is also that segment's check,
    so it costs nothing extra. With `steps` = s (the default, CALIBRATION_STEPS) and a segment longer than s, one
    perturbed replay (`_combined_perturbation`) runs only the segment's first s steps: the spread between it and
    the reference after 1 and after s steps gives each measure's growth per step past the first, and the spread
    over the whole segment of L steps is extrapolated linearly from there (`_extrapolate`) before the margin and
    floors. Calibration then replays s extra steps instead of 2 L (3 of the 40 a default verification of
    4 segments at k = 10 replays). `steps=None`, or a segment shorter than FEW_STEP_MIN_SEGMENT (3 s) steps,
    replays the whole segment once per perturbation (`_perturbations`), as pol did before.

    Returns the thresholds, the number of steps replayed (the reference included), and the reference replay.
    """
    start_rec, end_rec = bundle.records[segment - 1], bundle.records[segment]
    span = end_rec.step - start_rec.step
    if start is None:
        start = bundle.load_state(start_rec.step)
    if steps is None or span < max(steps + 1, FEW_STEP_MIN_SEGMENT):
        reference = _replay(rt, start, end_rec.step, threads=threads)
        worst = {"rel_l2": 0.0, "cosine_gap": 0.0, "log_ratio": 0.0, "loss_rel": 0.0}
        replayed = span
        for change in _perturbations(rt, recorded_world(bundle)):
            other = _replay(rt, start, end_rec.step, **change)
            spread = _spread(start, reference.state, other.state, reference.loss, other.loss)
            worst = {k: max(v, spread[k]) for k, v in worst.items()}
            replayed += span
        return _thresholds_from(worst, segment, steps=float(span), segment_steps=float(span)), replayed, reference
    s = steps
    marks = (start_rec.step + 1, start_rec.step + s)

    def snapshots(into: dict[int, dict], losses: list[float]) -> Callable[[int, float], None]:
        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            if step in marks:
                into[step] = capture_state(rt)
        return on_step

    ref_states: dict[int, dict] = {}
    ref_losses: list[float] = []
    reference = _replay(rt, start, end_rec.step, threads=threads, on_step=snapshots(ref_states, ref_losses))
    other_states: dict[int, dict] = {}
    other_losses: list[float] = []
    _replay(rt, start, marks[1], **_combined_perturbation(rt, recorded_world(bundle)), on_step=snapshots(other_states, other_losses))
    spreads = [_spread(start, ref_states[mark], other_states[mark], _mean(ref_losses[: mark - start_rec.step]),
                       _mean(other_losses[: mark - start_rec.step])) for mark in marks]
    observed: dict[str, float] = {}
    extra: dict[str, float] = {"steps": float(s), "segment_steps": float(span)}
    for key in spreads[1]:
        observed[key] = _extrapolate(spreads[0][key], spreads[1][key], s, span)
        extra[f"{key}_after_1_step"] = spreads[0][key]
        extra[f"{key}_after_{s}_steps"] = spreads[1][key]
    return _thresholds_from(observed, segment, **extra), span + s, reference


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def verify_sound(thresholds: Thresholds) -> None:
    """Raise CannotVerifySoundly if a calibrated threshold is beyond its hard cap (the honest spread is too large
    for native numerics to tell an honest replay from a shaped one)."""
    over = [(name, got, cap) for name, got, cap, beyond in (
        ("relative L2", thresholds.rel_l2, CAP_REL_L2, thresholds.rel_l2 > CAP_REL_L2),
        ("update cosine", thresholds.min_cosine, CAP_MIN_COSINE, thresholds.min_cosine < CAP_MIN_COSINE),
        ("log norm ratio", thresholds.max_log_ratio, CAP_LOG_RATIO, thresholds.max_log_ratio > CAP_LOG_RATIO),
        ("loss", thresholds.loss_rel, CAP_LOSS_REL, thresholds.loss_rel > CAP_LOSS_REL),
    ) if beyond]
    if over:
        name, got, cap = over[0]
        raise CannotVerifySoundly(
            f"cannot verify soundly in native numerics: the honest spread of a replay (observed {thresholds.observed}) "
            f"needs a {name} threshold of {got:.3g}, beyond the cap {cap:g}; train with --numerics exact"
        )


def _judge(index: int, why: str, start: dict, claimed: dict, replayed: _Replayed, claimed_loss: float | None, exact: bool,
           thresholds: Thresholds | None, start_step: int, end_step: int) -> SegmentCheck:
    d = compare_states(start, claimed, replayed.state)
    base = {"index": index, "start": start_step, "end": end_step, "why": why, "data_ok": True,
            "max_rel_l2": d["max_rel_l2"], "worst_tensor": d["worst_tensor"], "update_cosine": d["cosine"],
            "log_norm_ratio": d["log_ratio"], "differing_tensors": tuple(d["differing"][:20]),
            "claimed_loss": claimed_loss, "replayed_loss": replayed.loss}
    problems = []
    if exact and claimed_loss != replayed.loss:
        problems.append(f"the committed loss {claimed_loss!r} is not the replayed loss {replayed.loss!r} (exact numerics: bit for bit)")
    if not exact and thresholds is not None and _loss_gap(claimed_loss, replayed.loss) > thresholds.loss_rel:
        problems.append(f"the committed loss {claimed_loss!r} is {_loss_gap(claimed_loss, replayed.loss):.3g} away from the "
                        f"replayed loss {replayed.loss!r} (relative) > threshold {thresholds.loss_rel:.3g}")
    if exact:
        if d["differing"]:
            problems.insert(0, f"state digest differs in {len(d['differing'])} tensors (first: {d['differing'][0]})")
        return SegmentCheck(ok=not problems, problem="; ".join(problems) or None, **base)
    assert thresholds is not None
    if not d["ints_equal"]:
        problems.append("integer state (step counter) differs")
    if d["max_rel_l2"] > thresholds.rel_l2:
        problems.append(f"{d['worst_tensor']} is {d['max_rel_l2']:.3g} away (relative L2) > threshold {thresholds.rel_l2:.3g}")
    if d["cosine"] is not None and d["cosine"] < thresholds.min_cosine:
        problems.append(f"update cosine {d['cosine']:.6f} < threshold {thresholds.min_cosine:.6f}")
    if d["log_ratio"] is not None and d["log_ratio"] > thresholds.max_log_ratio:
        problems.append(f"update norm ratio off by |log| {d['log_ratio']:.3g} > threshold {thresholds.max_log_ratio:.3g}")
    return SegmentCheck(ok=not problems, problem="; ".join(problems) or None, **base)


@dataclass(frozen=True, slots=True)
class _Request:
    """One verification's settings, checked once by `verify`."""

    randomness: bytes
    source: str
    started: float
    samples: int | None
    confidence: float | None
    cheat_fraction: float | None
    forced: Sequence[int] | None
    largest: int | None
    expected_root: Digest | None
    expected_job: Digest | None
    code: CodePolicy
    device: str
    threads: int | None
    data_dir: str | None
    on_progress: ProgressCallback | None
    eval_data_dir: str | None = None
    nproc: int = 1
    reads: dict[str, Any] = field(default_factory=dict)  # read counters at the start, and whether ranking read all


def verify(
    bundle: str | Path | Bundle,
    *,
    samples: int | None = None,
    confidence: float | None = None,
    cheat_fraction: float | None = None,
    seed: int | None = None,
    beacon: str | None = None,
    segments: Sequence[int] | None = None,
    largest: int | None = None,
    expected_root: Digest | None = None,
    expected_job: Digest | None = None,
    code: CodePolicy | None = None,
    device: str = "cpu",
    threads: int | None = None,
    data_dir: str | None = None,
    on_progress: ProgressCallback | None = None,
    eval_data_dir: str | None = None,
    nproc: int = 1,
) -> Report:
    """Verify a proof bundle by sampled replay. Returns a Report whose verdict is "accept" or "reject".

    `samples` segments in all, or enough uniform ones for `confidence` against `cheat_fraction` (plus a share of
    largest-update ones: a quarter by default, or `largest`); `segments` forces a list (1-based). Randomness is
    fresh unless a `beacon` (drawn after the commitment) or a `seed` (reproducible, predictable) is given.
    `expected_job` (the job id of the spec the caller posted) and `expected_root` (the commitment it expects)
    reject any other bundle. `code` names the user code the verifier allows (default: pol's built-ins only).
    A spec's evaluation is recomputed on the verifier's evaluation data (`eval_data_dir` for a `dir:` dataset) for
    step 0, every replayed segment's ends and the final checkpoint (`Report.evaluation`, `certified_metrics`).
    `nproc` > 1 replays the sampled segments on that many worker processes at once (CUDA devices in turn for
    `device="cuda"`), each with `threads` (default: this process's threads / nproc): the same sample, checks and
    verdict as one process; `bytes_read` then counts every process's reads.

    Raises (the verifier cannot judge): UsageError on bad arguments, BundleNotFound/BundleVersionError when the path
    is not a readable bundle, CodeNotAllowed (before anything is imported), CodeDiffers, DataDiffers when the local
    data (or evaluation data: EvalDataDiffers) is not the committed data, DataNotProvided, VersionMismatch when the bundle was made by another pol (or, in exact
    numerics, torch), ComponentError, DeviceUnavailable, NumericsUnavailable. A bundle that fails its integrity
    checks is *rejected*, not raised.
    """
    started = time.perf_counter()
    randomness, source = derive_randomness(seed, beacon)
    if samples is not None and samples < 1:
        raise UsageError("--samples must be at least 1")
    if (confidence is None) != (cheat_fraction is None):
        raise UsageError("--confidence and --cheat-fraction go together")
    if confidence is not None and not (0 < confidence < 1 and 0 < cheat_fraction < 1):  # type: ignore[operator]
        raise UsageError("--confidence and --cheat-fraction must be strictly between 0 and 1")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be at least 1")
    if nproc < 1:
        raise UsageError("--nproc must be at least 1")
    if largest is not None and largest < 0:
        raise UsageError("the number of largest-update samples cannot be negative")
    for name, value in (("expected job id", expected_job), ("expected commitment", expected_root)):
        if value is not None and not is_digest(value):
            raise UsageError(f"the {name} must be 64 lowercase hex characters, got {str(value)[:80]!r}")
    req = _Request(randomness, source, started, samples, confidence, cheat_fraction, segments, largest, expected_root,
                   expected_job, code or CodePolicy(), device, threads, data_dir, on_progress, eval_data_dir, nproc)
    if isinstance(bundle, Bundle):
        return _verify_open(bundle, req)
    try:
        opened = open_bundle(bundle, full=False)  # a directory, an archive, or a URL (pol.remote)  # each checkpoint's digest is checked when (and if) it is read
    except (BundleVersionError, BundleNotFound):
        raise
    except BundleError as exc:
        return _reject(req, f"bundle integrity: {exc}")
    with opened:
        return _verify_open(opened, req)


def _reject(req: _Request, reason: str, b: Bundle | None = None, checks: tuple[SegmentCheck, ...] = (), steps: int = 0,
            thresholds: Thresholds | None = None) -> Report:
    m = b.manifest if b else None
    total = m.spec.steps if m else 0
    return Report("reject", reason, m.job_id if m else None, m.root if m else None, m.spec.numerics if m else None,
                  req.randomness.hex(), req.source, len(m.records) - 1 if m else 0, checks, steps, total,
                  steps / total if total else 0.0, {}, thresholds, time.perf_counter() - req.started, req.expected_job,
                  **_reads(b, req))


def _reads(b: Bundle | None, req: _Request) -> dict[str, Any]:
    """The report's read counters: checkpoint bytes and files this verification read (since `_verify_open`)."""
    if b is None or "bytes" not in req.reads:
        return {}
    return {"bytes_read": b.bytes_read - req.reads["bytes"], "checkpoints_read": len(b.files_read - req.reads["files"])}


def _plan(b: Bundle, req: _Request) -> tuple[list[tuple[int, str]], int]:
    """The segments to replay (1-based, with why) and how many of them were drawn uniformly.

    Raises UsageError for forced segments that do not exist, BundleError if a checkpoint is unreadable.
    """
    n = len(b.records) - 1
    if req.forced is not None:
        bad = [i for i in req.forced if not 1 <= i <= n]
        if bad:
            raise UsageError(f"segments {bad} do not exist: this bundle has segments 1..{n}")
        plan = [(i, "forced") for i in sorted(set(req.forced))]
        return plan, len(plan)
    if req.confidence is not None:  # the uniform part alone reaches the confidence; largest-update ones come on top
        uniform = compute_required_samples(n, req.confidence, req.cheat_fraction)  # type: ignore[arg-type]
        largest = max(1, uniform // 4) if uniform < n else 0
        if req.largest is not None:
            largest = min(req.largest, n - uniform)
    else:  # `samples` in all: a quarter (or `largest`) of them largest-update, the rest uniform
        total = min(req.samples or 4, n)
        largest = total // 4 if total < n else 0
        if req.largest is not None:
            largest = min(req.largest, total)
        uniform = total - largest
    norms = committed_update_norms(b) if largest else None  # from the records: no checkpoint is read
    return choose_segments(n, req.randomness, b.manifest.root, uniform, largest, norms), uniform


def check_versions(spec: JobSpec) -> None:
    """Raise VersionMismatch unless this pol is the one the spec names, every third-party distribution it pins
    (the code user code imports, transformers for a zoo model: that code is the model) is installed here at the
    same version, and, in exact numerics, this torch too (its decompositions are part of the exact arithmetic).
    Native numerics tolerates another torch: its thresholds absorb kernel differences, which calibration measures
    here."""
    made = spec.versions.get("pol")
    if made != __version__:
        raise VersionMismatch(
            f"the bundle was made with pol {made}, this is pol {__version__}: a training step is defined per pol "
            f"version, so replaying it here could only raise false alarms; use pol {made}"
        )
    pinned = {k: v for k, v in spec.versions.items() if k not in ("pol", "torch")}
    if is_zoo_model(spec.model.name):
        pinned.setdefault("transformers", "none (not pinned)")
    for dist, made_dist in sorted(pinned.items()):
        try:
            here_dist = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            here_dist = "none (not installed)"
        if made_dist != here_dist:
            hint = " (pip install 'pol[zoo]')" if dist == "transformers" and is_zoo_model(spec.model.name) else ""
            raise VersionMismatch(
                f"the bundle was made with {dist} {made_dist}, this is {dist} {here_dist}: its model runs {dist}'s "
                f"code, defined per version; install {dist}=={made_dist}{hint}"
            )
    here = torch.__version__.split("+")[0]
    if spec.numerics == "exact" and spec.versions.get("torch") != here:
        raise VersionMismatch(
            f"the exact bundle was made with torch {spec.versions.get('torch')}, this is torch {here}: exact results "
            "are defined with that torch's operator decompositions; use the same torch"
        )


def _verify_open(b: Bundle, req: _Request) -> Report:
    req.reads.update(bytes=b.bytes_read, files=set(b.files_read))
    m = b.manifest
    spec = m.spec
    n = len(m.records) - 1
    if req.expected_job is not None and req.expected_job != m.job_id:
        return _reject(req, f"wrong job: asked for {req.expected_job}, the bundle proves {m.job_id}", b)
    if req.expected_root is not None and req.expected_root != m.root:
        return _reject(req, f"commitment {m.root} is not the expected {req.expected_root}", b)
    check_versions(spec)
    # build_runtime checks the code first (CodeNotAllowed, CodeDiffers: before anything is imported), then the data
    rt = build_runtime(spec, device=req.device, data_dir=req.data_dir, code=req.code)  # DataDiffers before any judgement
    evals = None
    if spec.evaluation is not None:  # EvalDataDiffers / EvalDataNotProvided before any judgement, too
        evals = _Evaluations(Evaluator(spec, build_eval_dataset(spec, data_dir=req.eval_data_dir, code=req.code), code=req.code,
                                       loss_fn=rt.loss_fn), rt, b)
    states = _StateCache(b)
    try:
        # every checkpoint's layout (so its size: `Bundle.read_layout`) is checked against the spec before it is
        # read or fetched in full: a bundle from a stranger cannot make the verifier read more than the job's state
        verify_layout(rt, b.read_layout(0), "checkpoint at step 0", 0)
        committed0 = states.load(0)
        if state_digest(initial_state(rt)) != m.records[0].state:
            seeded = tensor_digests(capture_state(rt))
            wrong = [k for k, v in tensor_digests(committed0).items() if seeded.get(k) != v]
            return _reject(req, f"the step-0 state is not the initialisation the seed gives (differs in {wrong[:3]})", b)
        if evals is not None:
            evals.check(0, held=True)  # the runtime holds the step-0 state, equal to the committed one
        plan, uniform = _plan(b, req)
        touched = {m.records[i - 1].step for i, _ in plan} | {m.records[i].step for i, _ in plan}
        if evals is not None:
            touched.add(m.records[-1].step)  # the final checkpoint is always evaluated
        for step in sorted(touched - {0}):  # step 0: checked before it was read
            verify_layout(rt, b.read_layout(step), f"checkpoint at step {step}", step)  # before any replay
    except BundleError as exc:
        return _reject(req, f"bundle integrity: {exc}", b)

    exact = spec.numerics == "exact"
    steps_done = 0
    calibration_steps = 0
    thresholds = None
    calibrated: dict[int, _Replayed] = {}
    plan_steps = sum(m.records[i].step - m.records[i - 1].step for i, _ in plan)
    if not exact:
        calib_on = plan[0][0]
        span = m.records[calib_on].step - m.records[calib_on - 1].step
        plan_steps += CALIBRATION_STEPS if span >= FEW_STEP_MIN_SEGMENT else span * len(_perturbations(rt, recorded_world(b)))
        try:
            start = states.load(m.records[calib_on - 1].step)
            states.load(m.records[calib_on].step)  # its end, read (and checked) before any replay
            thresholds, steps_done, calibrated[calib_on] = calibrate_thresholds(rt, b, calib_on, req.threads, start=start)
        except BundleError as exc:
            return _reject(req, f"bundle integrity: {exc}", b)
        calibration_steps = steps_done - span  # the reference replay is the segment's own check
        verify_sound(thresholds)
        if req.on_progress:
            req.on_progress(steps_done, plan_steps)

    checks: list[SegmentCheck] = []
    if req.nproc > 1 and len(plan) > 1:
        outcome = _check_in_parallel(rt, b, req, plan, thresholds, calibrated, plan_steps, steps_done, evals)
    else:
        outcome = _check_in_order(rt, b, req, states, plan, thresholds, calibrated, plan_steps, steps_done, evals)
    checks, steps_done, rejected = outcome
    if rejected is not None:
        return _reject(req, rejected, b, tuple(checks), steps_done, thresholds)
    if evals is not None and all(c.ok for c in checks) and evals.ok:
        try:
            evals.check(m.records[-1].step)
        except BundleError as exc:
            return _reject(req, f"bundle integrity: {exc}", b, tuple(checks), steps_done, thresholds)

    escape = {str(f): compute_escape_probability(n, uniform, f) for f in REPORT_FRACTIONS}
    if req.cheat_fraction is not None:
        escape[str(req.cheat_fraction)] = compute_escape_probability(n, uniform, req.cheat_fraction)
    failed = [c for c in checks if not c.ok]
    evaluation = evals.report(exact) if evals is not None else None
    eval_failed = [c for c in evaluation.checks if not c.ok] if evaluation is not None else []
    if failed:
        reason = f"segment {failed[0].index} (steps {failed[0].start}->{failed[0].end}): {failed[0].problem}"
    elif eval_failed:
        reason = f"evaluation: {eval_failed[0].problem}"
    else:
        reason = f"{len(checks)} of {n} segments replayed and matched"
        if evaluation is not None:
            reason += f"; evaluation matched at steps {', '.join(str(s) for s in evaluation.checked_steps)}"
    return Report("reject" if failed or eval_failed else "accept", reason, m.job_id, m.root, spec.numerics, req.randomness.hex(),
                  req.source, n, tuple(checks), steps_done, spec.steps, steps_done / spec.steps, escape, thresholds,
                  time.perf_counter() - req.started, req.expected_job, evaluation, calibration_steps, **_reads(b, req),
                  uniform_samples=uniform, largest_samples=len(plan) - uniform)


class _SegmentRejected(Exception):
    """A segment whose checkpoints make the whole bundle a REJECT before it is judged (the reason is the message)."""


def _check_segment(rt: Runtime, b: Bundle, req: _Request, states: _StateCache, index: int, why: str,
                   thresholds: Thresholds | None, calibrated: dict[int, _Replayed], evals: _Evaluations | None,
                   on_step: Callable[[int, float], None] | None = None) -> tuple[SegmentCheck, int]:
    """Check one segment: its checkpoints (read and digest-checked), its update-norm claim, its replay (unless
    the calibration already replayed it) and, when it matched, the evaluation of its two ends. Returns the check
    and the steps replayed for it. Raises _SegmentRejected (bundle integrity, a checkpoint's meta/step)."""
    m = b.manifest
    start_rec, end_rec = m.records[index - 1], m.records[index]
    try:
        start, claimed = states.load(start_rec.step), states.load(end_rec.step)
    except BundleError as exc:
        raise _SegmentRejected(f"bundle integrity: {exc}") from None
    if int(start["meta/step"]) != start_rec.step or int(claimed["meta/step"]) != end_rec.step:
        raise _SegmentRejected(f"segment {index}: a checkpoint's meta/step is not its record's step")
    norm_problem = check_update_norm(start, claimed, end_rec.update)
    if norm_problem is not None:  # the record's claim is false: no replay needed to reject it
        calibrated.pop(index, None)
        return SegmentCheck(index, start_rec.step, end_rec.step, why, False, norm_problem, data_ok=True), 0
    steps = 0
    if index in calibrated:  # already replayed, under the check's own conditions, by the calibration
        replayed = calibrated.pop(index)
    else:
        replayed = _replay(rt, start, end_rec.step, threads=req.threads, on_step=on_step)
        steps = end_rec.step - start_rec.step
    if replayed.data != end_rec.data:
        check = SegmentCheck(index, start_rec.step, end_rec.step, why, False,
                             "the data consumed differs from the committed data (order, skipped or substituted batches)",
                             data_ok=False)
    else:
        check = _judge(index, why, start, claimed, replayed, end_rec.loss, m.spec.numerics == "exact", thresholds,
                       start_rec.step, end_rec.step)
    if evals is not None and check.ok:  # the committed states, digests checked on load
        evals.check(start_rec.step, start)
        evals.check(end_rec.step, claimed)
    return check, steps


_Outcome = tuple[list[SegmentCheck], int, str | None]  # checks, steps replayed, the reason of a REJECT before judging


def _check_in_order(rt: Runtime, b: Bundle, req: _Request, states: _StateCache, plan: list[tuple[int, str]],
                    thresholds: Thresholds | None, calibrated: dict[int, _Replayed], plan_steps: int, steps_done: int,
                    evals: _Evaluations | None) -> _Outcome:
    """Check the planned segments one after another in this process."""
    checks: list[SegmentCheck] = []
    for index, why in plan:
        first = b.records[index - 1].step

        def tick(step: int, loss: float, base: int = steps_done, first: int = first) -> None:
            if req.on_progress:
                req.on_progress(base + step - first, plan_steps)

        try:
            check, steps = _check_segment(rt, b, req, states, index, why, thresholds, calibrated, evals, tick)
        except _SegmentRejected as exc:
            return checks, steps_done, str(exc)
        checks.append(check)
        steps_done += steps
    return checks, steps_done, None


# One verification's worker processes (`verify(nproc=N)`): each opens the bundle and builds the runtime once.
_WORKER: dict[str, Any] = {}


def _init_worker(location: Any, root: Digest, req: _Request, devices: Any) -> None:
    """Open the bundle (the parent's `Remote` options for a URL) and build the runtime, once per worker. A failure
    is kept, and each of the worker's segments reports it (`_worker_check`), so the parent can say it as one
    process would: a RemoteError stays "cannot verify", a bundle error is a REJECT."""
    device = devices.get()
    try:
        opened = open_bundle(location, full=False)
        if opened.manifest.root != root:
            raise BundleError(f"the bundle changed while it was being verified: its commitment is no longer {root}")
    except PolError as exc:
        _WORKER.update(error=(isinstance(exc, BundleError), f"{type(exc).__name__}: {exc}"))
        return
    rt = build_runtime(opened.spec, device=device, data_dir=req.data_dir, code=req.code)
    evals = None
    if opened.spec.evaluation is not None:
        evals = _Evaluations(Evaluator(opened.spec, build_eval_dataset(opened.spec, data_dir=req.eval_data_dir, code=req.code),
                                       code=req.code, loss_fn=rt.loss_fn), rt, opened)
    _WORKER.update(bundle=opened, rt=rt, req=req, states=_StateCache(opened), evals=evals)


def _worker_check(index: int, why: str, thresholds: Thresholds | None) -> tuple[SegmentCheck | None, int, str | None,
                                                                                dict[int, EvalCheck], int, set[str]]:
    """One segment in a worker: (check, steps, reject reason, evaluation checks, bytes read, files read)."""
    w = _WORKER
    if "error" in w:
        rejecting, message = w["error"]
        if rejecting:  # as one process: a bundle that fails its integrity checks is rejected
            return None, 0, f"bundle integrity: {message}", {}, 0, set()
        raise RemoteError(f"a verification worker could not open the bundle: {message}")
    bytes_before, files_before = w["bundle"].bytes_read, set(w["bundle"].files_read)
    evals = w["evals"]
    if evals is not None:
        evals.checks.clear()
    try:
        check, steps = _check_segment(w["rt"], w["bundle"], w["req"], w["states"], index, why, thresholds, {}, evals)
        rejected = None
    except _SegmentRejected as exc:
        check, steps, rejected = None, 0, str(exc)
    return (check, steps, rejected, dict(evals.checks) if evals is not None else {},
            w["bundle"].bytes_read - bytes_before, w["bundle"].files_read - files_before)


def _check_in_parallel(rt: Runtime, b: Bundle, req: _Request, plan: list[tuple[int, str]], thresholds: Thresholds | None,
                       calibrated: dict[int, _Replayed], plan_steps: int, steps_done: int,
                       evals: _Evaluations | None) -> _Outcome:
    """Check the planned segments on `req.nproc` worker processes (spawned; each opens the bundle itself, checked
    against this one's commitment), one segment per task, and merge the results in plan order: the same checks,
    steps and verdict as `_check_in_order`, which stops at the first segment that rejects the bundle before
    judging it. A segment the calibration already replayed is checked here. Read counters add every process's
    reads."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for i in range(req.nproc):
        devices.put(_worker_device(req.device, i))
    results: dict[int, tuple] = {}
    states = _StateCache(b)
    for index, why in [(i, why) for i, why in plan if i in calibrated]:  # its replay is already here
        try:
            check, steps = _check_segment(rt, b, req, states, index, why, thresholds, calibrated, evals)
            results[index] = (check, steps, None, {}, 0, set())
        except _SegmentRejected as exc:
            results[index] = (None, 0, str(exc), {}, 0, set())
    remote = [(i, why) for i, why in plan if i not in results]
    remote_options = getattr(b._source, "remote", None)  # a URL: the caller's cache and limits (not its callback)
    location = dataclasses.replace(remote_options, on_progress=None) if remote_options is not None else str(b.path)
    threads = req.threads or max(1, torch.get_num_threads() // req.nproc)
    worker_req = dataclasses.replace(req, on_progress=None, threads=threads, reads={})
    done = steps_done
    if remote:
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(req.nproc, len(remote)), mp_context=ctx,
                                                    initializer=_init_worker,
                                                    initargs=(location, b.manifest.root, worker_req, devices)) as pool:
            futures = {pool.submit(_worker_check, i, why, thresholds): i for i, why in remote}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                done += results[futures[future]][1]
                if req.on_progress:
                    req.on_progress(done, plan_steps)
    checks: list[SegmentCheck] = []
    for index, _ in plan:
        check, steps, rejected, eval_checks, nbytes, files = results[index]
        b._source.bytes_read += nbytes
        b.files_read |= files
        if rejected is not None:
            return checks, steps_done, rejected
        checks.append(check)
        steps_done += steps
        if evals is not None:
            for step, ev in eval_checks.items():
                evals.checks.setdefault(step, ev)
    return checks, steps_done, None


def _worker_device(device: str, i: int) -> str:
    """The device of worker i: the CPU, or the CUDA devices in turn."""
    if device.startswith("cuda") and ":" not in device and torch.cuda.is_available():
        return f"cuda:{i % torch.cuda.device_count()}"
    return device


class _StateCache:
    """Committed states read from a bundle, the last two kept: consecutive sampled segments share a checkpoint,
    and calibration starts where its segment's check does, so no checkpoint is read twice in a row."""

    def __init__(self, bundle: Bundle, keep: int = 2) -> None:
        self.bundle, self.keep = bundle, keep
        self.held: dict[int, dict[str, torch.Tensor]] = {}

    def load(self, step: int) -> dict[str, torch.Tensor]:
        if step in self.held:
            self.held[step] = self.held.pop(step)  # most recently used last
            return self.held[step]
        state = self.bundle.load_state(step)  # digest-checked (file and state) on the bytes read
        self.held[step] = state
        while len(self.held) > self.keep:
            self.held.pop(next(iter(self.held)))
        return state


class _Evaluations:
    """The verifier's evaluation checks: each touched checkpoint once, its committed metrics against the
    verifier's own recomputation on the committed state."""

    def __init__(self, evaluator: Evaluator, rt: Runtime, bundle: Bundle) -> None:
        self.evaluator, self.rt, self.bundle = evaluator, rt, bundle
        self.checks: dict[int, EvalCheck] = {}
        self.seconds = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def check(self, step: int, state: dict[str, torch.Tensor] | None = None, *, held: bool = False) -> None:
        """Evaluate the committed state at `step` (`state`, already checked against its digest; `held`: the
        runtime holds it; neither: read from the bundle and checked) and compare with its record."""
        if step in self.checks:
            return
        started = time.perf_counter()
        if not held:
            # load_state raises BundleError (DigestMismatch) if the file is not the committed state
            restore_state(self.rt, state if state is not None else self.bundle.load_state(step))
        record = self.bundle.records[self.bundle.record_index(step)]
        exact = self.bundle.spec.numerics == "exact"
        totals = self.evaluator.totals(self.rt.model, step=step, device=self.rt.device)
        problems = compare_eval(record.eval, totals, exact=exact, step=step)
        self.checks[step] = EvalCheck(step, not problems, None if record.eval is None else dict(record.eval),
                                      values_of(totals, step, strict=False), "; ".join(problems) or None)
        self.seconds += time.perf_counter() - started

    def report(self, exact: bool) -> EvalReport:
        spec = self.bundle.spec
        assert spec.evaluation is not None and spec.evaluation.data_digest is not None
        final_step = self.bundle.records[-1].step
        final = self.checks.get(final_step)
        tolerance = ("bit for bit (exact numerics)" if exact else
                     f"native: within {EVAL_REL_TOL:g} relative (floor {EVAL_ABS_TOL:g}); accuracy also within "
                     f"max(1, {EVAL_FLIP_SHARE:g} x rows) rows")
        return EvalReport(spec.evaluation.data_digest, tuple(m.name for m in spec.evaluation.metrics), final_step,
                          final is not None, self.bundle.records[-1].eval and dict(self.bundle.records[-1].eval),
                          final.recomputed if final is not None else None, tuple(sorted(self.checks)),
                          tuple(self.checks[s] for s in sorted(self.checks)), tolerance, self.seconds)
