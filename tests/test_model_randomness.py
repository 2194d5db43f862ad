"""pol's randomness through the engine: a model's own initialisation and its nn.Dropout layers draw from pol.rng
(the same values on every machine, in both numerics), so a model with dropout trains to one commitment and its
honest replays agree closely enough for tight native thresholds; a model that draws outside pol is refused."""

from __future__ import annotations

import pytest
import torch

from pol.components import CodePolicy
from pol.engine import build_runtime, initial_state, run_steps
from pol.errors import UnsupportedOperator
from pol.models import build_model
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import verify

from .attacks.forge import honest_states, other_data_order, train_states, write_forged

ALLOW = CodePolicy.allowing(["tests"])
DROP = {"model": "tests.userpkg:dropout_net", "data": "tests.userpkg:make_data", "loss": "mse", "steps": 8, "every": 4,
        "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.01}}


def test_the_models_own_initialisation_is_the_default_and_reproducible():
    spec = spec_from_dict(DROP)
    rt = build_runtime(spec, code=ALLOW)
    first = initial_state(rt)
    w = first["param/net.0.weight"]
    assert abs(float(w.std()) - 0.3) < 0.08 and torch.count_nonzero(first["param/net.0.bias"]) == 0  # its _init_weights
    run_steps(rt, 2)
    assert all(torch.equal(first[k], v) for k, v in initial_state(rt).items())  # rebuilt after training: the same init
    again = build_model(spec.model, ALLOW, init_seed=spec.seed)
    assert torch.equal(dict(again.named_parameters())["net.0.weight"], w)
    other = build_model(spec.model, ALLOW, init_seed=spec.seed + 1)
    assert not torch.equal(dict(other.named_parameters())["net.0.weight"], w)
    pol_rule = initial_state(build_runtime(spec.replace(init="pol"), code=ALLOW))
    assert not torch.equal(pol_rule["param/net.0.weight"], w)  # pol's own rule stays available


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_a_model_with_dropout_trains_to_one_commitment_and_verifies(tmp_path, numerics):
    spec = spec_from_dict({**DROP, "numerics": numerics})
    a = train_and_prove(spec, tmp_path / "a")
    b = train_and_prove(spec, tmp_path / "b")
    assert a.manifest.root == b.manifest.root
    report = verify(a.path, segments=[1, 2], seed=0, code=ALLOW)
    assert report.accepted, report.reason
    if numerics == "native":  # the masks are reproducible: honest replays agree to rounding, so thresholds stay tight
        assert report.thresholds.rel_l2 < 1e-3, report.thresholds


@pytest.mark.parametrize("microbatch, per_step", [(0, 2), (8, 4)])
def test_every_dropout_layer_draws_once_per_micro_batch_and_step(microbatch, per_step):
    """Each draw takes its own key (step, micro-batch, position), so two layers, two micro-batches and two steps
    never share a mask (pol.randomness's tests check that different keys give different masks)."""
    spec = spec_from_dict({**DROP, "microbatch": microbatch})
    rt = build_runtime(spec, code=ALLOW)
    initial_state(rt)
    run_steps(rt, 1)
    assert rt.uses_random and rt.random_draws == per_step
    run_steps(rt, 3)
    assert rt.random_draws == 3 * per_step


def test_a_data_order_forgery_of_a_dropout_model_is_rejected_in_native_numerics(tmp_path):
    spec = spec_from_dict(DROP)
    honest = train_and_prove(spec, tmp_path / "honest")
    spec, _, records = honest_states(honest.path)
    with other_data_order():
        states, _, losses = train_states(spec)
    path = write_forged(tmp_path / "f", spec, states, data={r.step: r.data for r in records}, losses=losses)
    report = verify(path, segments=[1, 2], seed=0, code=ALLOW)
    assert report.verdict == "reject" and all(not c.ok for c in report.checks)


def test_a_model_that_draws_outside_pol_is_refused():
    spec = spec_from_dict({**DROP, "model": "tests.userpkg:late_random"})
    rt = build_runtime(spec, code=ALLOW)
    initial_state(rt)
    run_steps(rt, 2)  # its first two calls draw nothing
    with pytest.raises(UnsupportedOperator, match="drew random numbers at step 2"):
        run_steps(rt, 3)
