"""Disputes over models that draw torch random numbers (nn.Dropout, torch.native_dropout, torch.randn_like).

pol serves each draw from pol.rng under the key (seed, "torch/step", [step, micro-batch, position]); the capture
records it as one node carrying `"draw": [micro-batch, position]` in its agreed structure, and the referee re-executes
that node under a RandomMode of the same key: a solver can claim neither another mask (its value is re-derived)
nor another key (the structure is the traced one). A ruling on a draw needs no model, data or user code, so
`pol dispute --check` re-checks it under pol's built-ins alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import networkx as nx
import pytest
import torch

from pinpoint.capture import (
    MAX_CONSTANT_BYTES,
    Fault,
    capture_step,
    compute_constant_name,
    compute_constant_value,
    compute_value_digest,
    get_fault_candidates,
    run_captured_step,
)
from pinpoint.errors import CaptureError
from pinpoint.graph import LEAF_OP, StepGraph, to_networkx
from pinpoint.messages import CHALLENGER, SOLVER
from pinpoint.parties import Behaviour, Challenger, Solver, train_with_fault
from pinpoint.referee import compute_verdict
from pinpoint.runner import check_transcript, run_dispute
from pol.bundle import open_bundle
from pol.components import CodePolicy
from pol.engine import build_runtime, restore_state, run_steps
from pol.prove import train_and_prove
from pol.spec import spec_from_dict

ALLOW = CodePolicy.allowing(["tests"])
NUMERICS = ("native", "exact")
# two nn.Dropout layers (tests.userpkg), two micro-batches: four draws a step, keys [micro-batch, position]
DROP = {"model": "tests.userpkg:dropout_net", "data": "tests.userpkg:make_data", "loss": "mse", "steps": 4, "every": 2,
        "batch_size": 16, "microbatch": 8, "optimizer": {"name": "adamw", "lr": 0.01}}
NOISY = {**DROP, "model": "tests.pinpoint.randmodels:noisy_net", "microbatch": 0}
STEP = 1  # the disputed step, inside segment 0 (steps 0 -> 2)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-models")
    made = {n: train_and_prove(spec_from_dict({**DROP, "numerics": n}), root / n, code=ALLOW).path for n in NUMERICS}
    made["noisy"] = train_and_prove(spec_from_dict(NOISY), root / "noisy", code=ALLOW).path
    return made


def _graph(path: Path) -> StepGraph:
    with open_bundle(path) as b:
        return capture_step(b, STEP, code=ALLOW)


def _draws(graph: StepGraph) -> list[int]:
    return [n.index for n in graph.nodes if n.op != LEAF_OP and "draw" in n.args]


def _downstream_mul(graph: StepGraph, draw: int) -> int:
    """The first elementwise product that reads what the draw made (dropout's `input * mask`)."""
    after = nx.descendants(to_networkx(graph), draw)
    return min(i for i in get_fault_candidates(graph) if i in after and graph.nodes[i].op == "aten.mul.Tensor")


@pytest.mark.parametrize("numerics", NUMERICS)
def test_each_draw_is_a_node_keyed_as_training_drew_it(numerics: str, bundles: dict[str, Path]) -> None:
    graph = _graph(bundles[numerics])
    with open_bundle(bundles[numerics]) as b:
        assert graph.end_state == b.records[1].state, "the captured step (its draws included) is the committed step"
    draws = _draws(graph)
    assert [graph.nodes[i].op for i in draws] == ["aten.bernoulli_.float"] * 4
    assert [graph.nodes[i].args["draw"] for i in draws] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert not any(n.name.startswith("rng/") for n in graph.nodes if n.op == LEAF_OP)
    assert set(draws) <= set(get_fault_candidates(graph)), "a draw's output is a fault target like any operator's"


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("where", ["draw", "downstream"])
def test_a_solver_cheating_at_a_dropout_draw_or_after_it_is_pinned_to_that_operator(
        numerics: str, where: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    graph = _graph(bundles[numerics])
    draw = _draws(graph)[3]  # the second dropout layer of the second micro-batch
    node = draw if where == "draw" else _downstream_mul(graph, draw)
    with open_bundle(bundles[numerics]) as b:
        fault = Fault(STEP, node, 5)
        faulty = train_with_fault(b.spec, tmp_path / "faulty", fault, code=ALLOW)
    result = run_dispute(faulty, 0, solver=Behaviour(fault=fault), transcript=tmp_path / "t.json", code=ALLOW)
    assert (result.outcome.loser, result.outcome.by, result.step, result.node) == (SOLVER, "ruling", STEP, node)
    assert result.op == graph.nodes[node].op and result.referee_executed == 1
    if where == "draw":
        assert "draw keyed by step 1, micro-batch 1, position 1" in result.outcome.reason
    checked = check_transcript(tmp_path / "t.json")  # pol's built-ins only: the ruling runs no user code
    assert checked.outcome == result.outcome and checked.referee_executed == 1


@pytest.mark.parametrize("numerics", NUMERICS)
def test_an_honest_solver_beats_a_challenger_claiming_another_mask(numerics: str, bundles: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    graph = _graph(bundles[numerics])
    draw = _draws(graph)[1]
    with open_bundle(bundles[numerics]) as b:
        liar = Challenger(b, 0, code=ALLOW)
        liar.replayer.fault = Fault(STEP, draw, 3)  # it computes (and stands by) another dropout mask
        result = run_dispute(b, 0, challenger_party=liar, transcript=tmp_path / "t.json", code=ALLOW)
    assert (result.outcome.loser, result.step, result.node, result.op) == (CHALLENGER, STEP, draw, "aten.bernoulli_.float")
    assert result.referee_executed == 1 and check_transcript(tmp_path / "t.json").outcome == result.outcome


class _KeyForger(Solver):
    """An honest computation whose graph claims other keys for its draws (positions swapped within micro-batches)."""

    def _graph(self, step: int) -> StepGraph:
        g = super()._graph(step)
        nodes = tuple(dataclasses.replace(n, args={**n.args, "draw": [n.args["draw"][0], 1 - n.args["draw"][1]]})
                      if n.op != LEAF_OP and "draw" in n.args else n for n in g.nodes)
        return StepGraph(g.job_id, g.step, g.numerics, g.start_state, nodes)


def test_a_solver_claiming_other_draw_keys_loses_the_structure_dispute(bundles: dict[str, Path]) -> None:
    with open_bundle(bundles["native"]) as b:
        result = run_dispute(b, 0, solver_party=_KeyForger(b, code=ALLOW), code=ALLOW)
    assert (result.outcome.loser, result.op) == (SOLVER, "pol.trace")


def test_the_referee_rederives_a_draw_and_refuses_any_other_claim(bundles: dict[str, Path]) -> None:
    """Fused dropout (mask and scaled values), noise and nn.Dropout, one draw each: the referee re-executes the
    node under its key (in either numerics), torch's generator untouched; another mask, another key, a missing key or a value off by
    one ulp (native numerics: draws are the same bits everywhere) are ruled wrong."""
    with open_bundle(bundles["noisy"]) as b:
        spec, graph = b.spec, capture_step(b, STEP, code=ALLOW)
        rt = build_runtime(spec, code=ALLOW)
        draws = _draws(graph)
        assert [graph.nodes[i].op for i in draws] == ["aten.native_dropout.default", "aten.randn_like.default",
                                                      "aten.bernoulli_.float"]
        generator = torch.default_generator.get_state()
        for i in draws:
            node = graph.nodes[i]
            restore_state(rt, b.load_state(0))
            run_steps(rt, STEP)
            tensors = run_captured_step(rt, watch=i).watched
            honest = compute_verdict(spec, STEP, node, tensors, "0" * 64)
            assert honest.solver_correct and honest.executed == 1, honest.reason
            exact = compute_verdict(spec.replace(numerics="exact"), STEP, node, tensors, "0" * 64)
            assert exact.solver_correct, "the draw (fused dropout's scaling too) is the same bits under exact numerics"
            moved = dataclasses.replace(node, args={**node.args, "draw": [0, node.args["draw"][1] + 1]})
            assert not compute_verdict(spec, STEP, moved, tensors, "0" * 64).solver_correct
            assert not compute_verdict(spec, STEP + 1, node, tensors, "0" * 64).solver_correct, "the step is in the key"
            keyless = dataclasses.replace(node, args={k: v for k, v in node.args.items() if k != "draw"})
            verdict = compute_verdict(spec, STEP, keyless, tensors, "0" * 64)
            assert not verdict.solver_correct and "draw key" in verdict.reason and verdict.executed == 0
            out = tensors["output/0"].clone()
            flat = out.view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
            forged = dataclasses.replace(node, digests=(compute_value_digest(out), *node.digests[1:]))
            verdict = compute_verdict(spec, STEP, forged, {**tensors, "output/0": out}, "0" * 64)
            assert not verdict.solver_correct and verdict.executed == 1
        assert torch.equal(torch.default_generator.get_state(), generator), "the referee never draws from torch"
    plain = next(n for n in graph.nodes if n.op == "aten.mul.Tensor")
    keyed = dataclasses.replace(plain, args={**plain.args, "draw": [0, 0]})
    verdict = compute_verdict(spec, STEP, keyed, {f"input/{k}": torch.ones(8, 8) for k in range(len(plain.inputs))}, "0" * 64)
    assert not verdict.solver_correct and "not a draw" in verdict.reason


def test_a_cheat_at_fused_dropout_is_pinned_to_it(bundles: dict[str, Path], tmp_path: Path) -> None:
    graph = _graph(bundles["noisy"])
    node = _draws(graph)[0]  # native_dropout: the scaled values (output 0) corrupted
    with open_bundle(bundles["noisy"]) as b:
        fault = Fault(STEP, node, 2)
        faulty = train_with_fault(b.spec, tmp_path / "faulty", fault, code=ALLOW)
    result = run_dispute(faulty, 0, solver=Behaviour(fault=fault), transcript=tmp_path / "t.json", code=ALLOW)
    assert (result.outcome.loser, result.node, result.op) == (SOLVER, node, "aten.native_dropout.default")
    assert result.referee_executed == 1 and check_transcript(tmp_path / "t.json").outcome == result.outcome


def test_a_literal_tensor_the_step_makes_is_a_constant_leaf_named_by_its_bytes(bundles: dict[str, Path]) -> None:
    """`torch.tensor([...])` in a model (transformers' cache does it) is read through `lift_fresh`: a `const/` leaf
    whose name spells its value, so it is agreed with the structure and re-derived from the name alone."""
    graph = _graph(bundles["noisy"])
    with open_bundle(bundles["noisy"]) as b:
        spec = b.spec
    (leaf,) = [n for n in graph.nodes if n.op == LEAF_OP and n.name.startswith("const/")]
    assert leaf.name == compute_constant_name(torch.tensor([0.05]))
    assert compute_verdict(spec, STEP, leaf, {}, "0" * 64).solver_correct  # default CodePolicy: nothing is built
    forged = dataclasses.replace(leaf, digests=(compute_value_digest(torch.tensor([0.5])),))
    assert not compute_verdict(spec, STEP, forged, {}, "0" * 64).solver_correct
    for t in (torch.tensor([]), torch.tensor(3), torch.tensor([[True, False]]), torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
              torch.arange(6, dtype=torch.float64).reshape(2, 3)):
        back = compute_constant_value(compute_constant_name(t))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    with pytest.raises(CaptureError):
        compute_constant_name(torch.zeros(MAX_CONSTANT_BYTES // 4 + 1))
    for bad in ("const/float32/2/00", "const/float32/-1/", "const/object/1/00", "const/float32/02/" + "00" * 8,
                "const/float32/1/zz", "rng/float32/1/00000000", "const/float32/1"):
        with pytest.raises(ValueError):
            compute_constant_value(bad)


def test_a_cheat_at_a_transformers_dropout_is_pinned_to_it(tmp_path: Path) -> None:
    """The zoo's GPT-2 (dropout in its embeddings, attention and residuals; a literal in its cache): a faulty draw is
    found and re-derived with pol's built-ins alone."""
    pytest.importorskip("transformers")
    spec = spec_from_dict({"model": "gpt2", "data": {"name": "tokens", "kwargs": {"length": 4096}}, "steps": 2,
                           "every": 2, "batch_size": 4})
    honest = train_and_prove(spec, tmp_path / "honest").path
    graph = _graph(honest)
    draws = _draws(graph)
    assert len(draws) == 7 and any(n.name.startswith("const/") for n in graph.nodes if n.op == LEAF_OP)
    with open_bundle(honest) as b:
        fault = Fault(STEP, draws[3], 7)
        faulty = train_with_fault(b.spec, tmp_path / "faulty", fault)
    result = run_dispute(faulty, 0, solver=Behaviour(fault=fault), transcript=tmp_path / "t.json")
    assert (result.outcome.loser, result.node, result.referee_executed) == (SOLVER, draws[3], 1)
    assert check_transcript(tmp_path / "t.json").outcome == result.outcome
