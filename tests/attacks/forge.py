"""A forger's toolkit: build cheating bundles from honest ones, each internally consistent.

Every forged bundle has correct file digests, state digests, records, Merkle root and commitment (the "valid hash
chain recomputed over forged checkpoints"), so only replay can catch it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

import pol.engine as engine_module
from pol.bundle import open_bundle, write_bundle, write_manifest
from pol.components import CodePolicy
from pol.engine import build_runtime, capture_state, initial_state, resolve_spec, run_steps
from pol.spec import JobSpec
from pol.trace import EMPTY_DATA, Record, compute_trace_commitment

States = dict[int, dict[str, torch.Tensor]]


def honest_states(path: Path) -> tuple[JobSpec, States, list[Record]]:
    with open_bundle(path) as b:
        return b.spec, {r.step: b.load_state(r.step) for r in b.records}, list(b.records)


def write_forged(dst: Path, spec: JobSpec, states: States, *, data: dict[int, str], losses: dict[int, float | None]) -> Path:
    """Write a fully consistent bundle for `spec` from arbitrary states (through pol's one bundle writer)."""
    dst.mkdir(parents=True)
    checkpoints = ((step, {**states[step], "meta/step": torch.tensor(step, dtype=torch.int64)}, data.get(step, EMPTY_DATA),
                    losses.get(step)) for step in spec.checkpoint_steps)
    write_bundle(dst, spec, checkpoints, {"forged": "yes"})
    return dst


def restate_update_norms(path: Path, norms: dict[int, float]) -> Path:
    """Rewrite a bundle's committed update norms (segment index -> claimed norm), recommitting consistently: the
    Merkle root and the commitment over the new records. Only the claims change; every checkpoint stays."""
    with open_bundle(path) as b:
        m = b.manifest
    records = tuple(dataclasses.replace(r, update=norms.get(i, r.update)) for i, r in enumerate(m.records))
    merkle, root = compute_trace_commitment(m.job_id, records)
    write_manifest(path, dataclasses.replace(m, records=records, merkle_root=merkle, root=root))
    return path


def forge(src: Path, dst: Path, change: Callable[[JobSpec, States], tuple[JobSpec, States]]) -> Path:
    """Apply `change` to an honest bundle's spec and states and write the result consistently."""
    spec, states, records = honest_states(src)
    new_spec, new_states = change(spec, {k: dict(v) for k, v in states.items()})
    data = {r.step: r.data for r in records}
    losses = {r.step: r.loss for r in records}
    return write_forged(dst, new_spec, new_states, data=data, losses=losses)


def interpolate(states: States, steps: list[int], first: dict, last: dict) -> States:
    """Checkpoints on the straight line between `first` and `last`."""
    out = {}
    for step in steps:
        t = step / steps[-1]
        out[step] = {n: (first[n] + (last[n] - first[n]) * t).to(first[n].dtype) if first[n].is_floating_point() else first[n]
                     for n in first}
    return out


def train_states(spec: JobSpec, *, start: dict | None = None, start_step: int = 0) -> tuple[States, dict[int, str], dict[int, float | None]]:
    """Really train `spec` (optionally from a given state), returning states, data digests and mean losses per
    checkpoint (a forger commits the losses of the work it really did, which replay checks)."""
    rt = build_runtime(spec, code=CodePolicy.trust_all_code())  # the forger runs its own job
    if not spec.is_resolved:
        rt.spec = resolve_spec(spec, rt.dataset)
    states, data, losses = {}, {}, {}
    if start is None:
        states[0] = initial_state(rt)
    else:
        engine_module.restore_state(rt, start)
        states[start_step] = capture_state(rt)
    for step in rt.spec.checkpoint_steps:
        if step <= rt.step:
            continue
        segment = run_steps(rt, step)
        data[step], losses[step] = segment.data_digest, segment.loss
        states[step] = capture_state(rt)
    return states, data, losses


@contextlib.contextmanager
def other_data_order(seed_offset: int = 1) -> Iterator[None]:
    """Train on a different permutation of the data than the spec commits to."""
    original = engine_module.batch_indices

    def shuffled(seed: int, n: int, batch_size: int, step: int) -> np.ndarray:
        return original(seed + seed_offset, n, batch_size, step)

    engine_module.batch_indices = shuffled
    try:
        yield
    finally:
        engine_module.batch_indices = original


@contextlib.contextmanager
def skip_every_other_batch() -> Iterator[None]:
    """Do only half the work: odd steps advance the counter without an update."""
    original = engine_module.one_step

    def lazy(rt, microbatch=None, **hooks):  # type: ignore[no-untyped-def]
        if rt.step % 2:
            rt.step += 1
            return engine_module.StepOutcome(0.0, b"")
        return original(rt, microbatch, **hooks)

    engine_module.one_step = lazy
    try:
        yield
    finally:
        engine_module.one_step = original
