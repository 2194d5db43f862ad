"""A user step (issue 14 item 6): `step_fn = "module:callable"` runs in place of the model call and the loss, inside
the one step definition the solver, the verifier, pinpoint's capture and the referee all use."""

from __future__ import annotations

import pytest
import torch

from pinpoint.capture import Fault, capture_step, get_fault_candidates
from pinpoint.messages import SOLVER
from pinpoint.parties import Behaviour, train_with_fault
from pinpoint.runner import check_transcript, run_dispute
from pol import engine
from pol.bundle import open_bundle
from pol.components import CodePolicy
from pol.digest import state_digest
from pol.errors import CodeNotAllowed, SpecError, UnsupportedOperator
from pol.prove import train_and_prove
from pol.verify import verify
from tests.conftest import tiny_spec

ALLOW = CodePolicy.allowing(["tests"])


def final_digest(spec) -> str:
    rt = engine.build_runtime(spec, code=ALLOW)
    engine.initial_state(rt)
    engine.run_steps(rt, spec.steps)
    return state_digest(engine.capture_state(rt))


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_a_user_step_doing_the_specs_arithmetic_gives_the_specs_digests(numerics):
    spec = tiny_spec("mlp", steps=4, every=2, numerics=numerics, microbatch=8)
    assert final_digest(spec) == final_digest(spec.replace(step_fn="tests.userpkg:plain_step"))


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_a_user_step_trains_verifies_and_is_pinned(tmp_path, numerics):
    spec = tiny_spec("mlp", steps=4, every=2, numerics=numerics, step_fn={"name": "tests.userpkg:regularised_step", "kwargs": {}})
    path = train_and_prove(spec, tmp_path / "b").path
    assert verify(path, segments=[1, 2], seed=0, code=ALLOW).verdict == "accept"
    with open_bundle(path) as b:
        assert b.spec.step_fn is not None and b.spec.step_fn.code is not None
    with pytest.raises(CodeNotAllowed):
        verify(path, samples=1, seed=0)
    assert final_digest(spec) != final_digest(tiny_spec("mlp", steps=4, every=2, numerics=numerics))


def test_a_user_step_drawing_unseeded_randomness_is_refused():
    spec = tiny_spec("mlp", steps=2, every=2, step_fn="tests.userpkg:unseeded_step")
    with pytest.raises(UnsupportedOperator, match="unseeded host generator"):
        final_digest(spec)


def test_a_step_fn_must_be_user_code():
    with pytest.raises(SpecError, match="step_fn"):
        tiny_spec("mlp", step_fn="mse")


def test_a_cheat_inside_a_user_step_is_pinned_to_its_operator(tmp_path):
    """pinpoint's capture runs the user step through the one step definition: a corrupted operator of it (the
    noised second forward pass) is found and re-executed alone."""
    spec = tiny_spec("mlp", steps=4, every=2, step_fn="tests.userpkg:regularised_step")
    honest = train_and_prove(spec, tmp_path / "honest").path
    with open_bundle(honest) as b:
        graph = capture_step(b, 2, code=ALLOW)
        resolved, honest_end = b.spec, b.records[-1].state
    noise = next(n.index for n in graph.nodes if n.op == "pol.leaf" and n.args["name"].startswith("rng/user/"))
    for node in [c for c in get_fault_candidates(graph) if c > noise]:  # an operator after the stream draw is read
        fault = Fault(2, node, 0)
        faulty = train_with_fault(resolved, tmp_path / f"faulty-{node}", fault)
        with open_bundle(faulty) as fb:
            if fb.records[-1].state != honest_end:  # a fault that changes the commitment
                break
    result = run_dispute(faulty, 1, solver=Behaviour(fault=fault), transcript=tmp_path / "t.json", code=ALLOW)
    assert result.outcome.loser == SOLVER and (result.step, result.node) == (2, node) and result.referee_executed == 1
    assert check_transcript(tmp_path / "t.json", code=ALLOW).outcome == result.outcome


def test_the_referee_rederives_a_user_stream_draw_from_its_name():
    from pinpoint.referee import compute_leaf_value
    from pol.engine import StepContext, parse_user_draw_name, user_draw_name

    spec = tiny_spec("mlp", steps=4, every=2)
    seen: dict[str, torch.Tensor] = {}
    ctx = StepContext(3, 1, (0.1,), None, spec.seed, torch.device("cpu"), None, lambda n, t: seen.__setitem__(n, t))  # type: ignore[arg-type]
    drawn = ctx.normal((4, 5), "aux", std=0.5)
    (name, value), = seen.items()
    assert name == user_draw_name(1, "normal", "aux", (0.5,)) and torch.equal(value, drawn)
    assert torch.equal(compute_leaf_value(spec, 3, name, (4, 5)), drawn)
    assert not torch.equal(compute_leaf_value(spec, 2, name, (4, 5)), drawn)  # another step, another draw
    for bad in ("rng/user/1/normal/0x1p-1/a/b", "rng/user/x/normal/0x1p-1/aux", "rng/user/1/gamma/0x1p-1/aux",
                "rng/user/1/uniform/0x1p-1/aux", "rng/user/1/normal/inf/aux"):
        with pytest.raises(ValueError):
            parse_user_draw_name(bad)
    with pytest.raises(ValueError, match="purpose"):
        ctx.uniform((2,), "../etc")
