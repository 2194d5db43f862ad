"""Train-and-prove: the solver trains a spec and writes a proof bundle, resumable after a crash.

While training, the output directory holds the checkpoints written so far (each replaced atomically) and
`progress.jsonl`, a journal of the resolved spec and one line per checkpoint on disk. `--resume` reloads the last checkpoint, checks it against its
record, and goes on; since every step is a pure function of (spec, state, step), the finished bundle has the same
commitment as an uninterrupted run on the same machine. The manifest is written last.

The output is checked before anything is built, the model is run once on a batch before the first step (a model
that cannot run on its data fails with one line, not a traceback), and a run that fails before its first
checkpoint after step 0 leaves no output behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .bundle import BundleWriter, FileEntry, Manifest, checkpoint_name, manifest_from_dict, pack_bundle
from .canonical import canonical_json, parse_json_strict
from .components import CodePolicy
from .data import data_digest as compute_data_digest
from .digest import state_digest
from .engine import (
    HooksForStep,
    Runtime,
    build_runtime,
    capture_state,
    describe_environment,
    dry_run,
    expected_layout,
    initial_state,
    resolve_spec,
    restore_state,
    run_steps,
)
from .errors import OutputExists, PolError, ResumeError, SpecError
from .evaluate import Evaluator, build_eval_dataset
from .spec import JobSpec, spec_from_dict
from .trace import EMPTY_DATA, Record, record_from_dict
from .verify import split_changes_math

if TYPE_CHECKING:
    from .distributed import DataParallelGroup

__all__ = ["train_and_prove", "check_output", "ProveResult", "PROGRESS_NAME"]

PROGRESS_NAME = "progress.jsonl"
BACKGROUND_MIN_BYTES = 16 << 20  # parameters at least this large are checkpointed by a background thread
ProgressCallback = Callable[[int, int, float], None]  # (step reached, total steps, loss)


@dataclass(frozen=True, slots=True)
class ProveResult:
    path: Path  # the bundle (directory, or archive when --out ends in .tar)
    manifest: Manifest
    resumed_from: int | None  # the step training resumed at, if it did


def _append_progress(directory: Path, spec: JobSpec, record: Record, name: str, entry: FileEntry) -> None:
    """Add one checkpoint to the progress journal (`progress.jsonl`: the spec on its first line, then one line per
    checkpoint, each appended once its checkpoint is completely on disk). Appending keeps the cost per checkpoint
    constant (rewriting every record at every checkpoint made long runs quadratic); a crash mid-line leaves a torn
    last line, which resuming drops (its checkpoint is written again)."""
    path = directory / PROGRESS_NAME
    lines = [] if path.exists() else [canonical_json({"spec": spec.to_dict()})]
    lines.append(json.dumps({"record": record.to_dict(), "file": [name, entry.to_dict()]}, sort_keys=True, allow_nan=False))
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _load_progress(directory: Path, spec: JobSpec) -> tuple[list[Record], dict[str, FileEntry], dict[str, torch.Tensor]]:
    """The records, file entries and last state of an interrupted run. Raises ResumeError."""
    path = directory / PROGRESS_NAME
    if not path.is_file():
        raise ResumeError(f"nothing to resume in {directory}: no {PROGRESS_NAME} (the run finished or never started)")
    try:
        raw = path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # a last line without its newline was torn by a crash mid-write
        if len(complete) != len(raw):  # cut it off, so the next checkpoint's line starts on a line of its own
            with open(path, "r+b") as f:
                f.truncate(len(complete))
        lines = [line for line in complete.decode("utf-8").split("\n") if line]
        saved = spec_from_dict(parse_json_strict(lines[0].encode())["spec"], require_resolved=True)
        records: list[Record] = []
        files: dict[str, FileEntry] = {}
        for i, line in enumerate(lines[1:]):
            entry = parse_json_strict(line.encode())
            records.append(record_from_dict(entry["record"], f"records[{i}]"))
            name, info = entry["file"]
            files[str(name)] = FileEntry(int(info["size"]), str(info["blake3"]))
    except (ValueError, KeyError, TypeError, IndexError, OSError, PolError) as exc:  # UnicodeDecodeError is a ValueError
        raise ResumeError(f"{path} is damaged: {exc}") from None
    if saved.job_id != spec.job_id:
        raise ResumeError(f"{directory} holds a different job ({saved.job_id[:12]}), not {spec.job_id[:12]}: same flags needed")
    if not records:
        raise ResumeError(f"{path} holds no records")
    if [r.step for r in records] != [spec.checkpoint_step(i) for i in range(len(records))]:
        raise ResumeError(f"{path} is damaged: its records are not the spec's checkpoints in order")
    last = records[-1]
    try:
        state = load_file(str(directory / checkpoint_name(last.step)))
    except (SafetensorError, OSError) as exc:
        raise ResumeError(f"cannot read the last checkpoint (step {last.step}): {exc}") from None
    if state_digest(state) != last.state:
        raise ResumeError(f"the checkpoint at step {last.step} does not match its record: start afresh with --force")
    return records, files, state


def check_output(out: str | Path, *, resume: bool = False, force: bool = False) -> None:
    """Refuse an existing output (a bundle directory, or an archive ending in .tar) before anything is built.
    Raises OutputExists."""
    out = Path(out)
    archive = out if out.suffix == ".tar" else None
    directory = out.with_name(out.name + ".partial") if archive else out
    if archive is not None and archive.exists() and not force:
        raise OutputExists(f"output {archive} exists: pass --force to replace it")
    if not resume and not force and directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise OutputExists(f"output {directory} exists and is not empty: pass --resume to continue it or --force to replace it")


def _prepare_output(directory: Path, *, resume: bool, force: bool) -> bool:
    """Make the output directory; True if this run created it (and so may remove it if it fails early)."""
    if resume:
        return False
    if directory.exists() and force:
        shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    return created


def train_and_prove(
    spec: JobSpec,
    out: str | Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    data_dir: str | None = None,
    split: int | None = None,
    hooks: HooksForStep | None = None,
    env_note: str | None = None,
    code: CodePolicy | None = None,
    eval_data_dir: str | None = None,
    data_parallel: DataParallelGroup | None = None,
) -> ProveResult:
    """Train `spec` and write its proof bundle to `out` (a directory, or an archive if it ends in `.tar`).

    `split` runs each batch in micro-batches of that size without changing the spec: an execution choice (less
    memory) that native numerics tolerates; exact numerics refuses it unless it equals the spec's `microbatch`.
    `hooks` runs chosen steps under extra contexts (pinpoint's deliberately faulty solvers); `env_note` is recorded
    in the bundle's environment information. `code`: which user code the spec may import (default: whatever it
    names, since the caller chose to train it). A spec with an evaluation is evaluated at every checkpoint (step 0
    and the last included; pol.evaluate) and the metrics committed in its records; `eval_data_dir` says where a
    `dir:` evaluation dataset lives (default: the path the spec names). `data_parallel` (pol.distributed): this
    process's share of a data-parallel run; every process calls this with the same arguments, only rank 0 touches
    the output (checkpoints, records, progress, manifest; it reads the checkpoint to resume from and broadcasts it)
    and evaluates, every process checks the others' state digests at each checkpoint (RankDiverged), and every
    process returns rank 0's result.

    Raises OutputExists (before anything is built), SpecError, ComponentError, UserCodeError, DataError,
    DeviceUnavailable, NumericsUnavailable, TrainingError, ResumeError.
    """
    out = Path(out)
    if split is not None and spec.numerics == "exact" and split != spec.microbatch:
        raise SpecError("exact numerics fixes the micro-batch size in the spec: set microbatch there instead of split")
    if split is not None and (split < 1 or spec.batch_size % split):
        raise SpecError(f"split {split} does not divide batch_size {spec.batch_size}")
    archive = out if out.suffix == ".tar" else None
    directory = out.with_name(out.name + ".partial") if archive else out
    dp = data_parallel
    lead = dp is None or dp.rank == 0  # the one process that writes
    if lead:
        check_output(out, resume=resume, force=force)
    rt = build_runtime(spec, device=device, data_dir=data_dir, code=code or CodePolicy.trust_all_code())
    rt.data_parallel = dp
    evaluator = None
    if spec.evaluation is not None:
        eval_data = build_eval_dataset(spec, data_dir=eval_data_dir, code=rt.code)  # checked if the spec binds it
        if spec.evaluation.data_digest is None:  # bound here, from the data just built (resolve_spec would build it again)
            spec = rt.spec = spec.replace(evaluation=dataclasses.replace(spec.evaluation, data_digest=compute_data_digest(eval_data)))
    if not spec.is_resolved:
        spec = rt.spec = resolve_spec(spec, rt.dataset)
    if spec.evaluation is not None and lead:
        evaluator = Evaluator(spec, eval_data, code=rt.code, loss_fn=rt.loss_fn)
    if not resume:
        dry_run(rt)
    why = split_changes_math(rt)
    if split is not None and split != (spec.microbatch or spec.batch_size) and why:
        raise SpecError(f"the job {why} depend on how a batch is split: splitting it is not an execution choice "
                        "here; set microbatch in the spec instead of split")
    created = _prepare_output(directory, resume=resume, force=force) if lead else False
    resumed_from = None
    if resume:
        records, files, state = _load_progress(directory, spec) if lead else ([], {}, None)
        if dp is not None:
            state = dp.share_state(state, lambda step: expected_layout(rt, step))
        assert state is not None
        restore_state(rt, state)
        resumed_from = rt.step
    else:
        records, files = [], {}  # the step-0 checkpoint is written in the background like every other
    writer = BundleWriter(directory, spec, records, files, previous=state if resume else None) if lead else None
    try:
        _train_remaining(rt, writer, on_progress, split, hooks, first=None if resume else initial_state(rt), evaluator=evaluator)
    except BaseException:
        if created and len(writer.records) <= 1:  # nothing worth resuming: leave no output behind
            shutil.rmtree(directory, ignore_errors=True)
        raise
    env = {**describe_environment(rt.device), **({"note": env_note} if env_note else {})}
    if dp is not None:
        env["processes"] = dp.world
    manifest = None
    if writer is not None:
        manifest = writer.finish(env)
        (directory / PROGRESS_NAME).unlink()
        if archive:
            pack_bundle(directory, archive)
            shutil.rmtree(directory)
    if dp is not None:
        manifest = manifest_from_dict(dp.share_object(manifest.to_dict() if manifest is not None else None))
    assert manifest is not None
    return ProveResult(archive or directory, manifest, resumed_from)


def _train_remaining(
    rt: Runtime,
    writer: BundleWriter | None,
    on_progress: ProgressCallback | None,
    split: int | None,
    hooks: HooksForStep | None,
    first: dict | None = None,
    evaluator: Evaluator | None = None,
) -> None:
    """Train segment by segment. A large checkpoint is hashed and written by a background thread while the next
    segment trains (at most one write in flight, so at most two states in memory); a small one is written at once,
    since its cost is Python work that would only contend with training for the interpreter lock. `progress.jsonl`
    only ever names checkpoints that are completely on disk, so a crash at any instant leaves a resumable directory.
    With an `evaluator`, each checkpoint's state is evaluated (on the live model, before training goes on) and its
    metrics go into its record."""
    spec = rt.spec
    callback = (lambda step, loss: on_progress(step, spec.steps, loss)) if on_progress else None
    background = sum(p.numel() * p.element_size() for p in rt.params.values()) >= BACKGROUND_MIN_BYTES

    def persist(target: int, state: dict, data_digest: str, loss: float | None, metrics: dict[str, float] | None) -> None:
        if rt.data_parallel is not None:  # every process holds the same state, or none writes it
            rt.data_parallel.check_digests(target, state_digest(state))
        if writer is None:
            return
        record = writer.add(target, state, data_digest, loss, metrics)
        name = checkpoint_name(target)
        _append_progress(writer.directory, spec, record, name, writer.files[name])

    def submit(pool: ThreadPoolExecutor, target: int, state: dict, data_digest: str, loss: float | None) -> Future[None] | None:
        metrics = evaluator(rt.model, step=target, device=rt.device) if evaluator is not None else None
        if background and rt.data_parallel is None:  # collectives stay on the training thread
            return pool.submit(persist, target, state, data_digest, loss, metrics)
        persist(target, state, data_digest, loss, metrics)
        return None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pol-checkpoint") as pool:
        pending: Future[None] | None = None
        if first is not None:  # the step-0 state: hashed and written while the first segment trains
            pending = submit(pool, 0, first, EMPTY_DATA, None)
        spare: list[dict | None] = [None, None]  # two state copies, alternating: one being written, one filling
        try:
            for count, target in enumerate([t for t in spec.checkpoint_steps if t > rt.step]):
                segment = run_steps(rt, target, microbatch=split, on_step=callback, hooks=hooks)
                slot = count % 2
                # a copy, since training goes on mutating the live tensors; the write in flight holds the other one
                state = spare[slot] = capture_state(rt, into=spare[slot])
                if pending is not None:
                    pending.result()  # re-raises a failed write here
                pending = submit(pool, target, state, segment.data_digest, segment.loss)
        finally:
            if pending is not None:
                pending.result()
