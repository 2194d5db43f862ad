"""Native numerics on several processes sums the micro-batch gradients in another order (each process its own,
then the all-reduce): a verifier replaying on one process calibrates for that spread too, by summing the
micro-batch gradients in as many groups as the bundle records processes (`Runtime.reduce_groups`)."""

from __future__ import annotations

from pol.bundle import open_bundle
from pol.digest import state_digest
from pol.distributed import train_spawned
from pol.engine import build_runtime, capture_state, initial_state, one_step, restore_state
from pol.verify import _perturbations, recorded_world, verify

from .conftest import tiny_spec

NATIVE = dict(numerics="native", microbatch=4, steps=4, every=2)  # batch 16: 4 micro-batches


def _step(spec, groups: int, state=None):
    rt = build_runtime(spec)
    if state is None:
        state = initial_state(rt)
    restore_state(rt, state)
    rt.reduce_groups = groups
    one_step(rt)
    return state, capture_state(rt)


def test_grouped_sums_change_only_the_last_bits_in_native_and_nothing_in_exact():
    spec = tiny_spec("transformer", **NATIVE)
    start, one = _step(spec, 1)
    _, two = _step(spec, 2, start)
    _, again = _step(spec, 1, start)
    assert state_digest(again) == state_digest(one)  # the default is today's step
    params = [n for n in one if n.startswith("param/")]
    rel = max(float((two[n] - one[n]).norm() / (one[n] - start[n]).norm().clamp_min(1e-30)) for n in params)
    assert 0 < rel < 1e-4, rel  # another summation order: rounding, not another step
    exact = tiny_spec("transformer", **{**NATIVE, "numerics": "exact"})
    s0, e1 = _step(exact, 1)
    _, e3 = _step(exact, 3, s0)
    assert state_digest(e1) == state_digest(e3)  # an exact sum has no order


def test_a_native_two_process_bundle_is_calibrated_for_two_processes(tmp_path):
    run = train_spawned(tiny_spec("mlp", **NATIVE), tmp_path / "b", 2)
    assert not run.errors, run.errors
    with open_bundle(run.path) as b:
        assert recorded_world(b) == 2
        rt = build_runtime(b.spec)
    assert {"groups": 2} in _perturbations(rt, 2)
    assert not any("groups" in p for p in _perturbations(rt, 1))
    report = verify(run.path, samples=2, seed=0)
    assert report.accepted, report.reason
    assert report.steps_replayed == 4 + 2 * len(_perturbations(rt, 2))  # each segment 2 steps, calibrated whole
