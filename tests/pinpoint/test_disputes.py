"""End-to-end disputes, as scenarios: who misbehaves how, who must lose, and where the dispute must end.

After every accepted message the honest party has not lost; the rounds stay within ceil(log2 k) + ceil(log2 n) + 2;
the referee executes one operator.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pinpoint.capture import Fault, capture_step, get_fault_candidates
from pinpoint.errors import TranscriptError
from pinpoint.graph import InputRef, Node, TensorMeta
from pinpoint.messages import CHALLENGER, SOLVER
from pinpoint.parties import Behaviour, train_with_fault
from pinpoint.party import party_command
from pinpoint.protocol import Params, max_rounds
from pinpoint.referee import compute_verdict
from pinpoint.runner import DisputeResult, check_transcript, run_dispute
from pol.bundle import open_bundle

from .conftest import MODELS, FaultCase


def assert_fair(result: DisputeResult, honest: str) -> None:
    """The invariants: the honest party never loses (after any message), the round bound holds."""
    assert result.states and result.states[-1].outcome == result.outcome
    for state in result.states:
        assert state.outcome is None or state.outcome.loser != honest
    assert result.rounds <= max_rounds(result.k, max(result.n_nodes, 1))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("seed", (0, 1))
def test_faulty_solver_is_pinned_to_its_operator(model: str, seed: int, fault_cases: dict[tuple[str, int], FaultCase],
                                                 tmp_path: Path) -> None:
    case = fault_cases[(model, seed)]
    result = run_dispute(case.path, case.segment, solver=Behaviour(fault=case.fault), keep_states=True,
                         transcript=tmp_path / "t.json")
    assert result.outcome.loser == SOLVER and result.outcome.by == "ruling"
    assert (result.step, result.node) == (case.fault.step, case.fault.node)
    assert result.referee_executed == 1
    assert_fair(result, CHALLENGER)
    checked = check_transcript(tmp_path / "t.json")
    assert checked.outcome == result.outcome and checked.referee_executed == 1


@pytest.mark.parametrize("model", MODELS)
def test_a_solver_lying_about_a_midpoint_loses(model: str, honest_bundles: dict[str, Path]) -> None:
    result = run_dispute(honest_bundles[model], 0, solver=Behaviour(lie_step=2), keep_states=True)
    assert result.outcome.loser == SOLVER and result.step == 1
    assert result.op == "pol.state" and result.node == result.n_nodes - 1
    assert_fair(result, CHALLENGER)


@pytest.mark.parametrize("model, answers", [(m, "disagree") for m in MODELS] + [("mlp", "agree"), ("mlp", "dispute-structure")])
def test_a_lying_challenger_loses_against_an_honest_solver(model: str, answers: str, honest_bundles: dict[str, Path]) -> None:
    result = run_dispute(honest_bundles[model], 1, challenger=Behaviour(answers=answers), keep_states=True)
    assert result.outcome.loser == CHALLENGER and result.outcome.by == "ruling"
    assert_fair(result, SOLVER)
    if answers == "disagree":
        assert (result.step, result.node) == (4, 0), "always disagreeing walks to the first node of the first step"
    if answers == "agree":
        assert (result.step, result.op) == (7, "pol.state")
    if answers == "dispute-structure":
        assert result.op == "pol.trace" and result.referee_executed > 1, "a structure dispute costs the referee a step"


@pytest.mark.parametrize("silent, phase, loser", [
    ("solver", "steps", SOLVER),
    ("solver", "reveal", SOLVER),
    ("challenger", "steps_answer", CHALLENGER),
    ("challenger", "nodes_answer", CHALLENGER),
    ("challenger", "open", CHALLENGER),
])
def test_a_silent_party_loses_on_time(silent: str, phase: str, loser: str, fault_cases: dict[tuple[str, int], FaultCase]) -> None:
    case = fault_cases[("mlp", 0)]
    quiet = Behaviour(silent_from=phase, fault=case.fault if silent == "solver" else None)
    kwargs: dict[str, Any] = {"solver": quiet} if silent == "solver" else {"solver": Behaviour(fault=case.fault), "challenger": quiet}
    result = run_dispute(case.path, case.segment, params=Params(budget_ms=5_000), keep_states=True, **kwargs)
    assert result.outcome.loser == loser and result.outcome.by == "timeout"
    assert (result.states[-2].phase if len(result.states) > 1 else "open") == phase
    assert result.states[-1].remaining[(SOLVER, CHALLENGER).index(loser)] == 0


def test_exact_numerics_rules_by_bits(exact_bundle: Path, tmp_path: Path) -> None:
    with open_bundle(exact_bundle) as b:
        spec = b.spec
        graph = capture_step(b, 5)
    node = next(i for i in get_fault_candidates(graph) if graph.nodes[i].op == "aten.addmm.default")
    fault = Fault(5, node, 3)
    path = train_with_fault(spec, tmp_path / "exact-faulty", fault)
    result = run_dispute(path, 1, solver=Behaviour(fault=fault), keep_states=True)
    assert (result.outcome.loser, result.step, result.node) == (SOLVER, 5, node)
    assert result.outcome.reason.startswith("output element 3 ") and "exact" in result.outcome.reason
    assert result.referee_executed == 1 and result.referee_flops == 2 * 32 + 1, "one dot product of the 32-wide input"
    assert_fair(result, CHALLENGER)


def test_a_corrupted_host_float_is_settled_by_tracing_the_step(honest_bundles: dict[str, Path], tmp_path: Path) -> None:
    with open_bundle(honest_bundles["mlp"]) as b:
        graph = capture_step(b, 2)
        spec = b.spec
    power = next(n.index for n in graph.nodes if n.outputs[0].dtype == "float64" and n.op == "aten.mul.Tensor")
    assert power not in get_fault_candidates(graph)
    fault = Fault(2, power)
    path = train_with_fault(spec, tmp_path / "b", fault)
    result = run_dispute(path, 0, solver=Behaviour(fault=fault), keep_states=True)
    assert result.outcome.loser == SOLVER and result.op == "pol.trace" and result.step == 2
    assert_fair(result, CHALLENGER)


def test_two_processes_sharing_only_messages(fault_cases: dict[tuple[str, int], FaultCase], tmp_path: Path) -> None:
    case = fault_cases[("mlp", 1)]
    behaviour = Behaviour(fault=case.fault)
    events: list[str] = []
    result = run_dispute(case.path, case.segment, solver_cmd=party_command("solver", case.path, behaviour),
                         challenger_cmd=party_command("challenger", case.path, segment=case.segment),
                         transcript=tmp_path / "t.json", on_event=lambda e: events.append(e.describe()))
    assert (result.outcome.loser, result.step, result.node) == (SOLVER, case.fault.step, case.fault.node)
    assert result.referee_executed == 1 and "referee ran" in events[-1]
    assert check_transcript(tmp_path / "t.json").outcome == result.outcome


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k in value for p in _leaves(value[k], (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))]
    return [path]


def _edit(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return (value[:-1] + ("0" if value[-1:] != "0" else "1")) if value else "x"
    return 0


def test_any_edited_field_fails_the_check(fault_cases: dict[tuple[str, int], FaultCase], tmp_path: Path) -> None:
    case = fault_cases[("mlp", 0)]
    original = tmp_path / "t.json"
    run_dispute(case.path, case.segment, solver=Behaviour(fault=case.fault), transcript=original)
    body = json.loads(original.read_text())
    check_transcript(original)
    paths = _leaves(body)
    assert len(paths) > 100
    edited = tmp_path / "edited.json"
    for path in paths:
        copy = json.loads(original.read_text())
        target = copy
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = _edit(target[path[-1]])
        edited.write_text(json.dumps(copy))
        with pytest.raises(TranscriptError):
            check_transcript(edited)
    for broken in ({**body, "entries": body["entries"][:-1]}, {**body, "format": "x"}, {**body, "extra": 1}):
        edited.write_text(json.dumps(broken))
        with pytest.raises(TranscriptError):
            check_transcript(edited)
    edited.write_text("{not json")
    with pytest.raises(TranscriptError):
        check_transcript(edited)


@dataclass(frozen=True)
class _Case:
    noise: float
    correct: bool


@pytest.mark.parametrize("case", [_Case(0.0, True), _Case(1e-7, True), _Case(1e-2, False), _Case(1.0, False)])
def test_native_referee_tolerance(case: _Case, honest_bundles: dict[str, Path]) -> None:
    with open_bundle(honest_bundles["mlp"]) as b:
        spec = b.spec
    torch.manual_seed(0)
    a, w, bias = torch.randn(8, 64), torch.randn(64, 16), torch.randn(16)
    out = torch.addmm(bias, a, w)
    claimed = out.clone()
    claimed[0, 0] += case.noise * float(out.abs().max())
    from pinpoint.capture import compute_value_digest

    node = Node(3, "aten.addmm.default", {"args": [{"t": 0}, {"t": 1}, {"t": 2}], "kwargs": {}},
                (InputRef(0, 0), InputRef(1, 0), InputRef(2, 0)), (TensorMeta("tensor", "float32", (8, 16)),),
                (compute_value_digest(claimed),), (), 2 * 8 * 16 * 64, 65)
    verdict = compute_verdict(spec, 0, node, {"input/0": bias, "input/1": a, "input/2": w, "output/0": claimed}, "0" * 64)
    assert verdict.solver_correct == case.correct and verdict.executed == 1
    exact = compute_verdict(spec.replace(numerics="exact"), 0, node, {"input/0": bias, "input/1": a, "input/2": w}, "0" * 64)
    assert exact.executed == 1


def test_export_graph_and_bad_requests(honest_bundles: dict[str, Path], tmp_path: Path) -> None:
    from pinpoint.errors import PinpointError
    from pinpoint.runner import export_graph

    report = export_graph(honest_bundles["cnn"], 3, tmp_path / "g.graphml")
    assert report["nodes"] > 50 and report["flops_by_op"]["aten.convolution.default"] > 0
    assert set(report["files"]) == {"json", "graphml", "dot"} and all(Path(p).is_file() for p in report["files"].values())
    with pytest.raises(PinpointError, match="segment"):
        run_dispute(honest_bundles["mlp"], 3)
    garbage = [sys.executable, "-c", "import sys; sys.stdin.readline(); print('garbage', flush=True)"]
    events: list[str] = []
    result = run_dispute(honest_bundles["mlp"], 0, solver_cmd=garbage, params=Params(budget_ms=2_000),
                         on_event=lambda e: events.append(e.describe()))
    assert "refused solver's line: MalformedMessage" in events[1] and "claims a timeout" in events[-1]
    assert (result.outcome.loser, result.outcome.by) == (SOLVER, "timeout"), "a peer speaking nonsense loses on time"
    assert [r.party for r in result.refusals] == [SOLVER] and "MalformedMessage" in result.refusals[0].reason
    exits = [sys.executable, "-c", "import sys; sys.stdin.readline()"]  # reads one line, then closes its output
    result = run_dispute(honest_bundles["mlp"], 0, solver_cmd=exits, params=Params(budget_ms=600_000))
    assert (result.outcome.loser, result.outcome.by) == (SOLVER, "timeout") and not result.refusals


@pytest.mark.parametrize("params", [{"budget_ms": "x", "commitment": None, "max_reveal_bytes": 1}, {"budget_ms": 1},
                                    {"budget_ms": 1, "commitment": 5, "max_reveal_bytes": 1},
                                    {"budget_ms": 1, "commitment": None, "max_reveal_bytes": 1},
                                    {"budget_ms": 1, "commitment": None, "max_reveal_bytes": 1, "max_refused": 0},
                                    {"budget_ms": 2**60, "commitment": None, "max_reveal_bytes": 1, "max_refused": 3}])
def test_transcript_params_are_checked(params: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    body = {"format": "pinpoint-transcript", "version": 1, "params": params, "start": 0, "entries": [], "outcome": {},
            "head": "", "rounds": 0, "bytes": 0}
    path.write_text(json.dumps(body))
    with pytest.raises(TranscriptError):
        check_transcript(path)


@pytest.mark.parametrize("seed", range(6))
def test_actor_fuzz_a_randomly_answering_challenger_never_beats_an_honest_solver(seed: int, honest_bundles: dict[str, Path]) -> None:
    result = run_dispute(honest_bundles["mlp"], seed % 3, challenger=Behaviour(answers="random", seed=seed), keep_states=True)
    assert result.outcome.loser == CHALLENGER
    assert_fair(result, SOLVER)


@pytest.mark.parametrize("seed", range(4))
def test_actor_fuzz_a_randomly_answering_challenger_against_a_faulty_solver(seed: int, fault_cases: dict[tuple[str, int], FaultCase]) -> None:
    """A dishonest challenger may lose even against a faulty solver (it disputed the wrong thing); the protocol
    only promises that an honest party never loses, and that every dispute ends within the round bound."""
    case = fault_cases[("mlp", seed % 2)]
    result = run_dispute(case.path, case.segment, solver=Behaviour(fault=case.fault),
                         challenger=Behaviour(answers="random", seed=seed), keep_states=True)
    assert result.outcome.by == "ruling" and result.rounds <= max_rounds(result.k, result.n_nodes)


def test_an_honest_challenger_disputing_an_honest_segment_loses(honest_bundles: dict[str, Path]) -> None:
    result = run_dispute(honest_bundles["transformer"], 2, keep_states=True)
    assert result.outcome.loser == CHALLENGER and result.op == "pol.state" and result.referee_executed == 0
    assert_fair(result, SOLVER)


def test_exact_products_are_element_local() -> None:
    """The referee computes one element of an exact product from a row and a column: the same bits as the whole."""
    from pol.exact import exact_mode

    torch.manual_seed(1)
    a = torch.randn(7, 33) * torch.exp2(torch.randint(-20, 20, (7, 1)).float())
    b = torch.randn(33, 5) * torch.exp2(torch.randint(-20, 20, (1, 5)).float())
    bias = torch.randn(5)
    with exact_mode():
        whole = torch.ops.aten.addmm.default(bias, a, b)
        parts = [[torch.ops.aten.addmm.default(bias[j : j + 1], a[i : i + 1], b[:, j : j + 1]) for j in range(5)] for i in range(7)]
    pieces = torch.stack([torch.cat(row, dim=1) for row in parts]).reshape(7, 5)
    assert torch.equal(whole.view(torch.int32), pieces.view(torch.int32))


def test_a_dispute_over_another_versions_bundle_is_refused(tmp_path, monkeypatch):
    """The referee re-executes this pol's step: over another version's bundle it could only blame the honest."""
    import pol.engine
    from pinpoint.runner import run_dispute
    from pol.errors import VersionMismatch
    from pol.prove import train_and_prove
    from tests.conftest import tiny_spec

    monkeypatch.setattr(pol.engine, "__version__", "0.0.9")
    old = train_and_prove(tiny_spec(steps=4, every=2), tmp_path / "old").path
    monkeypatch.undo()
    with pytest.raises(VersionMismatch, match="pol 0.0.9"):
        run_dispute(old, 0)
