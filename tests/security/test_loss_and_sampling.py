"""No free nonces, honest randomness: a committed loss is checked on replay (so it cannot be ground, nor forged for
show), and the sample comes from randomness the solver cannot know, except with --seed, which the report flags."""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch

from pol.bundle import write_bundle
from pol.digest import state_digest
from pol.engine import build_runtime, capture_state, initial_state, resolve_spec, run_steps
from pol.trace import EMPTY_DATA, Record, compute_trace_commitment, compute_update_norm
from pol.verify import choose_segments, compute_escape_probability, derive_randomness, verify

from ..conftest import tiny_spec
from .helpers import rewrite_manifest


def _edit_losses(src, dst, change):
    def edit(m):
        for r in m["records"][1:]:
            r["loss"] = change(r["step"], r["loss"])

    return rewrite_manifest(src, dst, edit)


def test_an_edited_loss_is_rejected_in_both_numerics(honest_bundles, tmp_path):
    native = _edit_losses(honest_bundles["mlp"], tmp_path / "n", lambda step, loss: loss * 1.01 if step == 8 else loss)
    report = verify(native, segments=[1, 2, 3], seed=0)
    assert report.verdict == "reject" and [c.index for c in report.checks if not c.ok] == [2]
    assert "committed loss" in report.checks[1].problem and report.checks[1].replayed_loss is not None
    exact_src = tmp_path / "exact"
    from pol.prove import train_and_prove

    train_and_prove(tiny_spec("mlp", numerics="exact"), exact_src)
    nudged = _edit_losses(exact_src, tmp_path / "e", lambda step, loss: math.nextafter(loss, 1.0) if step == 4 else loss)
    report = verify(nudged, segments=[1, 2], seed=0)  # one ulp: exact numerics compares the loss bit for bit
    assert report.verdict == "reject" and "bit for bit" in report.checks[0].problem and report.checks[1].ok
    assert verify(exact_src, segments=[1, 2, 3], seed=0).accepted


def test_a_forged_loss_curve_is_rejected(honest_bundles, tmp_path):
    forged = _edit_losses(honest_bundles["transformer"], tmp_path / "f", lambda step, loss: 0.001)
    report = verify(forged, samples=3, seed=0)
    assert report.verdict == "reject" and all(not c.ok and "committed loss" in c.problem for c in report.checks)


def _honest(spec):
    """Honest states, data digests and losses of `spec` at every step."""
    rt = build_runtime(spec)
    states, data, losses = {0: initial_state(rt)}, {}, {}
    for step in range(1, spec.steps + 1):
        seg = run_steps(rt, step)
        states[step], data[step], losses[step] = capture_state(rt), seg.data_digest, seg.loss
    return states, data, losses


def _perturbed(states, noise_steps, nonce):
    """The states with those at `noise_steps` perturbed by noise keyed by `nonce` (one nonce, one commitment)."""
    out = dict(states)
    for step in noise_steps:
        g = torch.Generator().manual_seed(nonce * 1000 + step)
        out[step] = {n: t + 1e-3 * torch.randn(t.shape, generator=g) if n.startswith("param/") else t for n, t in states[step].items()}
    return out


def test_a_solver_who_knows_the_seed_can_grind_the_sample_and_fresh_randomness_stops_it(tmp_path):
    """6 of 20 segments are wrong (states 4, 9 and 14 perturbed: each breaks the segment it ends and the one it
    starts). Knowing the verifier's seed, the solver tries nonces (other perturbations, so other commitments)
    until the sample misses all six, and is accepted. With fresh randomness the same bundle is caught at the
    rate the hypergeometric bound gives."""
    spec = tiny_spec("mlp", steps=20, every=1)
    spec = resolve_spec(spec, build_runtime(spec).dataset)
    faked, n, samples = {4, 5, 9, 10, 14, 15}, 20, 4
    seeded, _ = derive_randomness(seed=7)
    honest, data, losses = _honest(spec)
    for nonce in range(200):
        states = _perturbed(honest, (4, 9, 14), nonce)
        records = [Record(0, state_digest(states[0]), EMPTY_DATA, None)]
        records += [Record(s, state_digest(states[s]), data[s], losses[s], update=compute_update_norm(states[s - 1], states[s]))
                    for s in range(1, n + 1)]
        _, root = compute_trace_commitment(spec.job_id, records)
        if not {i for i, _ in choose_segments(n, seeded, root, samples, 0, None)} & faked:
            break
    else:
        raise AssertionError("no nonce in 200 dodged the seeded sample (escape chance ~0.21 each)")
    path = tmp_path / "ground"
    write_bundle(path, spec, ((s, states[s], records[s].data, records[s].loss) for s in range(n + 1)), {})
    ground = verify(path, samples=samples, largest=0, seed=7)
    assert ground.accepted and ground.sample_predictable  # the grinder wins against a known seed, and the report says so
    fresh = [verify(path, samples=samples, largest=0) for _ in range(24)]
    assert all(not r.sample_predictable and r.randomness_source == "fresh" for r in fresh)
    caught = sum(not r.accepted for r in fresh)
    theory = 1 - compute_escape_probability(n, samples, len(faked) / n)  # 0.79
    assert abs(caught / len(fresh) - theory) <= 4 * math.sqrt(theory * (1 - theory) / len(fresh)), caught
    beacon = verify(path, samples=samples, largest=0, beacon=secrets.token_hex(16))
    assert beacon.randomness_source == "beacon" and not beacon.sample_predictable


def test_fresh_samples_detect_at_the_theoretical_rate():
    """The sampler alone, 4000 fresh draws against one commitment: the rate of samples that hit a faked segment
    matches 1 - hypergeometric escape probability (within 4 standard errors)."""
    n, samples, faked = 20, 4, {4, 5, 9, 10, 14, 15}
    root = "cd" * 32
    hits = sum(bool({i for i, _ in choose_segments(n, secrets.token_bytes(32), root, samples, 0, None)} & faked)
               for _ in range(4000))
    theory = 1 - compute_escape_probability(n, samples, len(faked) / n)
    assert abs(hits / 4000 - theory) <= 4 * math.sqrt(theory * (1 - theory) / 4000)


def test_beacons_carry_at_least_128_bits():
    import pytest

    from pol.errors import UsageError

    for bad in ("ab" * 15, "zz" * 16, "abc", "ab" * 16 + "\n", "ab" * 65):
        with pytest.raises(UsageError):
            derive_randomness(beacon=bad)
    assert derive_randomness(beacon="AB" * 16)[1] == "beacon" and len(derive_randomness()[0]) == 32
    assert np.frombuffer(derive_randomness()[0], dtype=np.uint8).size == 32
