"""Data-parallel training (pol.distributed): exact gradient sums that do not depend on how micro-batches are
ordered or grouped, and one commitment whatever the number of processes (gloo on CPU, spawned processes)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pol.distributed import digit_block, exponent_bins, round_block, train_spawned
from pol.engine import build_runtime, capture_state, initial_state, one_step
from pol.numerics import numerics_context
from pol.prove import train_and_prove
from pol.verify import verify
from tests.conftest import TINY_KWARGS, tiny_spec

EXACT = dict(numerics="exact", microbatch=4, steps=4, every=2)  # batch 16: 4 micro-batches per step


def _gradients(count: int = 5, n: int = 300) -> list[torch.Tensor]:
    torch.manual_seed(1)
    gs = [torch.randn(n) * torch.exp2(torch.randint(-60, 40, (n,)).float()) for _ in range(count)]
    gs[0][:20] = -0.0  # a sum of negative zeros only is -0
    for g in gs:
        g[:20] = -0.0
    gs[1][10:20] = 0.0  # with one +0 the sum is +0
    gs[2][30:40] = -gs[3][30:40]  # cancellations
    return gs


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_exact_gradient_sum_does_not_depend_on_order_or_grouping():
    gs = _gradients()
    with numerics_context("exact"):
        reference = torch.stack(gs).sum(dim=0)  # what one process computes (pol.engine.one_step)
    assert torch.signbit(reference[:10]).all() and (reference[:10] == 0).all()
    assert not torch.signbit(reference[10:20]).any()
    bins = exponent_bins(torch.stack(gs))
    lo, hi = int(bins.min()), int(bins.max())
    width = hi - lo + 4
    for order in itertools.islice(itertools.permutations(range(len(gs))), 0, 120, 7):
        for cut in ([1, 2, 2], [3, 2], [1, 1, 1, 1, 1], [5]):  # groups: what each process would hold
            blocks, start = [], 0
            for size in cut:
                members = [gs[i] for i in order[start : start + size]]
                start += size
                blocks.append(digit_block(torch.stack(members, dim=1), len(gs[0]), lo, width))
            total = sum(blocks[::-1])  # integer addition: any order
            assert torch.equal(_bits(round_block(total, lo, width)), _bits(reference)), (order, cut)
    with numerics_context("exact"):  # and the exact sum itself is order-free
        assert torch.equal(_bits(torch.stack(gs[::-1]).sum(dim=0)), _bits(reference))


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


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_exact_commitment_does_not_depend_on_process_count(nproc, exact_reference, tmp_path):
    run = train_spawned(tiny_spec("transformer", **EXACT), tmp_path / "b", nproc)
    assert not run.errors, run.errors
    assert run.root == exact_reference
    if nproc == 2:
        report = verify(run.path, samples=1)
        assert report.verdict == "accept", report.reason


def test_native_data_parallel_bundle_verifies_on_one_process(tmp_path):
    run = train_spawned(tiny_spec("mlp", microbatch=4, steps=4, every=2), tmp_path / "b", 2)
    assert not run.errors, run.errors
    report = verify(run.path)
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


def test_a_killed_rank_ends_the_run_and_resume_reaches_the_uninterrupted_commitment(tmp_path, exact_reference):
    spec = tiny_spec("transformer", **EXACT)
    killed = train_spawned(spec, tmp_path / "b", 2, env={"POL_DP_FAULT": "1:kill@3"})  # in step 2 -> 3
    assert killed.root is None
    assert (tmp_path / "b" / "progress.json").exists() and not (tmp_path / "b" / "manifest.json").exists()
    resumed = train_spawned(spec, tmp_path / "b", 2, resume=True)
    assert not resumed.errors, resumed.errors
    assert resumed.root == exact_reference
