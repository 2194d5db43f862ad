"""Data-parallel training (pol.distributed): exact gradient sums that do not depend on how micro-batches are
ordered or grouped, and one commitment whatever the number of processes (gloo on CPU, spawned processes). The
window all-reduce's arithmetic is held to `exact_sum` in tests/exact/test_compact_reduce.py; here it runs on gloo."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pol.distributed import DataParallelGroup, train_spawned
from pol.engine import build_runtime, capture_state, initial_state, one_step
from pol.exact.reduce import exact_sum
from pol.numerics import numerics_context
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import verify
from tests.conftest import TINY_KWARGS, tiny_spec

EXACT = dict(numerics="exact", microbatch=4, steps=4, every=2)  # batch 16: 4 micro-batches per step


class _Reordered:
    """A one-process stand-in for pol.distributed: computes the micro-batches in another order."""

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def microbatches(self, count: int) -> list[int]:
        return [i for i in self.order if i < count]

    def reduce_exact(self, per_micro, params):
        with numerics_context("exact"):
            return {n: torch.stack(gs).sum(dim=0) for n, gs in per_micro.items()}

    def reduce_native(self, grads):
        return dict(grads)

    def gather_losses(self, losses, count):
        return dict(losses)


def test_exact_step_does_not_depend_on_micro_batch_order():
    spec = tiny_spec("transformer", **EXACT)
    states = []
    for order in (None, [3, 1, 0, 2], [2, 3, 1, 0]):
        rt = build_runtime(spec)
        rt.data_parallel = _Reordered(order) if order else None
        initial_state(rt)
        one_step(rt)
        one_step(rt)
        states.append(capture_state(rt))
    for other in states[1:]:
        assert set(other) == set(states[0])
        for name, t in states[0].items():
            assert torch.equal(t, other[name]), name


@pytest.fixture(scope="module")
def exact_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_and_prove(tiny_spec("transformer", **EXACT), tmp_path_factory.mktemp("ref") / "b").manifest.root


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_exact_commitment_does_not_depend_on_process_count(nproc, exact_reference, tmp_path):
    run = train_spawned(tiny_spec("transformer", **EXACT), tmp_path / "b", nproc)
    assert not run.errors, run.errors
    assert run.root == exact_reference
    assert run.unsafe == 0  # ordinary gradients: two integer all-reduces, no gathered fallback
    if nproc == 2:
        report = verify(run.path, samples=1)
        assert report.verdict == "accept", report.reason


@pytest.mark.parametrize(("nproc", "options"), [(2, {"code_block": 1}), (3, {"code_block": 1 << 20})])
def test_per_element_codes_and_the_gathered_fallback_give_the_same_commitment(nproc, options, exact_reference, tmp_path):
    # one code per element (9 bytes per element), or one code for everything: far-below elements then cannot be
    # rounded from the window and go through the gathered exact path, with the same result
    run = train_spawned(tiny_spec("transformer", **EXACT), tmp_path / "b", nproc, group_options=options)
    assert not run.errors, run.errors
    assert run.root == exact_reference
    assert (run.unsafe > 0) == (options["code_block"] > 1)


def test_sixteen_micro_batches_use_one_code_per_element_and_give_the_single_process_commitment(tmp_path):
    spec = tiny_spec("mlp", numerics="exact", microbatch=1, steps=2, every=2)  # batch 16: 16 micro-batches
    reference = train_and_prove(spec, tmp_path / "one").manifest.root
    run = train_spawned(spec, tmp_path / "b", 3)
    assert not run.errors, run.errors
    assert run.root == reference


def _reduce_cases() -> list[list[torch.Tensor]]:
    """Micro-batch gradient lists (one tensor per micro-batch) that stress the exact all-reduce."""
    torch.manual_seed(3)
    tiny = 2.0**-149
    ties = torch.tensor([[1.0, 2.0**-24, 0.0], [1.0 + 2.0**-23, 2.0**-24, 0.0], [1.0, 2.0**-24, 2.0**-100],
                         [-0.0, -0.0, -0.0], [-0.0, 0.0, -0.0], [1.0, -1.0, 0.0], [tiny, tiny, -tiny],
                         [1.7e38, 1.7e38, 1.7e38], [2.0**100, tiny, -(2.0**100)]])
    wide = torch.randn(64, 5) * torch.exp2(torch.randint(-150, 120, (64, 5)).float())
    special = torch.randn(6, 3)
    special[0, 1], special[1, 2], special[2, 0], special[2, 1] = float("inf"), float("nan"), float("inf"), float("-inf")
    many = torch.randn(1100, 4) * 1e-3  # beyond MAX_WINDOW_MICROBATCHES: every gradient gathered
    return [list(ties.T), list(wide.T), list(special.T), list(many)]


def _reduce_in_ranks(rank: int, world: int, port: int, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for block in (1, 32):
            group = DataParallelGroup(code_block=block)
            for case, grads in enumerate(_reduce_cases()):
                mine = group.microbatches(len(grads))
                got = group.reduce_exact({"g": [grads[i] for i in mine]}, {"g": grads[0]})["g"]
                queue.put((rank, block, case, got.view(torch.int32).tolist()))
    finally:
        dist.destroy_process_group()
        gc.collect()  # before interpreter finalization (pol.distributed.leave_group)


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_exact_on_gloo_equals_exact_sum_with_ties_signed_zeros_and_non_finite_terms(world):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_reduce_in_ranks, args=(world, port, queue), nprocs=world, join=True, start_method="spawn")
    results = []
    while not queue.empty():
        results.append(queue.get())
    cases = _reduce_cases()
    assert len(results) == world * 2 * len(cases)
    for _, _, case, bits in results:
        want = exact_sum(torch.stack(cases[case]), 0).view(torch.int32).tolist()
        assert bits == want, case


def test_exact_zoo_gpt2_commitment_does_not_depend_on_process_count(tmp_path):
    pytest.importorskip("transformers")
    spec = spec_from_dict({"model": {"name": "gpt2", "kwargs": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 8}},
                           "data": {"name": "tokens", "kwargs": {"length": 1024, "block_size": 8}}, "steps": 2,
                           "every": 2, "batch_size": 8, "microbatch": 2, "numerics": "exact"})
    reference = train_and_prove(spec, tmp_path / "one").manifest.root
    for nproc in (2, 3, 4):
        run = train_spawned(spec, tmp_path / f"b{nproc}", nproc)
        assert not run.errors, run.errors
        assert run.root == reference, nproc


def test_native_data_parallel_bundle_verifies_on_one_process(tmp_path):
    run = train_spawned(tiny_spec("mlp", microbatch=4, steps=4, every=2), tmp_path / "b", 2)
    assert not run.errors, run.errors
    report = verify(run.path)
    assert report.verdict == "accept", report.reason


def test_native_overlap_in_many_buckets_gives_the_one_bucket_result(tmp_path):
    # DDP's overlap: buckets all-reduced during the last backward. With 2 processes a float sum is a + b whatever
    # the buckets, so many small buckets must give one bucket's bits; the bundle verifies on one process
    spec = tiny_spec("transformer", microbatch=4, steps=2, every=2)
    one = train_spawned(spec, tmp_path / "one", 2)
    many = train_spawned(spec, tmp_path / "many", 2, group_options={"bucket_bytes": 4096})
    assert not one.errors and not many.errors, (one.errors, many.errors)
    assert many.root == one.root
    assert many.bytes_reduced == one.bytes_reduced
    report = verify(many.path)
    assert report.verdict == "accept", report.reason


def test_a_rank_with_wrong_gradients_is_named_by_the_cross_rank_check(tmp_path):
    run = train_spawned(tiny_spec("mlp", **EXACT), tmp_path / "b", 2, env={"POL_DP_FAULT": "1:after"})
    assert run.root is None
    assert run.errors and all("RankDiverged" in e and "rank 1 diverged from rank 0 at step 2" in e for e in run.errors.values()), run.errors
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_a_rank_that_corrupts_its_contribution_gives_a_bundle_that_is_rejected(tmp_path):
    # noise added before the all-reduce reaches every rank alike: no rank diverges, the bundle is simply wrong
    run = train_spawned(tiny_spec("mlp", **EXACT), tmp_path / "b", 2, env={"POL_DP_FAULT": "1:before"})
    assert not run.errors, run.errors
    report = verify(run.path, samples=2)
    assert report.verdict == "reject", report.reason


def test_pol_train_nproc_runs_torchrun(tmp_path, exact_reference):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    tiny = TINY_KWARGS["transformer"]
    cmd = [sys.executable, "-m", "pol", "train", "--model", "transformer", "--model-kwargs", json.dumps(tiny["model"]["kwargs"]),
           "--data", "chars", "--data-kwargs", json.dumps(tiny["data"]["kwargs"]), "--numerics", "exact", "--microbatch", "4",
           "--steps", "4", "--every", "2", "--batch-size", "16", "--nproc", "2", "--out", str(tmp_path / "b"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["root"] == exact_reference  # one JSON summary: rank 0's


def test_torchrun_restarts_a_killed_run_which_resumes_to_the_uninterrupted_commitment(tmp_path, exact_reference):
    """`pol train --nproc 2 --max-restarts 1`: rank 1 SIGKILLs itself in its third step; torchrun restarts both
    processes, which continue from the step-2 checkpoint (TORCHELASTIC_RESTART_COUNT) to the same commitment."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "POL_DP_FAULT": "1:kill@3"}
    tiny = TINY_KWARGS["transformer"]
    cmd = [sys.executable, "-m", "pol", "train", "--model", "transformer", "--model-kwargs", json.dumps(tiny["model"]["kwargs"]),
           "--data", "chars", "--data-kwargs", json.dumps(tiny["data"]["kwargs"]), "--numerics", "exact", "--microbatch", "4",
           "--steps", "4", "--every", "2", "--batch-size", "16", "--nproc", "2", "--max-restarts", "1",
           "--out", str(tmp_path / "b"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["root"] == exact_reference and summary["resumed_from"] == 2


def test_a_killed_rank_ends_the_run_and_resume_reaches_the_uninterrupted_commitment(tmp_path, exact_reference):
    spec = tiny_spec("transformer", **EXACT)
    killed = train_spawned(spec, tmp_path / "b", 2, env={"POL_DP_FAULT": "1:kill@3"})  # in step 2 -> 3
    assert killed.root is None
    assert (tmp_path / "b" / "progress.jsonl").exists() and not (tmp_path / "b" / "manifest.json").exists()
    resumed = train_spawned(spec, tmp_path / "b", 2, resume=True)
    assert not resumed.errors, resumed.errors
    assert resumed.root == exact_reference
