"""Every published way to fake a proof-of-learning trace, built as a consistent bundle and rejected on replay.

Each test forces the faked segments into the sample (the verifier's choice of segments is its own), then checks
that the verdict is reject and that the evidence points at a faked segment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pol.bundle import open_bundle
from pol.spec import OptimSpec
from pol.verify import verify

from ..conftest import tiny_spec
from .forge import forge, honest_states, interpolate, other_data_order, skip_every_other_batch, train_states, write_forged

MODELS = ["mlp", "cnn", "transformer"]


def all_segments(path: Path) -> list[int]:
    with open_bundle(path) as b:
        return list(range(1, len(b.records)))


def assert_rejected(path: Path, faked: set[int], **kwargs) -> None:
    report = verify(path, segments=sorted(faked), seed=0, **kwargs)
    assert report.verdict == "reject", report.reason
    failed = {c.index for c in report.checks if not c.ok}
    assert failed and failed <= faked, (failed, faked)


@pytest.mark.parametrize("model", MODELS)
def test_tampered_checkpoint(honest_bundles, tmp_path, model):
    def add_noise(spec, states):
        state = states[8]
        for name in [n for n in state if n.startswith("param/")]:
            state[name] = state[name] + 1e-3 * torch.ones_like(state[name])
        return spec, states

    path = forge(honest_bundles[model], tmp_path / "f", add_noise)
    report = verify(path, segments=all_segments(path), seed=0)
    assert report.verdict == "reject"
    assert {c.index for c in report.checks if not c.ok} == {2, 3}  # the segments ending and starting at step 8


@pytest.mark.parametrize("model", MODELS)
def test_fabricated_final_model_without_a_real_trace(honest_bundles, tmp_path, model):
    def fabricate(spec, states):
        final = states[spec.steps]
        return spec, {s: (final if s == spec.steps else states[0]) for s in states}

    path = forge(honest_bundles[model], tmp_path / "f", fabricate)
    assert_rejected(path, set(all_segments(path)))


@pytest.mark.parametrize("model", MODELS)
def test_interpolated_checkpoints_with_the_honest_learning_rate(honest_bundles, tmp_path, model):
    def straight_line(spec, states):
        return spec, interpolate(states, spec.checkpoint_steps, states[0], states[spec.steps])

    path = forge(honest_bundles[model], tmp_path / "f", straight_line)
    assert_rejected(path, set(all_segments(path)))


@pytest.mark.parametrize("model", MODELS)
def test_infinitesimal_update_claim(honest_bundles, tmp_path, model):
    """Interpolation plus a spec claiming a near-zero learning rate: replay with that rate barely moves."""

    def tiny_lr(spec, states):
        opt = OptimSpec(**{**{f: getattr(spec.optimizer, f) for f in OptimSpec.__slots__}, "lr": 1e-9})
        return spec.replace(optimizer=opt), interpolate(states, spec.checkpoint_steps, states[0], states[spec.steps])

    path = forge(honest_bundles[model], tmp_path / "f", tiny_lr)
    assert_rejected(path, set(all_segments(path)))


def test_real_large_steps_where_largest_update_sampling_looks(tmp_path):
    """Really train the first segments (where updates are biggest), then interpolate to a final model: top-Q
    sampling alone passes it; uniform sampling catches the interpolated segments."""
    from pol.engine import build_runtime, resolve_spec
    from pol.verify import committed_update_norms

    spec = tiny_spec("mlp", steps=24, every=4, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    spec = resolve_spec(spec, build_runtime(spec).dataset)
    honest, honest_data, honest_losses = train_states(spec)
    steps = spec.checkpoint_steps
    real_segments = {1, 2}
    tail = [s for s in steps if s >= 8]
    line = interpolate(honest, [s - 8 for s in tail], honest[8], honest[12])  # claims 16 steps for 4 steps' work
    forged = {**{s: honest[s] for s in steps if s <= 8}, **{s: line[s - 8] for s in tail}}
    path = write_forged(tmp_path / "f", spec, forged, data=honest_data, losses=honest_losses)
    with open_bundle(path) as b:
        norms = committed_update_norms(b)
    top = sorted(range(1, len(norms) + 1), key=lambda i: -norms[i - 1])[:2]
    assert set(top) == real_segments, "the real segments must be where largest-update sampling looks"
    assert verify(path, segments=sorted(real_segments), seed=0).verdict == "accept"  # top-Q alone is fooled
    assert_rejected(path, set(range(1, len(steps))) - real_segments)


@pytest.mark.parametrize("claim_committed_data", [True, False])
def test_training_on_another_data_order(tmp_path, claim_committed_data):
    spec = tiny_spec("mlp")
    from pol.engine import build_runtime, resolve_spec

    spec = resolve_spec(spec, build_runtime(spec).dataset)
    _, honest_data, _ = train_states(spec)
    with other_data_order():
        states, actual_data, actual_losses = train_states(spec)
    data = honest_data if claim_committed_data else actual_data
    path = write_forged(tmp_path / "f", spec, states, data=data, losses=actual_losses)
    report = verify(path, segments=all_segments(path), seed=0)
    assert report.verdict == "reject"
    if not claim_committed_data:
        assert all(not c.data_ok for c in report.checks)
    else:
        assert all(c.data_ok and not c.ok for c in report.checks)


def test_skipping_every_other_batch(tmp_path):
    spec = tiny_spec("transformer")
    from pol.engine import build_runtime, resolve_spec

    spec = resolve_spec(spec, build_runtime(spec).dataset)
    _, honest_data, honest_losses = train_states(spec)
    with skip_every_other_batch():
        states, _, _ = train_states(spec)
    path = write_forged(tmp_path / "f", spec, states, data=honest_data, losses=honest_losses)
    assert_rejected(path, set(all_segments(path)))


def test_splice_of_two_honest_runs(tmp_path, honest_bundles):
    spec_a, states_a, records_a = honest_states(honest_bundles["mlp"])
    other = tiny_spec("mlp", optimizer={"name": "adamw", "lr": 3e-3})  # another honest run of the same model and data
    from pol.engine import build_runtime, resolve_spec

    other = resolve_spec(other, build_runtime(other).dataset)
    states_b, data_b, _ = train_states(other)
    mid = 4
    spliced = {s: (states_a[s] if s <= mid else states_b[s]) for s in spec_a.checkpoint_steps}
    data = {r.step: r.data for r in records_a}
    path = write_forged(tmp_path / "f", spec_a, spliced, data=data, losses={r.step: r.loss for r in records_a})
    report = verify(path, segments=all_segments(path), seed=0)
    assert report.verdict == "reject"
    assert 2 in {c.index for c in report.checks if not c.ok}  # the junction 4 -> 8


def test_valid_hash_chain_over_forged_checkpoints(honest_bundles, tmp_path):
    """Shrink every weight by 1% after step 0 and recompute every digest, root and commitment."""

    def shrink(spec, states):
        return spec, {s: ({n: t * 0.99 if n.startswith("param/") else t for n, t in st.items()} if s else st)
                      for s, st in states.items()}

    path = forge(honest_bundles["cnn"], tmp_path / "f", shrink)
    with open_bundle(path) as b:  # integrity is perfect: only replay can tell
        assert b.load_state(12) is not None
    assert_rejected(path, set(all_segments(path)))


def test_forged_step_zero(honest_bundles, tmp_path):
    """A start that is not the seeded initialisation (e.g. a pre-trained model) is rejected before any replay."""

    def pretrained(spec, states):
        states[0] = {**states[spec.steps]}
        return spec, states

    path = forge(honest_bundles["mlp"], tmp_path / "f", pretrained)
    report = verify(path, samples=1, seed=0)
    assert report.verdict == "reject" and "step-0" in report.reason and report.steps_replayed == 0
