"""Train-and-prove: the solver trains a spec and writes a proof bundle, resumable after a crash.

While training, the output directory holds the checkpoints written so far and `progress.json` (the resolved spec
and the records so far), both replaced atomically. `--resume` reloads the last checkpoint, checks it against its
record, and goes on; since every step is a pure function of (spec, state, step), the finished bundle has the same
commitment as an uninterrupted run on the same machine. The manifest is written last.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .bundle import FileEntry, Manifest, checkpoint_name, pack_bundle, write_checkpoint, write_manifest
from .canonical import canonical_json, parse_json_strict
from .digest import combine_digests, state_digest
from .engine import (
    HooksForStep,
    Runtime,
    build_runtime,
    capture_state,
    describe_environment,
    initial_state,
    resolve_spec,
    restore_state,
    run_steps,
)
from .errors import PolError, ResumeError, SpecError
from .spec import JobSpec, spec_from_dict
from .trace import EMPTY_DATA, Record, compute_trace_commitment, record_from_dict

__all__ = ["train_and_prove", "ProveResult", "PROGRESS_NAME"]

PROGRESS_NAME = "progress.json"
BACKGROUND_MIN_BYTES = 16 << 20  # parameters at least this large are checkpointed by a background thread
ProgressCallback = Callable[[int, int, float], None]  # (step reached, total steps, loss)


@dataclass(frozen=True, slots=True)
class ProveResult:
    path: Path  # the bundle (directory, or archive when --out ends in .tar)
    manifest: Manifest
    resumed_from: int | None  # the step training resumed at, if it did


def _write_progress(directory: Path, spec: JobSpec, records: list[Record], files: dict[str, FileEntry]) -> None:
    tmp = directory / (PROGRESS_NAME + ".tmp")
    body = {"spec": spec.to_dict(), "records": [r.to_dict() for r in records], "files": {n: e.to_dict() for n, e in files.items()}}
    tmp.write_text(canonical_json(body), encoding="ascii")
    os.replace(tmp, directory / PROGRESS_NAME)


def _load_progress(directory: Path, spec: JobSpec) -> tuple[list[Record], dict[str, FileEntry], dict[str, torch.Tensor]]:
    """The records, file entries and last state of an interrupted run. Raises ResumeError."""
    path = directory / PROGRESS_NAME
    if not path.is_file():
        raise ResumeError(f"nothing to resume in {directory}: no {PROGRESS_NAME} (the run finished or never started)")
    try:
        body = parse_json_strict(path.read_text(encoding="ascii"))
        saved = spec_from_dict(body["spec"], require_resolved=True)
        records = [record_from_dict(r, f"records[{i}]") for i, r in enumerate(body["records"])]
        files = {n: FileEntry(int(e["size"]), str(e["blake3"])) for n, e in body["files"].items()}
    except (ValueError, KeyError, TypeError, PolError) as exc:
        raise ResumeError(f"{path} is damaged: {exc}") from None
    if saved.job_id != spec.job_id:
        raise ResumeError(f"{directory} holds a different job ({saved.job_id[:12]}), not {spec.job_id[:12]}: same flags needed")
    if not records:
        raise ResumeError(f"{path} holds no records")
    last = records[-1]
    try:
        state = load_file(str(directory / checkpoint_name(last.step)))
    except (SafetensorError, OSError) as exc:
        raise ResumeError(f"cannot read the last checkpoint (step {last.step}): {exc}") from None
    if state_digest(state) != last.state:
        raise ResumeError(f"the checkpoint at step {last.step} does not match its record: start afresh with --force")
    return records, files, state


def _prepare_output(directory: Path, *, resume: bool, force: bool) -> None:
    if resume:
        return
    if directory.exists() and any(directory.iterdir()):
        if not force:
            raise PolError(f"output {directory} exists and is not empty: pass --resume to continue it or --force to replace it")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)


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
) -> ProveResult:
    """Train `spec` and write its proof bundle to `out` (a directory, or an archive if it ends in `.tar`).

    `split` runs each batch in micro-batches of that size without changing the spec: an execution choice (less
    memory) that native numerics tolerates; exact numerics refuses it unless it equals the spec's `microbatch`.
    `hooks` runs chosen steps under extra contexts (pinpoint's deliberately faulty solvers); `env_note` is recorded
    in the bundle's environment information.

    Raises SpecError, ComponentError, DataError, DeviceUnavailable, NumericsUnavailable, TrainingError, ResumeError.
    """
    out = Path(out)
    if split is not None and spec.numerics == "exact" and split != spec.microbatch:
        raise SpecError("exact numerics fixes the micro-batch size in the spec: set microbatch there instead of split")
    if split is not None and (split < 1 or spec.batch_size % split):
        raise SpecError(f"split {split} does not divide batch_size {spec.batch_size}")
    archive = out if out.suffix == ".tar" else None
    directory = out.with_name(out.name + ".partial") if archive else out
    if archive and archive.exists() and not force:
        raise PolError(f"output {archive} exists: pass --force to replace it")
    rt = build_runtime(spec, device=device, data_dir=data_dir)  # checks the data digest if the spec has one
    if not spec.is_resolved:
        spec = rt.spec = resolve_spec(spec, rt.dataset)
    job_id = spec.job_id
    _prepare_output(directory, resume=resume, force=force)
    resumed_from = None
    if resume:
        records, files, state = _load_progress(directory, spec)
        restore_state(rt, state)
        resumed_from = rt.step
    else:
        records, files = [], {}  # the step-0 checkpoint is written in the background like every other
    _train_remaining(rt, directory, records, files, on_progress, split, hooks, first=None if resume else initial_state(rt))
    merkle, commitment = compute_trace_commitment(job_id, records)
    env = {**describe_environment(rt.device), **({"note": env_note} if env_note else {})}
    manifest = Manifest(spec, tuple(records), merkle, commitment, files, env)
    write_manifest(directory, manifest)
    (directory / PROGRESS_NAME).unlink()
    if archive:
        pack_bundle(directory, archive)
        shutil.rmtree(directory)
    return ProveResult(archive or directory, manifest, resumed_from)


def _train_remaining(
    rt: Runtime,
    directory: Path,
    records: list[Record],
    files: dict[str, FileEntry],
    on_progress: ProgressCallback | None,
    split: int | None,
    hooks: HooksForStep | None,
    first: dict | None = None,
) -> None:
    """Train segment by segment. A large checkpoint is hashed and written by a background thread while the next
    segment trains (at most one write in flight, so at most two states in memory); a small one is written at once,
    since its cost is Python work that would only contend with training for the interpreter lock. `progress.json`
    only ever names checkpoints that are completely on disk, so a crash at any instant leaves a resumable directory."""
    spec = rt.spec
    callback = (lambda step, loss: on_progress(step, spec.steps, loss)) if on_progress else None
    background = sum(p.numel() * p.element_size() for p in rt.params.values()) >= BACKGROUND_MIN_BYTES

    def persist(target: int, state: dict, data_digest: str, loss: float | None) -> None:
        per_tensor: dict[str, str] = {}
        files[checkpoint_name(target)] = write_checkpoint(directory, target, state, spec.job_id, per_tensor)
        records.append(Record(target, combine_digests(per_tensor), data_digest, loss))
        _write_progress(directory, spec, records, files)

    def submit(writer: ThreadPoolExecutor, target: int, state: dict, data_digest: str, loss: float | None) -> Future[None] | None:
        if background:
            return writer.submit(persist, target, state, data_digest, loss)
        persist(target, state, data_digest, loss)
        return None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pol-checkpoint") as writer:
        pending: Future[None] | None = None
        if first is not None:  # the step-0 state: hashed and written while the first segment trains
            pending = submit(writer, 0, first, EMPTY_DATA, None)
        spare: list[dict | None] = [None, None]  # two state copies, alternating: one being written, one filling
        try:
            for count, target in enumerate([t for t in spec.checkpoint_steps if t > rt.step]):
                segment = run_steps(rt, target, microbatch=split, on_step=callback, hooks=hooks)
                slot = count % 2
                # a copy, since training goes on mutating the live tensors; the write in flight holds the other one
                state = spare[slot] = capture_state(rt, into=spare[slot])
                if pending is not None:
                    pending.result()  # re-raises a failed write here
                pending = submit(writer, target, state, segment.data_digest, segment.loss)
        finally:
            if pending is not None:
                pending.result()
