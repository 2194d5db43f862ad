"""Disputes over a user's training loop: torch.optim's optimizer, a scheduler, gradient clipping and EMA weights
are operators of the step like any other, so a cheat in the update (not only in forward or backward) is pinned to
its operator and re-executed alone by the referee, in both numerics."""

from __future__ import annotations

from pathlib import Path

import pytest

from pinpoint.capture import Fault, capture_step, get_fault_candidates
from pinpoint.messages import SOLVER
from pinpoint.parties import Behaviour, train_with_fault
from pinpoint.runner import check_transcript, run_dispute
from pol.bundle import open_bundle
from pol.prove import train_and_prove

from ..conftest import tiny_spec

LOOP = {"name": "Adam", "lr": 1e-2, "kwargs": {"amsgrad": True}, "clip_grad_norm": 0.5, "ema": 0.9,
        "scheduler": {"name": "StepLR", "kwargs": {"step_size": 2, "gamma": 0.5}}}


@pytest.mark.parametrize("numerics", ["native", "exact"])
@pytest.mark.parametrize("where", [-1, -3])  # the EMA's last lerp_, an Adam operator just before it
def test_a_cheat_in_the_update_is_pinned_to_its_operator(tmp_path: Path, numerics: str, where: int) -> None:
    spec = tiny_spec("mlp", steps=4, every=2, numerics=numerics, optimizer=LOOP)
    honest = train_and_prove(spec, tmp_path / "honest").path
    with open_bundle(honest) as b:
        graph = capture_step(b, 3)
        resolved = b.spec
    candidates = get_fault_candidates(graph)
    node = candidates[where]
    assert graph.nodes[node].op in ("aten.lerp_.Scalar", "aten.lerp.Scalar") or where != -1, graph.nodes[node].op
    fault = Fault(3, node, 0)
    faulty = train_with_fault(resolved, tmp_path / "faulty", fault)
    result = run_dispute(faulty, 1, solver=Behaviour(fault=fault), transcript=tmp_path / "t.json")
    assert result.outcome.loser == SOLVER and result.outcome.by == "ruling"
    assert (result.step, result.node) == (3, node) and result.referee_executed == 1
    assert check_transcript(tmp_path / "t.json").outcome == result.outcome
