"""Disputes over data-parallel bundles (issue 15 item 6). In exact numerics a step is its micro-batches' operators
followed by their exact gradient sum, whichever process computed each micro-batch, so a bundle trained on two
processes is byte for byte the one-process bundle, and the step's operator graph (all micro-batches, then the
sum) is what the parties bisect: a dispute narrows to one micro-batch and then to one operator in it, and the
referee still executes one operator."""

from __future__ import annotations

from pathlib import Path

import pytest

from pinpoint.capture import Fault, _state_tensors, capture_hooks, get_fault_candidates
from pinpoint.graph import StepGraph
from pinpoint.messages import CHALLENGER, SOLVER
from pinpoint.parties import Behaviour, train_with_fault
from pinpoint.runner import run_dispute
from pol import engine
from pol.bundle import open_bundle
from pol.distributed import train_spawned
from pol.engine import build_runtime, restore_state
from pol.prove import train_and_prove

from ..conftest import tiny_spec

SPEC = dict(numerics="exact", microbatch=4, steps=4, every=2)  # batch 16: 4 micro-batches per step


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dp-disputes")
    one = train_and_prove(tiny_spec("mlp", **SPEC), root / "one").path
    two = train_spawned(tiny_spec("mlp", **SPEC), root / "two", 2)
    assert not two.errors, two.errors
    return {"one": one, "two": Path(two.path)}


def test_a_two_process_bundle_is_the_one_process_bundle(runs: dict[str, Path]) -> None:
    with open_bundle(runs["one"]) as a, open_bundle(runs["two"]) as b:
        assert (a.manifest.root, a.manifest.records, a.manifest.files) == (b.manifest.root, b.manifest.records, b.manifest.files)
        assert b.manifest.env["processes"] == 2


def _graph_with_microbatches(bundle: Path, step: int) -> tuple[StepGraph, list[int]]:
    """The operator graph of `step` and the node count at the start of each micro-batch."""
    with open_bundle(bundle) as b:
        spec, state = b.spec, b.load_state(step)
    rt = build_runtime(spec)
    restore_state(rt, state)
    hooks, modes = capture_hooks(rt)
    starts: list[int] = []

    def around(offset: int):
        starts.append(len(modes[-1].nodes))
        return hooks.around_microbatch(offset)

    engine.one_step(rt, mode=hooks.mode, around_microbatch=around)
    mode = modes[0]
    mode.finish(_state_tensors(rt), rt.step, "0" * 64)
    return StepGraph(spec.job_id, step, spec.numerics, "0" * 64, tuple(mode.nodes)), starts


@pytest.mark.parametrize("micro", [1, 3])  # computed by rank 1 in a two-process run
def test_a_fault_in_another_ranks_micro_batch_is_pinned_to_its_operator(runs: dict[str, Path], tmp_path: Path,
                                                                         micro: int) -> None:
    graph, starts = _graph_with_microbatches(runs["two"], 2)
    assert len(starts) == 4
    end = starts[micro + 1] if micro + 1 < len(starts) else None
    inside = [i for i in get_fault_candidates(graph) if starts[micro] <= i and (end is None or i < end)]
    assert inside, "the micro-batch has operators that reach the end state"
    fault = Fault(2, inside[len(inside) // 2], 5)
    with open_bundle(runs["two"]) as b:
        spec = b.spec
    faulty = train_with_fault(spec, tmp_path / "faulty", fault)
    result = run_dispute(faulty, 1, solver=Behaviour(fault=fault))
    assert result.outcome.loser == SOLVER and result.outcome.by == "ruling"
    assert (result.step, result.node) == (2, fault.node) and result.referee_executed == 1


def test_a_lying_challenger_loses_over_a_two_process_bundle(runs: dict[str, Path]) -> None:
    result = run_dispute(runs["two"], 1, challenger=Behaviour(answers="disagree"))
    assert result.outcome.loser == CHALLENGER and result.outcome.by == "ruling" and result.referee_executed <= 1
