"""A whole market with real work (what `pol game run` runs): one library call plays every task end to end.

    fund       the submitter, solvers, verifiers and the jackpot are opened and minted once (idempotent op ids)
    per task   (task i is the market's job with its seed shifted by i)
      post     the submitter posts the job; the fee estimate is gas-like: 6 x parameters x examples x steps FLOPs
               (x tokens per example for sequence models), `compute_fee_estimate` turns it into the maximum price
      bid      every solver that can still cover a deposit and a bond bids (seeded prices; cheaters undercut,
               since they mean to skip work) with the digest of a secret salt
      auction  lowest compliant bid wins (ties by hash); the forced-error beacon is drawn
      work     the winner really trains the job with `pol.prove.train_and_prove`. A cheating winner then forges
               the second half of its checkpoints consistently (valid digests, Merkle root and commitment: only
               replay can tell). If the beacon and its salt force an error, it publishes a bundle with every
               segment wrong and commits to that (Truebit's forced error), keeping the true one for later.
      commit   the winner locks its bond and posts the root of the bundle it published
      verify   every verifier of the committee stakes, replays the segments `get_verifier_segments` assigns it
               with `pol.verify.verify(expected_root=<posted commitment>)` and approves or rejects (a lazy verifier
               approves without looking). With `sampling='shared'` the committee splits one beacon-drawn sample
               into disjoint shares (each replays only its share); with 'independent' each draws its own. The
               sample is sized by the task's posted `detection` (confidence, cheat fraction). A silent verifier
               (joins, never gives a verdict) has its share re-assigned after the verify deadline to a fresh
               verifier from the reserve (the verifiers beyond `committee`), and is slashed at the reveal
               (with an outcome condition, an approver also reports the certified final metric, which `pol.verify`
               recomputes from the final checkpoint on its own copy of the evaluation data)
      reveal   the solver reveals its salt: a forced error pays the catchers from the jackpot and slashes the
               approvers, and a second round verifies the true bundle; no challenger settles for the solver
      dispute  each segment a rejecting verifier found wrong is disputed through the `dispute` callable (by
               default the pinpoint protocol, else a referee-less replay of the single segment), and its ruling
               enters the ledger as a `Rule` move; a verifier that rejected an evaluation (a committed metric
               that does not recompute) is heard by the replay referee, which recomputes it
      settle   with an outcome condition (`condition=(metric, ">=", threshold)`), the solver is paid only if the
               median certified final metric of the approvers meets it; else the task ends 'target_missed': no
               payment, the bond returned (a valid bundle that misses a target is not fraud), the fee refunded to
               the submitter but for the verifiers' rewards
Every ledger change goes through `games.task.apply_post` / `apply_move`.

Compute accounting (`games.cost`): every task reports the compute each party spent for it as `ComputeEntry`s:
the solver's training steps and seconds (steps x its median step time, measured from the run's per-step
progress), its proof overhead (the rest of the run after the first step: checkpoint capture, hashing, writing,
the manifest) and any forced-error bundle it had to write; each verifier's replayed and calibration steps and
seconds (pol.verify's report; seconds apportioned between the two by steps); each dispute's work (the replay
referee's replayed steps, or pinpoint's rounds, both sides' replay of the segment, estimated as 2 k steps, and the
referee's seconds). `TaskReport.tax` and `MarketReport.tax` are the protocol tax per task and in total. Not
counted: setup before the first step (a plain loop builds its model too; for a small model it includes writing
the step-0 checkpoint), a cheater's forging, and the submitter's
job-id resolution.

Served bundles (`publish="http"`, `pol game run --publish http`): each solver publishes the bundle it commits to by
serving its directory over loopback HTTP (`pol.serve.serve_in_thread`, one server per bundle) and posts the URL with
its commitment (the commit event and the journal's `published/<task>/r<round>`). Every verifier, the referee
and the forced-error rounds then fetch by URL (`pol.verify.verify(url, expected_root=...)`): only the manifest and the
checkpoints they read, each checked against the commitment, cached per party under `workdir/cache/<party>`. A
checkpoint the server changes after the commitment fails its digest: a REJECT, disputed like any wrong segment, so
the solver is slashed and not the verifier. A fetch that fails (RemoteError: unreachable, too slow, changed archive;
BundleNotFound: no manifest at the URL) is the verdict "unavailable": the verifier cannot verify, so it does not
approve (its vote is a challenge, weight 0) and the task goes to dispute. There, for a served bundle, the referee
first fetches what the solver committed to for each disputed segment (the manifest of the posted commitment, the
segment's two checkpoints, each checked against its digest): if it cannot (gone, or other bytes), the solver does
not serve its commitment and is ruled wrong on that segment (not paid, bond slashed), so no verifier is slashed for
a server that lies or stops; if it can, the segment is disputed as usual, and a verifier that cried "unavailable"
or rejected a bundle that was there loses its stake like any wrong challenger. A
`Publisher` of the caller's (e.g. an `HttpPublisher` a test stops mid-task) can stand in for "http". Local paths
(`publish="local"`, the default) are used exactly as before; a URL is never turned into a `Path`.

Crash safety: the market keeps a journal (`market-journal.json` in the work directory, replaced atomically) of
every move applied and of every result that took work or read live balances (bundle roots, verifications,
disputes, who could afford to bid or stake). A re-run on the same work directory re-plays the journal and goes on;
the moves it re-applies re-issue the same ledger op ids, so nothing is paid twice (the SQLite ledger is the
default). Everything is a function of `seed`: two clean runs give the same ledger, event for event.

`games.market` imports `pol` (and so torch) only when a market runs, and `pinpoint` only inside `pinpoint_dispute`:
importing it stays cheap, and `games` itself imports neither.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from blake3 import blake3

from games.auction import make_capabilities, make_requirements
from games.consensus import WEIGHT_ONE
from games.cost import ComputeEntry, TaxSummary, compute_tax
from games.errors import MarketError
from games.ledger import AccountId, Amount, Ledger, mint, open_account, verify_ledger
from games.ledger_sqlite import SqliteLedger
from games.scenarios import move_to_dict
from games.task import (
    CHALLENGED,
    COMMITTED,
    FINAL,
    RULINGS,
    Bid,
    CloseAuction,
    Commit,
    GameParams,
    Join,
    Move,
    Post,
    Reveal,
    Rule,
    Task,
    Verdict,
    apply_move,
    apply_post,
    compute_fee_estimate,
    compute_is_forced,
    compute_salt_digest,
    get_verifier_segments,
    is_approval,
    verify_detection,
    verify_params,
)
from pol.components import CodePolicy
from pol.errors import BundleNotFound, RemoteError

if TYPE_CHECKING:
    from pol.remote import Limits
    from pol.serve import Server
    from pol.spec import JobSpec

__all__ = [
    "JOURNAL_NAME",
    "PUBLISH_MODES",
    "BundleLocation",
    "HttpPublisher",
    "Publisher",
    "DisputeFn",
    "DisputeOutcome",
    "DisputeReport",
    "EventCallback",
    "MarketEvent",
    "MarketReport",
    "TaskReport",
    "VerificationReport",
    "compute_job_flops",
    "default_dispute",
    "get_default_spec",
    "get_market_params",
    "pinpoint_dispute",
    "replay_dispute",
    "render_compute",
    "report_to_dict",
    "run_market",
]

JOURNAL_NAME = "market-journal.json"
JOURNAL_FORMAT = "pol-market-journal"
SUBMITTER = "submitter"
_DOMAIN = b"pol.games.market.v1\x00"
_CAPS = ("exact", "native")
PUBLISH_MODES = ("local", "http")  # where solvers publish their bundles: their own directory, or served over HTTP

BundleLocation = str | Path  # a local bundle (directory or archive) or a URL string; a URL is never made a Path


# ---------------------------------------------------------------------------------------------------- types


@dataclass(frozen=True, slots=True)
class DisputeOutcome:
    """What a dispute decided about one segment: `ruling` is 'solver_wrong' or 'challenger_wrong'."""

    ruling: str
    description: str = ""
    steps: int = 0  # training steps the dispute replayed (both sides and the referee)
    rounds: int = 0  # rounds of the dispute protocol (0: a single replay)
    referee_seconds: float = 0.0  # the referee's own work, when the protocol measures it apart


DisputeFn = Callable[[BundleLocation, int], "DisputeOutcome | str"]  # (bundle path or URL, 0-based segment) -> outcome


@dataclass(frozen=True, slots=True)
class MarketEvent:
    """One human-readable step of the market. `replayed` marks a step re-applied from the journal after a crash."""

    seq: int  # position in this call's stream of events
    task_id: str  # "" for market-wide events (funding, resume, summary)
    kind: str  # fund, resume, post, bid, auction, train, commit, join, verify, verdict, reveal, dispute, rule, done
    text: str
    replayed: bool = False

    def __str__(self) -> str:
        where = f"[{self.task_id}] " if self.task_id else ""
        return f"{where}{self.text}" + (" (replayed)" if self.replayed else "")


EventCallback = Callable[[MarketEvent], None]


@dataclass(frozen=True, slots=True)
class VerificationReport:
    verifier: AccountId
    round: int
    segments: tuple[int, ...]  # 0-based segments it was assigned, sorted (pol.verify numbers them from 1)
    verdict: str  # "accept", "reject", "unchecked" (a lazy verifier's approval) or "unavailable" (could not fetch)
    failed: tuple[int, ...]  # 0-based segments its replay found wrong
    reason: str
    metric: float | None = None  # the certified final value of the task's condition metric (accept only)
    evaluation: bool = False  # the rejection is of a committed evaluation metric, not of a replayed segment


@dataclass(frozen=True, slots=True)
class DisputeReport:
    round: int
    segment: int  # 0-based
    challengers: tuple[AccountId, ...]
    ruling: str
    description: str


@dataclass(frozen=True, slots=True)
class TaskReport:
    task_id: str
    submitter: AccountId
    flops: int
    max_price: Amount
    bids: tuple[tuple[AccountId, Amount], ...]
    winner: AccountId  # "" if nobody bid
    price: Amount
    cheated: bool  # the winner is a cheater and published a forged bundle
    forced: bool  # the beacon forced an error in round 0
    commitment: str  # the commitment of the last round (the true one after a forced error)
    outcome: str  # the task's outcome: accepted, solver_wrong, challenger_wrong, no_bids, ...
    verifications: tuple[VerificationReport, ...]
    disputes: tuple[DisputeReport, ...]
    changes: tuple[tuple[AccountId, Amount], ...]  # each account's balance change over the task (non-zero only)
    condition: tuple[str, str, float] | tuple[()] = ()  # the outcome condition posted with the task, if any
    certified_metric: float | None = None  # the median certified final metric the settlement used
    detection: tuple[float, float] | tuple[()] = ()  # the required detection posted with the task
    sampling: str = "independent"
    compute: tuple[ComputeEntry, ...] = ()  # every party's compute for this task (games.cost)
    tax: TaxSummary = TaxSummary(0, 0.0, 0, 0.0, 0.0, 0.0)
    location: str = ""  # the URL the last round's bundle was fetched from ("" for a local bundle)


@dataclass(frozen=True, slots=True)
class MarketReport:
    workdir: Path
    ledger_path: Path | None  # None when the caller passed its own ledger
    seed: int
    tasks: tuple[TaskReport, ...]
    funding: Mapping[AccountId, Amount]
    balances: Mapping[AccountId, Amount]  # every account at the end
    total_supply: Amount
    ledger_events: int  # events in the ledger's log
    market_events: int  # MarketEvents emitted by this call
    resumed: bool  # this call went on from a journal
    seconds: float
    tax: TaxSummary = TaxSummary(0, 0.0, 0, 0.0, 0.0, 0.0)  # over every task


# ---------------------------------------------------------------------------------------------------- the job


def get_default_spec() -> JobSpec:
    """The default job: a tiny MLP on synthetic data, 32 steps in 8 segments (a few seconds on one CPU core)."""
    from pol.spec import spec_from_dict

    return spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 32}},
                           "data": {"name": "synthetic", "kwargs": {"n": 512}},
                           "steps": 32, "every": 4, "batch_size": 16})


def compute_job_flops(spec: JobSpec, n_params: int) -> int:
    """Training FLOPs, like gas: 6 x parameters x examples x steps (forward 2, backward 4), times the tokens of an
    example for sequence models (a `block_size` in the model or data arguments)."""
    kwargs = {**dict(spec.data.kwargs), **dict(spec.model.kwargs)}
    tokens = int(kwargs.get("block_size", 1))
    return 6 * n_params * spec.batch_size * spec.steps * tokens


def _count_params(spec: JobSpec) -> int:
    from pol.engine import build_runtime

    rt = build_runtime(spec, code=CodePolicy.trust_all_code())  # the submitter sizing its own job
    return sum(p.numel() for p in rt.params.values())


def _segment_count(spec: JobSpec) -> int:
    return len(spec.checkpoint_steps) - 1


def get_market_params(spec: JobSpec, params: GameParams | None = None) -> GameParams:
    """The game parameters of a market on `spec`: `params` (default: the market defaults: gas priced per kFLOP,
    since toy jobs are tiny, and 3 segments per verifier) with `n_segments` set to the spec's segment count and
    `sample_count` capped by it."""
    base = params or GameParams(flops_per_gas=1_000, sample_count=3)
    n = _segment_count(spec)
    return dataclasses.replace(base, n_segments=n, sample_count=max(1, min(base.sample_count, n)))


def _bundle_job(path: Any) -> str:
    """The job id a published bundle proves (read from its manifest, checked against its commitment). `path`: a
    local bundle, a URL or a `pol.remote.Remote` (then only the manifest is fetched)."""
    from pol.bundle import open_bundle

    with open_bundle(path, full=not _is_remote(path)) as b:
        return b.manifest.job_id


# ---------------------------------------------------------------------------------------------------- publishing

_UNAVAILABLE = (RemoteError, BundleNotFound)  # a served bundle that cannot be fetched: the party cannot verify


@runtime_checkable
class Publisher(Protocol):
    """Where solvers publish their bundles: `publish(name, bundle)` makes the local bundle fetchable (idempotent per
    name) and returns the URL the other parties fetch it from; `limits` bounds each party's fetches of one bundle
    (None: pol.remote's defaults)."""

    limits: Limits | None

    def publish(self, name: str, bundle: Path) -> str: ...


class HttpPublisher:
    """Publish each bundle over HTTP on a server of its own (`pol.serve.serve_in_thread`, on `host`, a free port)
    until `close()` or the end of a `with` block. `servers[name]` is the running server (`url`, `requests`: what
    was fetched); `stop(name)` stops one (its solver stops answering). `publish` raises RemoteError when aiohttp
    is missing and the errors of `pol.bundle.open_bundle` for a bundle that is not valid."""

    def __init__(self, host: str = "127.0.0.1", limits: Limits | None = None) -> None:
        self.host, self.limits = host, limits
        self.servers: dict[str, Server] = {}
        self._stack = ExitStack()

    def publish(self, name: str, bundle: Path) -> str:
        if name not in self.servers:
            from pol.serve import serve_in_thread

            self.servers[name] = self._stack.enter_context(serve_in_thread(bundle, host=self.host))
        return self.servers[name].url

    def stop(self, name: str) -> None:
        self.servers[name].stop()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> HttpPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _get_publisher(publish: str | Publisher) -> tuple[Publisher | None, bool]:
    """(the publisher, whether the market owns it and must close it); None for local bundles. Raises MarketError."""
    if isinstance(publish, Publisher):
        return publish, False
    if publish == "local":
        return None, False
    if publish == "http":
        return HttpPublisher(), True
    raise MarketError("market.publish", f"{publish!r} is not one of {PUBLISH_MODES} or a Publisher")


def _is_remote(location: object) -> bool:
    from pol.remote import Remote, is_url

    return isinstance(location, Remote) or is_url(location)


def _fetchable(location: BundleLocation, cache_dir: Path | None, limits: Limits | None) -> Any:
    """What a party opens: a local bundle as it is; a URL as a `pol.remote.Remote` caching under `cache_dir` (a URL
    string as it is when there is no `cache_dir`: pol.remote's default cache)."""
    if cache_dir is None or not _is_remote(location):
        return location
    from pol.remote import Limits, Remote

    return Remote(str(location), cache_dir=cache_dir, limits=limits or Limits())


def _job_id(spec: JobSpec) -> str:
    """The job id the submitter posts: its spec resolved against the data (what `pol job` prints)."""
    from pol.components import CodePolicy
    from pol.engine import resolve_job

    return resolve_job(spec, code=CodePolicy.trust_all_code()).job_id


def _with_seed(spec: JobSpec, seed: int) -> JobSpec:
    from pol.spec import spec_from_dict

    return spec if seed == spec.seed else spec_from_dict({**spec.to_dict(), "seed": seed})


# ---------------------------------------------------------------------------------------------------- disputes


def _normalise(outcome: DisputeOutcome | str) -> DisputeOutcome:
    result = DisputeOutcome(outcome) if isinstance(outcome, str) else outcome
    if not isinstance(result, DisputeOutcome) or result.ruling not in RULINGS:
        raise MarketError("market.dispute", f"a dispute must rule one of {RULINGS}, not {outcome!r}")
    return result


def replay_dispute(bundle: BundleLocation, segment: int, *, code: CodePolicy = CodePolicy(),
                   cache_dir: Path | None = None, limits: Limits | None = None) -> DisputeOutcome:
    """The referee-less ruling: replay the single disputed segment (0-based) with `pol.verify` and rule against the
    solver if it fails. A URL is fetched through `pol.remote` (caching under `cache_dir`, within `limits`). Raises
    what `pol.verify.verify` raises when it cannot judge (RemoteError when a URL cannot be fetched)."""
    from pol.verify import verify

    report = verify(_fetchable(bundle, cache_dir, limits), segments=[segment + 1], seed=segment, code=code)
    failed = [c for c in report.checks if not c.ok]
    if report.verdict == "accept":
        return DisputeOutcome("challenger_wrong", f"replay referee (no pinpoint): segment {segment} replays as "
                                                  "committed", steps=report.steps_replayed)
    why = failed[0].problem if failed else report.reason
    return DisputeOutcome("solver_wrong", f"replay referee (no pinpoint): segment {segment} does not replay: {why}",
                          steps=report.steps_replayed)


def pinpoint_dispute(bundle: BundleLocation, segment: int, *, code: CodePolicy = CodePolicy(),
                     cache_dir: Path | None = None, limits: Limits | None = None) -> DisputeOutcome:
    """Settle the dispute with the pinpoint protocol (an honest challenger against the bundle's solver, bisecting to
    one step and one operator that the referee executes). A URL is fetched as in `replay_dispute`. Raises
    ImportError if `pinpoint` has no `run_dispute`, and whatever the protocol raises."""
    import pinpoint

    run = getattr(pinpoint, "run_dispute", None)
    if run is None:
        raise ImportError("pinpoint has no run_dispute")
    result = run(_fetchable(bundle, cache_dir, limits), segment, code=code)
    ruling = "solver_wrong" if result.outcome.loser == "solver" else "challenger_wrong"
    where = f"step {result.step}, node {result.node}" + (f" ({result.op})" if result.op else "")
    return DisputeOutcome(ruling, f"pinpoint: {result.rounds} rounds, {result.messages} messages, narrowed to "
                                  f"{where}; {result.outcome.loser} loses by {result.outcome.by}: "
                                  f"{result.outcome.reason}", steps=2 * int(result.k), rounds=int(result.rounds),
                          referee_seconds=float(result.referee_seconds))


def default_dispute(bundle: BundleLocation, segment: int, *, code: CodePolicy = CodePolicy(),
                    cache_dir: Path | None = None, limits: Limits | None = None) -> DisputeOutcome:
    """`pinpoint_dispute` when pinpoint is importable and works; otherwise `replay_dispute`, saying why in the
    description. Raises what `replay_dispute` raises."""
    try:
        return pinpoint_dispute(bundle, segment, code=code, cache_dir=cache_dir, limits=limits)
    except ImportError as exc:
        why = f"pinpoint unavailable ({exc})"
    except Exception as exc:  # pinpoint is young: a failure of it must not stall settlement
        why = f"pinpoint failed ({type(exc).__name__}: {exc})"
    fallback = replay_dispute(bundle, segment, code=code, cache_dir=cache_dir, limits=limits)
    return dataclasses.replace(fallback, description=f"{why}; {fallback.description}")


# ---------------------------------------------------------------------------------------------------- helpers


def _draw(seed: int, *parts: object) -> float:
    """A uniform draw in [0, 1) from the seed and `parts` (stable across machines and Python versions)."""
    text = "\x00".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(blake3(_DOMAIN + text).digest()[:8], "big") / 2**64


def _salt(seed: int, task_id: str, solver: AccountId) -> str:
    return blake3(_DOMAIN + f"salt\x00{seed}\x00{task_id}\x00{solver}".encode()).hexdigest()


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _segments_text(segments: Sequence[int]) -> str:
    return ", ".join(str(s) for s in segments) or "none"


def _write_json_atomic(path: Path, body: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(json.dumps(body, sort_keys=True, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _altered_bundle(src: Path, dst: Path, seed_text: str, first: int) -> str:
    """Write a consistent copy of the bundle at `src` to `dst` (atomically, through pol's one bundle writer) whose
    checkpoints from record index `first` on carry seeded noise on their parameters. Returns the new commitment."""
    import torch

    from pol.bundle import open_bundle, write_bundle

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)

    def noise(step: int, name: str, like: torch.Tensor) -> torch.Tensor:  # one stream per tensor: order-free
        seed = int.from_bytes(blake3(f"{seed_text}/{step}/{name}".encode()).digest()[:7], "big")
        return 1e-3 * torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)

    with open_bundle(src) as b:
        def checkpoints() -> Any:
            for i, rec in enumerate(b.records):
                state = b.load_state(rec.step)
                if i >= first:
                    state = {k: v + noise(rec.step, k, v) if k.startswith("param/") and v.is_floating_point() else v
                             for k, v in sorted(state.items())}
                yield rec.step, state, rec.data, rec.loss, rec.eval  # the metrics as committed (now wrong too)

        root = write_bundle(tmp, b.spec, checkpoints(), dict(b.manifest.env)).root
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return root


def _train(spec: JobSpec, out: Path) -> tuple[str, dict[str, Any]]:
    """Train `spec` into `out`, resuming an interrupted run; an already finished bundle is reused. Returns its root
    and the run's timing: `steps` run, `train_s` (steps x the median time between steps that shared a segment),
    `proof_s` (the rest of the run from its first step on: checkpoints, hashing, the manifest)."""
    from pol.bundle import open_bundle
    from pol.prove import PROGRESS_NAME, train_and_prove

    if (out / "manifest.json").is_file():
        with open_bundle(out) as b:
            return b.manifest.root, {"steps": 0, "train_s": 0.0, "proof_s": 0.0}
    resume = (out / PROGRESS_NAME).is_file()
    marks: list[tuple[int, float]] = []
    result = train_and_prove(spec, out, resume=resume, force=not resume,
                             on_progress=lambda step, total, loss: marks.append((step, time.perf_counter())))
    done = time.perf_counter()
    return result.manifest.root, _compute_run_timing(marks, done, set(spec.checkpoint_steps))


def _compute_run_timing(marks: Sequence[tuple[int, float]], done: float, checkpoints: set[int]) -> dict[str, Any]:
    """Split a run's time, from its first step's end to `done`, into training and proof overhead. `marks` are
    (step reached, time) after every step. An interval that starts at a checkpoint holds one step and that
    checkpoint's work: the step is counted at the median of the other intervals (one step each), the rest is
    proof; so is everything after the last step (the final checkpoint, the manifest). The first step counts at
    the median too (what came before it is setup, which a plain loop has as well)."""
    if not marks:
        return {"steps": 0, "train_s": 0.0, "proof_s": 0.0, "step_s": 0.0}
    pairs = list(zip(marks[:-1], marks[1:], strict=True))
    plain = [b[1] - a[1] for a, b in pairs if a[0] not in checkpoints]
    step_s = sorted(plain)[len(plain) // 2] if plain else 0.0
    train_s, proof_s = step_s, done - marks[-1][1]
    for a, b in pairs:
        if a[0] in checkpoints:
            train_s, proof_s = train_s + step_s, proof_s + max(0.0, b[1] - a[1] - step_s)
        else:
            train_s += b[1] - a[1]
    return {"steps": len(marks), "train_s": train_s, "proof_s": proof_s, "step_s": step_s}


# ---------------------------------------------------------------------------------------------------- the journal


class _Journal:
    """The market's crash journal: the moves applied (in order) and the cached results of work and decisions."""

    def __init__(self, path: Path, config: Mapping[str, Any]) -> None:
        self.path = path
        self.moves: list[dict[str, Any]] = []
        self.work: dict[str, Any] = {}
        if path.is_file():
            body = json.loads(path.read_text(encoding="ascii"))
            if body.get("format") != JOURNAL_FORMAT or body.get("config") != config:
                raise MarketError("market.journal", f"{path} belongs to a different market (other seed, spec, "
                                                    "parties or parameters): use another work directory")
            self.moves, self.work = list(body["moves"]), dict(body["work"])
        self.config = dict(config)
        self.resumed = bool(self.moves or self.work)
        if not path.is_file():
            self.save()  # the work directory now belongs to this market

    def save(self) -> None:
        _write_json_atomic(self.path, {"format": JOURNAL_FORMAT, "version": 1, "config": self.config,
                                       "moves": self.moves, "work": self.work})


# ---------------------------------------------------------------------------------------------------- the market


@dataclass(frozen=True, slots=True)
class _Setup:
    seed: int
    spec: JobSpec
    params: GameParams
    flops: int
    solvers: tuple[AccountId, ...]
    verifiers: tuple[AccountId, ...]
    cheaters: frozenset[AccountId]
    lazy: frozenset[AccountId]
    funding: tuple[tuple[AccountId, Amount], ...]
    code: CodePolicy = CodePolicy()  # the user code every verifier (and the dispute's parties) may import
    condition: tuple[str, str, float] | tuple[()] = ()  # the outcome condition every task is posted with
    detection: tuple[float, float] | tuple[()] = ()  # the required detection every task is posted with
    committee: tuple[AccountId, ...] = ()  # the verifiers seated on every task (the rest are the reserve)
    silent: frozenset[AccountId] = frozenset()  # verifiers that join and then never give a verdict


class _Market:
    """The driver: plays every task, journaling as it goes. Private and mutable; `run_market` is the interface."""

    def __init__(self, setup: _Setup, ledger: Ledger, journal: _Journal, workdir: Path,
                 on_event: EventCallback | None, dispute: DisputeFn, publisher: Publisher | None = None) -> None:
        self.s, self.ledger, self.journal, self.workdir = setup, ledger, journal, workdir
        self.on_event, self.dispute, self.publisher = on_event, dispute, publisher
        self.tasks: dict[str, Task] = {}
        self.preloaded = frozenset(journal.work)  # results a crashed run left in the journal
        self.cursor = 0
        self.emitted = 0
        self.clock = 0
        self.compute: list[ComputeEntry] = []  # the current task's compute, gathered as it is spent (or replayed)

    # -- plumbing

    def emit(self, task_id: str, kind: str, text: str, replayed: bool = False) -> None:
        event = MarketEvent(self.emitted, task_id, kind, text, replayed)
        self.emitted += 1
        if self.on_event is not None:
            self.on_event(event)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """The journaled result under `key`, else compute it and journal it before anything depends on it."""
        if key not in self.journal.work:
            self.journal.work[key] = compute()
            self.journal.save()
        return self.journal.work[key]

    def play(self, move: Move, kind: str, text: str) -> Task:
        """Apply `move` through the task lifecycle. A move already in the journal must be the same move (else
        MarketError); re-applying it re-issues the same ledger op ids, so nothing is paid twice."""
        recorded = json.loads(json.dumps(move_to_dict(move)))
        replayed = self.cursor < len(self.journal.moves)
        if replayed and self.journal.moves[self.cursor] != recorded:
            raise MarketError("market.journal", f"move {self.cursor} diverged from the journal: "
                                                f"{self.journal.moves[self.cursor]} != {recorded}")
        task = self.tasks.get(move.task_id)
        if isinstance(move, Post):
            task = apply_post(self.ledger, self.s.params, move)
        else:
            assert task is not None, "a move for a task that was never posted"
            task = apply_move(self.ledger, task, move)
        self.tasks[move.task_id] = task
        self.cursor += 1
        self.clock = max(self.clock, move.now)
        self.emit(move.task_id, kind, text, replayed)  # before journaling: a crash here re-applies the move
        if not replayed:
            self.journal.moves.append(recorded)
            self.journal.save()
        return task

    def can_pay(self, account: AccountId, amount: Amount) -> bool:
        return self.ledger.has_account(account) and self.ledger.balance(account) >= amount

    # -- funding

    def fund(self) -> None:
        for account, amount in self.s.funding:
            open_account(self.ledger, f"market/open/{account}", account)
            mint(self.ledger, f"market/mint/{account}", account, amount)
        parts = ", ".join(f"{a} {n}" for a, n in self.s.funding)
        self.emit("", "fund", f"funded {len(self.s.funding)} accounts: {parts}")

    # -- one task

    def run_task(self, index: int) -> TaskReport:
        s, t = self.s, f"job-{index}"
        spec = _with_seed(s.spec, s.spec.seed + index)
        before = self.cached(f"plan/{t}/balances", self.ledger.get_accounts)  # journaled before the post
        now = self.clock + 1
        job_id = self.cached(f"plan/{t}/job_id", lambda: _job_id(spec))
        condition = s.condition
        self.compute = []
        task = self.play(Post(t, now, SUBMITTER, s.flops, make_requirements({}, [spec.numerics]), job_id, condition,
                              s.detection), "post",
                         f"{SUBMITTER} posts job {job_id[:16]}: {spec.model.name} x {spec.steps} steps "
                         f"({s.flops:.3g} FLOPs): fee estimate {compute_fee_estimate(s.flops, s.params)} escrowed"
                         + (f"; pays only if the certified {condition[0]} {condition[1]} {condition[2]:g}" if condition else ""))
        bids = self.bid(task, spec, now + 1)
        task = self.play(CloseAuction(t, task.bid_deadline), "auction", "auction closed")
        verifications: list[VerificationReport] = []
        disputes: list[DisputeReport] = []
        if task.phase == FINAL:
            self.emit(t, "auction", "no compliant bid: the fee is refunded")
            return self.task_report(task, bids, False, verifications, disputes, before)
        self.emit(t, "auction", f"{task.solver} wins at {task.price} (of {task.max_price}); losers' deposits "
                                "returned")
        cheated = task.solver in s.cheaters
        salt = _salt(s.seed, t, task.solver)
        forced = compute_is_forced(bytes.fromhex(task.forced_beacon), salt, s.params.forced_error_bps)
        published, true_path = self.work(task, spec, cheated, forced)
        location = self.publish(t, 0, published)
        task = self.play(Commit(t, task.last_tick + 1, task.solver, self.root(published)), "commit",
                         f"{task.solver} locks its bond {s.params.solver_bond} and commits "
                         f"{self.root(published)[:16]}" + (f", published at {location}" if self.publisher else ""))
        while task.phase == COMMITTED:
            task = self.verify_round(task, location, verifications)
            reveal = Reveal(t, task.whistle_deadline, task.solver, salt,
                            self.root(true_path) if forced and task.round == 0 else "")
            round_before = task.round
            task = self.play(reveal, "reveal", f"{task.solver} reveals its salt")
            if task.round > round_before:
                self.emit(t, "reveal", self.forced_text(task, verifications))
                location = self.publish(t, task.round, true_path)
        if task.phase == CHALLENGED:
            task = self.settle_dispute(task, location, verifications, disputes)
        report = self.task_report(task, bids, cheated, verifications, disputes, before,
                                  location if isinstance(location, str) else "")
        changes = ", ".join(f"{a} {d:+d}" for a, d in report.changes)
        self.emit(t, "settle", f"final: {task.outcome}; balance changes: {changes or 'none'}")
        return report

    def forced_text(self, task: Task, verifications: list[VerificationReport]) -> str:
        caught = [v.verifier for v in verifications if v.round == task.round - 1 and v.verdict == "reject"]
        blind = [v.verifier for v in verifications if v.round == task.round - 1 and v.verdict == "unavailable"]
        fooled = [v.verifier for v in verifications if v.round == task.round - 1 and v.verifier not in caught + blind]
        payout = self.s.params.jackpot_payout if caught or blind else 0
        return (f"forced error revealed: {task.solver} had to commit a wrong result; caught by "
                f"{', '.join(caught) or 'nobody'}" + (f", challenged by {', '.join(blind)} (could not fetch it)"
                                                    if blind else "")
                + f" (jackpot payout {payout} shared), approved by {', '.join(fooled) or 'nobody'} (stakes lost); "
                f"round {task.round} verifies the true commitment {task.commitment[:16]}")

    def bid(self, task: Task, spec: JobSpec, now: int) -> tuple[tuple[AccountId, Amount], ...]:
        s, t = self.s, task.task_id
        need = s.params.bid_deposit + s.params.solver_bond
        bidders = self.cached(f"plan/{t}/bidders", lambda: [v for v in s.solvers if self.can_pay(v, need)])
        for solver in s.solvers:
            if solver not in bidders:
                self.emit(t, "bid", f"{solver} sits out: cannot cover a deposit and a bond ({need})")
        bids = []
        for solver in bidders:
            low, span = (0.55, 0.1) if solver in s.cheaters else (0.75, 0.2)
            price = max(1, int(task.max_price * (low + span * _draw(s.seed, t, "price", solver))))
            caps = make_capabilities({}, _CAPS)
            self.play(Bid(t, now, solver, price, caps, compute_salt_digest(_salt(s.seed, t, solver))), "bid",
                      f"{solver} bids {price} (deposit {s.params.bid_deposit} locked)")
            bids.append((solver, price))
        return tuple(bids)

    def root(self, path: Path) -> str:
        return str(self.journal.work[f"root/{path.relative_to(self.workdir).as_posix()}"])

    def publish(self, t: str, r: int, path: Path) -> BundleLocation:
        """The solver publishes the bundle it commits to in round `r`: its local path, or the URL its publisher
        serves it at (journaled as `published/<task>/r<round>`, replaced on a re-run, which serves it anew)."""
        if self.publisher is None:
            return path
        url = self.publisher.publish(path.relative_to(self.workdir).as_posix(), path)
        self.journal.work[f"published/{t}/r{r}"] = url
        self.journal.save()
        self.emit(t, "publish", f"{self.tasks[t].solver} serves {path.name} at {url}")
        return url

    def fetch_as(self, location: BundleLocation, party: AccountId) -> Any:
        """What `party` opens: a local bundle as it is, a URL through its own cache (`workdir/cache/<party>`)."""
        if self.publisher is None:
            return location
        return _fetchable(location, self.workdir / "cache" / party, self.publisher.limits)

    def unavailable(self, exc: Exception) -> str:
        """Why a served bundle could not be fetched; re-raises `exc` when bundles are local (no change there)."""
        if self.publisher is None:
            raise exc
        return f"the bundle is unavailable ({type(exc).__name__}: {_short(str(exc), 300)})"

    def work(self, task: Task, spec: JobSpec, cheated: bool, forced: bool) -> tuple[Path, Path]:
        """The solver's work: train (honestly), forge if it cheats, build the forced error if the beacon says so.
        Returns (the bundle it publishes now, the bundle its true commitment names)."""
        t, solver, base = task.task_id, task.solver, self.workdir / "tasks" / task.task_id
        honest = base / "honest"
        started = time.perf_counter()

        def train() -> str:
            root, timing = _train(spec, honest)
            self.journal.work[f"compute/{t}/train"] = timing  # journaled with the root
            return root

        self.cached(f"root/tasks/{t}/honest", train)
        timing = self.journal.work.get(f"compute/{t}/train", {"steps": 0, "train_s": 0.0, "proof_s": 0.0})
        self.compute += [ComputeEntry(solver, "train", 0, int(timing["steps"]), float(timing["train_s"])),
                         ComputeEntry(solver, "proof", 0, 0, float(timing["proof_s"]),
                                      "checkpoints: capture, hash, write; the manifest")]
        self.emit(t, "train", f"{solver} trains the job for real: root {self.root(honest)[:16]} "
                              f"({time.perf_counter() - started:.1f}s)", f"root/tasks/{t}/honest" in self.preloaded)
        true_path = honest
        n = _segment_count(spec)
        if cheated:
            true_path = base / "forged"
            self.cached(f"root/tasks/{t}/forged",
                        lambda: _altered_bundle(honest, true_path, f"{self.s.seed}/{t}/forged", n // 2 + 1))
            self.emit(t, "train", f"{solver} cheats: forges checkpoints {n // 2 + 1}..{n} (segments "
                                  f"{n // 2}..{n - 1} wrong) in a consistent bundle, root {self.root(true_path)[:16]}",
                      f"root/tasks/{t}/forged" in self.preloaded)
        if not forced:
            return true_path, true_path
        wrong = base / "forced"

        def forced_error() -> str:
            began = time.perf_counter()
            root = _altered_bundle(true_path, wrong, f"{self.s.seed}/{t}/forced", 1)
            self.journal.work[f"compute/{t}/forced"] = time.perf_counter() - began
            return root

        self.cached(f"root/tasks/{t}/forced", forced_error)
        self.compute.append(ComputeEntry(solver, "forced_error", 0, 0,
                                         float(self.journal.work.get(f"compute/{t}/forced", 0.0)),
                                         "writes the wrong bundle the beacon forced"))
        self.emit(t, "train", f"the forced-error beacon picks {solver}: it publishes a wrong bundle (every segment "
                              f"altered), root {self.root(wrong)[:16]}", f"root/tasks/{t}/forced" in self.preloaded)
        return wrong, true_path

    def verify_round(self, task: Task, path: BundleLocation, out: list[VerificationReport]) -> Task:
        s, t, r = self.s, task.task_id, task.round
        start = task.last_tick + 1
        stakers = self.cached(f"plan/{t}/r{r}/verifiers",
                              lambda: [v for v in s.committee if self.can_pay(v, s.params.verifier_stake)])
        for v in s.committee:
            if v not in stakers:
                self.emit(t, "join", f"{v} sits out round {r}: cannot cover the stake {s.params.verifier_stake}")
        for v in stakers:
            task = self.play(Join(t, start, v), "join", f"{v} stakes {s.params.verifier_stake} (round {r})")
        for v in stakers:
            if v in s.silent:
                self.emit(t, "verify", f"{v} is silent: it staked but gives no verdict")
                continue
            task = self.verify_one(task, path, v, start + 1, out)
        for v in [v for v in stakers if v in s.silent]:
            reserve = tuple(u for u in s.verifiers if u not in stakers and u not in {a for a, _ in task.replacements})
            fresh = self.cached(f"plan/{t}/r{r}/replace/{v}", functools.partial(self.first_able, reserve))
            if not fresh:
                self.emit(t, "join", f"nobody in the reserve can take over {v}'s segments: they go unreplayed")
                continue
            task = self.play(Join(t, task.verify_deadline, fresh, v), "join",
                             f"{fresh} stakes {s.params.verifier_stake} and takes over silent {v}'s segments")
            task = self.verify_one(task, path, fresh, task.verify_deadline, out)
        return task

    def first_able(self, candidates: tuple[AccountId, ...]) -> AccountId:
        """The first of `candidates` that can cover a verifier's stake ("" if none)."""
        return next((u for u in candidates if self.can_pay(u, self.s.params.verifier_stake)), "")

    def verify_one(self, task: Task, path: BundleLocation, v: AccountId, now: int,
                   out: list[VerificationReport]) -> Task:
        """One verifier replays its segments and gives its verdict."""
        s, t, r = self.s, task.task_id, task.round
        segments = tuple(sorted(get_verifier_segments(task, v, s.params)))
        key = f"verify/{t}/r{r}/{v}"
        result = self.cached(key, functools.partial(self.check, task, path, v, segments))
        report = VerificationReport(v, r, segments, result["verdict"], tuple(result["failed"]), result["reason"],
                                    result.get("metric"), bool(result.get("evaluation")))
        out.append(report)
        steps, calibration, seconds = (int(result.get("steps", 0)), int(result.get("calibration_steps", 0)),
                                       float(result.get("seconds", 0.0)))
        if steps:
            share = calibration / steps
            self.compute += [ComputeEntry(v, "replay", r, steps - calibration, seconds * (1 - share),
                                          f"segments {_segments_text(segments)}"),
                             ComputeEntry(v, "calibration", r, calibration, seconds * share)]
        certified = f"; certified {s.condition[0]} {report.metric:.6g}" if report.metric is not None and s.condition else ""
        self.emit(t, "verify", f"{v} replays segments {_segments_text(segments)} of {task.commitment[:16]}: "
                               f"{report.verdict}" + (f" ({_short(report.reason)})" if report.reason else "") + certified,
                  key in self.preloaded)
        weight = 0 if report.verdict in ("reject", "unavailable") else WEIGHT_ONE  # cannot verify: never approve
        return self.play(Verdict(t, now, v, weight, report.metric if is_approval(weight) else None), "verdict",
                         f"{v} {'approves' if is_approval(weight) else 'challenges'}"
                         + (" (it cannot verify: the bundle is unavailable)" if report.verdict == "unavailable" else ""))

    def check(self, task: Task, path: BundleLocation, verifier: AccountId, segments: tuple[int, ...]) -> dict[str, Any]:
        """A verifier's real work: replay its segments against the posted commitment (a lazy one does nothing). A
        served bundle it cannot fetch is the verdict 'unavailable' on all its segments (it cannot verify)."""
        if verifier in self.s.lazy:
            return {"verdict": "unchecked", "failed": [], "reason": "lazy: approved without replaying"}
        from pol.verify import verify

        # the segments come from the ledger's beacon, drawn after the commitment (get_verifier_segments); the
        # verifier pins the posted job and commitment, and allows no code beyond pol's built-ins
        if not segments:
            return {"verdict": "accept", "failed": [], "reason": "an empty share: nothing to replay"}
        try:
            report = verify(self.fetch_as(path, verifier), segments=[i + 1 for i in segments],
                            expected_root=task.commitment, expected_job=task.job_id or None,
                            beacon=task.segment_beacon, code=self.s.code)
        except _UNAVAILABLE as exc:
            return {"verdict": "unavailable", "failed": list(segments), "reason": f"cannot verify: {self.unavailable(exc)}"}
        failed = sorted(c.index - 1 for c in report.checks if not c.ok)
        work = {"steps": report.steps_replayed, "calibration_steps": report.calibration_steps,
                "seconds": report.seconds}
        if report.verdict == "accept":
            certified = report.certified_metrics or {}
            metric = certified.get(self.s.condition[0]) if self.s.condition else None
            return {"verdict": "accept", "failed": [], "reason": "", "metric": metric, **work}
        problems = [c.problem for c in report.checks if not c.ok and c.problem]
        bad_eval = [c for c in report.evaluation.checks if not c.ok] if report.evaluation is not None else []
        if not failed and bad_eval:  # a committed metric that does not recompute: the segment ending at its checkpoint
            from pol.bundle import open_bundle

            with open_bundle(self.fetch_as(path, verifier), full=not _is_remote(path)) as b:
                index = b.record_index(bad_eval[0].step)
            return {"verdict": "reject", "failed": [max(index - 1, 0)], "reason": f"evaluation: {bad_eval[0].problem}",
                    "evaluation": True, **work}
        return {"verdict": "reject", "failed": failed or [segments[0]],
                "reason": problems[0] if problems else report.reason, **work}

    def settle_dispute(self, task: Task, path: BundleLocation, verifications: list[VerificationReport],
                       out: list[DisputeReport]) -> Task:
        t, r = task.task_id, task.round
        flagged: dict[int, list[AccountId]] = {}
        for v in verifications:
            if v.round == r and v.verdict in ("reject", "unavailable"):
                for segment in v.failed:
                    flagged.setdefault(segment, []).append(v.verifier)
        wrong = []
        proved = self.cached(f"job/{t}/r{r}", functools.partial(self.referee_job, path))
        if isinstance(proved, dict):  # the referee cannot fetch the manifest either: the solver withholds its bundle
            return self.rule_all_wrong(task, flagged, f"for the referee, {proved['unavailable']}", out,
                                       "the bundle committed to is unavailable")
        if task.job_id and proved != task.job_id:  # a public check: no replay, no dispute needed
            why = f"wrong job: the bundle proves job {proved[:16]}, the task posted job {task.job_id[:16]}"
            return self.rule_all_wrong(task, flagged, why, out, "wrong job")
        on_eval = {s for v in verifications if v.round == r and v.verdict == "reject" and v.evaluation for s in v.failed}
        for segment in sorted(flagged):
            key = f"dispute/{t}/r{r}/{segment}"
            self.emit(t, "dispute", f"{', '.join(flagged[segment])} dispute segment {segment} against "
                                    f"{task.solver}" + (" (its evaluation)" if segment in on_eval else ""),
                      key in self.preloaded)
            # a disputed evaluation is not a training step to bisect: the replay referee recomputes the metric
            rule = functools.partial(self.rule_on, path, segment, task.commitment, segment in on_eval)
            result = self.cached(key, functools.partial(_timed, rule))
            out.append(DisputeReport(r, segment, tuple(flagged[segment]), result["ruling"], result["description"]))
            self.add_dispute_compute(r, segment, result, segment in on_eval)
            self.emit(t, "dispute", f"segment {segment}: {result['ruling']}: {_short(result['description'], 300)}",
                      key in self.preloaded)
            if result["ruling"] == "solver_wrong":
                wrong.append(segment)
        ruling = "solver_wrong" if wrong else "challenger_wrong"
        return self.play(Rule(t, task.last_tick + 1, ruling, tuple(wrong)), "rule",
                         f"ruling {ruling}" + (f" on segments {_segments_text(wrong)}" if wrong else ""))

    def add_dispute_compute(self, r: int, segment: int, result: Mapping[str, Any], on_eval: bool) -> None:
        steps, rounds = int(result.get("steps", 0)), int(result.get("rounds", 0))
        seconds, referee = float(result.get("seconds", 0.0)), float(result.get("referee_seconds", 0.0))
        if rounds == 0:  # a single replay: the referee's own work
            self.compute.append(ComputeEntry("referee", "referee", r, steps, seconds,
                                             f"replays segment {segment}" + (" (its evaluation)" if on_eval else "")))
            return
        self.compute += [ComputeEntry("dispute", "dispute", r, steps, max(0.0, seconds - referee),
                                      f"segment {segment}: {rounds} rounds; steps: both sides replay the segment"),
                         ComputeEntry("referee", "referee", r, 0, referee, f"segment {segment}: one operator")]

    def rule_all_wrong(self, task: Task, flagged: Mapping[int, list[AccountId]], why: str, out: list[DisputeReport],
                       summary: str) -> Task:
        """A public check settles every flagged segment against the solver: no replay, no dispute needed."""
        for segment in sorted(flagged):
            out.append(DisputeReport(task.round, segment, tuple(flagged[segment]), "solver_wrong", why))
        self.emit(task.task_id, "dispute", why)
        return self.play(Rule(task.task_id, task.last_tick + 1, "solver_wrong", tuple(sorted(flagged))), "rule",
                         f"ruling solver_wrong: {summary}")

    def referee_job(self, path: BundleLocation) -> str | dict[str, str]:
        """The job the published bundle proves, or {'unavailable': why} when the referee cannot fetch it."""
        try:
            return _bundle_job(self.fetch_as(path, "referee"))
        except _UNAVAILABLE as exc:
            return {"unavailable": self.unavailable(exc)}

    def rule_on(self, path: BundleLocation, segment: int, commitment: str, on_eval: bool) -> dict[str, Any]:
        """The ruling on one disputed segment: the dispute callable's (the replay referee's for a disputed
        evaluation, which recomputes the metric). A served bundle is opened by the referee ONCE, its manifest
        checked against the posted commitment and the segment's two checkpoints fetched and checked, and that
        opened bundle (`pol.bundle.Bundle`) is what the dispute callable gets: a server cannot show the referee
        the committed manifest and the dispute another one. If the referee cannot fetch what the solver committed
        to, the solver is wrong without a dispute (it does not serve its commitment), so a verifier is never
        slashed for a server that lies or is gone."""
        if self.publisher is None:
            return self._ruling(path, segment, on_eval)
        from pol.bundle import open_bundle
        from pol.errors import BundleError

        try:
            opened = open_bundle(self.fetch_as(path, "referee"), full=False)
        except (*_UNAVAILABLE, BundleError) as exc:
            return self._withheld(segment, f"cannot fetch segment {segment} as committed ({type(exc).__name__}: "
                                           f"{_short(str(exc), 300)})")
        with opened:
            if opened.manifest.root != commitment:
                return self._withheld(segment, f"is served root {opened.manifest.root[:16]}, not the commitment "
                                               f"{commitment[:16]}")
            try:
                for record in opened.records[segment:segment + 2]:
                    opened.load_state(record.step)
            except (*_UNAVAILABLE, BundleError) as exc:
                return self._withheld(segment, f"cannot fetch segment {segment} as committed ({type(exc).__name__}: "
                                               f"{_short(str(exc), 300)})")
            return self._ruling(opened, segment, on_eval)

    def _withheld(self, segment: int, why: str) -> dict[str, Any]:
        return {"ruling": "solver_wrong", "description": f"the referee {why}: the solver does not serve what it "
                                                        "committed to"}

    def _ruling(self, bundle: Any, segment: int, on_eval: bool) -> dict[str, Any]:
        try:
            if on_eval:
                return dataclasses.asdict(replay_dispute(bundle, segment, code=self.s.code))
            return dataclasses.asdict(_normalise(self.dispute(bundle, segment)))
        except _UNAVAILABLE as exc:  # gone during the dispute: the solver withholds what it committed to
            return {"ruling": "solver_wrong", "description": f"segment {segment}: for the referee, "
                                                             f"{self.unavailable(exc)}"}

    def task_report(self, task: Task, bids: tuple[tuple[AccountId, Amount], ...], cheated: bool,
                    verifications: list[VerificationReport], disputes: list[DisputeReport],
                    before: Mapping[AccountId, Amount], location: str = "") -> TaskReport:
        after = self.ledger.get_accounts()
        changes = tuple((a, after[a] - before.get(a, 0)) for a in sorted(after) if after[a] != before.get(a, 0))
        certified = [m for v, m in task.metrics if v in {a for a, w in task.verdicts if is_approval(w)}]
        median = sorted(certified)[(len(certified) - 1) // 2] if certified else None
        compute = tuple(self.compute)
        return TaskReport(task.task_id, task.submitter, task.flops, task.max_price, bids, task.solver, task.price,
                          cheated, task.forced, task.commitment, task.outcome, tuple(verifications),
                          tuple(disputes), changes, task.condition, median, task.detection, self.s.params.sampling,
                          compute, compute_tax(compute), location)


# ---------------------------------------------------------------------------------------------------- entry point


def _timed(rule: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    began = time.perf_counter()
    result = rule()
    return {**result, "seconds": time.perf_counter() - began}


def _verify_names(what: str, names: Sequence[str], pool: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(pool))
    if unknown:
        raise MarketError(f"market.{what}", f"{unknown} are not among {list(pool)}")


def _funding(params: GameParams, max_price: Amount, n_tasks: int, solvers: Sequence[str],
             verifiers: Sequence[str]) -> tuple[tuple[AccountId, Amount], ...]:
    """Enough for every task (fees, two rounds of stakes, a forced-error payout each), and a solver can afford one lost
    bond but not two: a cheater caught once sits out."""
    solver = params.bid_deposit + params.solver_bond + params.solver_bond // 2
    verifier = 2 * n_tasks * params.verifier_stake
    return ((SUBMITTER, n_tasks * max_price), *((s, solver) for s in solvers), *((v, verifier) for v in verifiers),
            (params.jackpot_account, n_tasks * params.jackpot_payout))


def run_market(
    workdir: Path,
    *,
    ledger_path: Path | None = None,
    ledger: Ledger | None = None,
    spec: JobSpec | None = None,
    params: GameParams | None = None,
    n_tasks: int = 2,
    n_solvers: int = 3,
    n_verifiers: int = 3,
    cheaters: Sequence[str] = ("solver-2",),
    lazy_verifiers: Sequence[str] = (),
    seed: int = 0,
    on_event: EventCallback | None = None,
    dispute: DisputeFn | None = None,
    allow_code: Sequence[str] = (),
    condition: tuple[str, str, float] | None = None,
    sampling: str | None = None,
    detection: tuple[float, float] | None = None,
    committee: int | None = None,
    silent_verifiers: Sequence[str] = (),
    publish: str | Publisher = "local",
) -> MarketReport:
    """Run a whole market with real work in `workdir` (bundles under `tasks/<id>/`, the journal `JOURNAL_NAME`) and
    return its report. Parties are `submitter`, `solver-1..n`, `verifier-1..n` and the jackpot account.

    The ledger is `ledger` if given, else a `SqliteLedger` at `ledger_path` (default `workdir/ledger.db`) seeded
    from `seed`. `spec` defaults to `get_default_spec()`; task i trains it with its seed shifted by i. `params`
    defaults to `get_market_params(spec)`; its `n_segments` always becomes the spec's segment count. `cheaters`
    (solver names) forge half their checkpoints; `lazy_verifiers` approve without replaying. `allow_code` is the
    verifiers' allow-list (packages whose user code a spec may name; pol's built-ins always). `dispute(bundle,
    segment)` returns a `DisputeOutcome` (or a bare ruling string); `bundle` is the local path, or for a served
    bundle the `pol.bundle.Bundle` the referee opened once and checked against the commitment; default:
    `default_dispute` under the same allow-list. `condition` = (metric, one of ">=", ">", "<=", "<", threshold) posts every task with an outcome
    condition on a metric of the spec's evaluation: the solver is paid only if the approvers' certified final
    metric meets it, else the task ends 'target_missed' (see games.task). `sampling` ('independent' or 'shared')
    overrides `params.sampling`; `detection` = (confidence, cheat fraction) posts every task with a required
    detection that sizes the sample (`games.task.get_sample_size`). `committee` seats the first that many verifiers
    on every task (default: all); the others are the reserve that takes over the share of a verifier in
    `silent_verifiers` (one that stakes and never gives a verdict: it is slashed). `publish` is where solvers
    publish their bundles: 'local' (the default: every party reads the solver's directory), 'http' (each bundle
    served over loopback HTTP for the run, every party fetching by URL into `workdir/cache/<party>`; see the module
    docstring for a bundle that changes or cannot be fetched) or a `Publisher` the caller owns. `on_event` gets
    every `MarketEvent`; an exception it raises propagates, and a re-run on the same work directory goes on from
    the journal and finishes exactly once.

    Raises MarketError (a cheater, lazy or silent verifier that is not a party, a bad count, committee or publish mode, a journal of another market or
    one the run diverged from, a dispute callable that does not rule), BadMove (params out of range, before anything
    is written), LedgerError (a given ledger whose accounts another market opened; LedgerCorrupt if the ledger fails
    its invariants at the end), and what `pol.prove.train_and_prove` / `pol.verify.verify` / the dispute callable
    raise (SpecError, DataDiffers, ...).
    """
    started = time.perf_counter()
    if min(n_tasks, n_solvers, n_verifiers) < 1:
        raise MarketError("market.counts", "need at least one task, one solver and one verifier")
    solvers = tuple(f"solver-{i}" for i in range(1, n_solvers + 1))
    verifiers = tuple(f"verifier-{i}" for i in range(1, n_verifiers + 1))
    _verify_names("cheaters", cheaters, solvers)
    _verify_names("lazy_verifiers", lazy_verifiers, verifiers)
    _verify_names("silent_verifiers", silent_verifiers, verifiers)
    seats = n_verifiers if committee is None else committee
    if type(seats) is not int or not 1 <= seats <= n_verifiers:
        raise MarketError("market.committee", f"a committee of {committee!r} is not 1..{n_verifiers} verifiers")
    spec = spec if spec is not None else get_default_spec()
    game = get_market_params(spec, params)
    if sampling is not None:
        game = dataclasses.replace(game, sampling=sampling)
    verify_params(game)
    if detection is not None:
        detection = (float(detection[0]), float(detection[1])) if isinstance(detection, (tuple, list)) else detection
        verify_detection(detection)
    flops = compute_job_flops(spec, _count_params(spec))
    funding = _funding(game, compute_fee_estimate(flops, game), n_tasks, solvers, verifiers)
    code = CodePolicy.allowing(allow_code)
    if condition is not None:
        names = [m.name for m in spec.evaluation.metrics] if spec.evaluation is not None else []
        if not isinstance(condition, (tuple, list)) or len(condition) != 3 or condition[0] not in names:
            raise MarketError("market.condition", f"{condition!r} is not (metric, comparison, threshold) on one of the "
                                                  f"spec's evaluation metrics {names}")
        condition = (str(condition[0]), str(condition[1]), float(condition[2]))
    publisher, owned = _get_publisher(publish)
    setup = _Setup(seed, spec, game, flops, solvers, verifiers, frozenset(cheaters), frozenset(lazy_verifiers),
                   funding, code, condition or (), detection or (), verifiers[:seats], frozenset(silent_verifiers))
    config = json.loads(json.dumps({"seed": seed, "spec": spec.to_dict(), "params": dataclasses.asdict(game),
                                    "n_tasks": n_tasks, "solvers": solvers, "verifiers": verifiers,
                                    "cheaters": sorted(cheaters), "lazy": sorted(lazy_verifiers),
                                    **({"condition": list(condition)} if condition else {}),
                                    **({"detection": list(detection)} if detection else {}),
                                    **({"committee": seats} if seats != n_verifiers else {}),
                                    **({"silent": sorted(silent_verifiers)} if silent_verifiers else {})}))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path: Path | None = None
    own: SqliteLedger | None = None
    try:
        journal = _Journal(workdir / JOURNAL_NAME, config)
        if ledger is None:
            path = Path(ledger_path or workdir / "ledger.db")
            ledger = own = SqliteLedger(path, blake3(_DOMAIN + f"ledger\x00{seed}".encode()).digest())
        active: Ledger = ledger
        referee = ({"cache_dir": workdir / "cache" / "referee", "limits": publisher.limits} if publisher else {})
        market = _Market(setup, active, journal, workdir, on_event,
                         dispute or functools.partial(default_dispute, code=code, **referee), publisher)
        if journal.resumed:
            market.emit("", "resume", f"resuming from {journal.path.name}: {len(journal.moves)} moves recorded")
        market.fund()
        reports = tuple(market.run_task(i) for i in range(n_tasks))
        verify_ledger(active)
        balances = dict(sorted(active.get_accounts().items()))
        market.emit("", "done", "balances: " + ", ".join(f"{a} {b}" for a, b in balances.items()))
        return MarketReport(workdir, path, seed, reports, dict(funding), balances, active.total_supply(),
                            len(active.events()), market.emitted, journal.resumed, time.perf_counter() - started,
                            compute_tax(e for r in reports for e in r.compute))
    finally:
        if own is not None:
            own.close()
        if owned:
            publisher.close()  # type: ignore[union-attr]


def render_compute(report: MarketReport) -> str:
    """The compute table of a market: every party's compute per task, each task's protocol tax, and the total."""
    lines = [f"{'task':<8} {'party':<12} {'kind':<13} {'round':>5} {'steps':>7} {'seconds':>9}  note"]
    for task in report.tasks:
        for e in task.compute:
            lines.append(f"{task.task_id:<8} {e.party:<12} {e.kind:<13} {e.round:>5} {e.steps:>7} {e.seconds:>9.3f}"
                         + (f"  {e.note}" if e.note else ""))
        lines.append(f"{task.task_id:<8} {_tax_text(task.tax)}  [{task.sampling} sampling"
                     + (f", detection {task.detection[0]:g} of f={task.detection[1]:g}" if task.detection else "")
                     + "]")
    lines.append(f"{'total':<8} {_tax_text(report.tax)}")
    return "\n".join(lines) + "\n"


def _tax_text(t: TaxSummary) -> str:
    return (f"training {t.training_steps} steps {t.training_seconds:.3f} s; protocol {t.protocol_steps} steps "
            f"{t.protocol_seconds:.3f} s; tax {100 * t.tax_steps:.1f}% of steps, {100 * t.tax_seconds:.1f}% of seconds")


def report_to_dict(report: MarketReport) -> dict[str, Any]:
    """A JSON-ready view of a market report (paths as strings)."""
    body = dataclasses.asdict(report)
    body["workdir"] = str(report.workdir)
    body["ledger_path"] = str(report.ledger_path) if report.ledger_path else None
    return json.loads(json.dumps(body))
