"""Largest-update sampling ranks segments by the update norms the records commit, so ranking reads no checkpoint.
The norms are the solver's claims: every replayed segment's claim is checked bit for bit, a false one is a
REJECT, and a cheater who understates its faked segments' norms only turns the largest-update share into picks
among honest segments: it is still caught at the uniform rate, which is what the escape probabilities count."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pol.bundle import manifest_from_dict, open_bundle
from pol.canonical import parse_json_strict
from pol.engine import build_runtime, resolve_spec
from pol.errors import BundleVersionError, ManifestError
from pol.spec import spec_from_dict
from pol.trace import compute_update_norm
from pol.verify import choose_segments, committed_update_norms, compute_escape_probability, verify
from tests.attacks.forge import restate_update_norms, train_states, write_forged
from tests.conftest import tiny_spec

N, FAKED_AT = 20, (4, 9, 14)
FAKED = {4, 5, 9, 10, 14, 15}  # a perturbed state breaks the segment it ends and the one it starts


@pytest.fixture(scope="module")
def faked_bundle(tmp_path_factory):
    """20 one-step segments of which 6 are wrong (states 4, 9 and 14 pushed off the trajectory): their true
    update norms are the largest in the bundle, so honest largest-update sampling finds them."""
    spec = tiny_spec("mlp", steps=N, every=1)
    spec = resolve_spec(spec, build_runtime(spec).dataset)
    states, data, losses = train_states(spec)
    for step in FAKED_AT:
        g = torch.Generator().manual_seed(step)
        states[step] = {n: t + 1e-2 * torch.randn(t.shape, generator=g) if n.startswith("param/") else t
                        for n, t in states[step].items()}
    return write_forged(tmp_path_factory.mktemp("norms") / "truthful", spec, states, data=data, losses=losses)


@pytest.fixture(scope="module")
def understated(faked_bundle, tmp_path_factory):
    """The same bundle claiming a tiny update norm for each faked segment (recommitted consistently)."""
    import shutil

    dst = tmp_path_factory.mktemp("norms") / "understated"
    shutil.copytree(faked_bundle, dst)
    with open_bundle(dst) as b:
        smallest = min(committed_update_norms(b))
    return restate_update_norms(dst, {i: smallest / 2 for i in FAKED})


def _catch_rate(path, uniform: int, largest: int, draws: int = 4000) -> float:
    with open_bundle(path, full=False) as b:
        norms, root = committed_update_norms(b), b.manifest.root
        assert b.bytes_read == 0  # ranking read no checkpoint
    hits = sum(bool({i for i, _ in choose_segments(N, k.to_bytes(8, "little"), root, uniform, largest, norms)} & FAKED)
               for k in range(draws))
    return hits / draws


def test_truthful_norms_put_the_largest_update_share_on_the_faked_segments(faked_bundle):
    with open_bundle(faked_bundle) as b:
        norms = committed_update_norms(b)
    assert set(sorted(range(1, N + 1), key=lambda i: -norms[i - 1])[: len(FAKED)]) == FAKED
    assert _catch_rate(faked_bundle, uniform=3, largest=1) == 1.0  # the top-2 pool holds only faked segments


def test_understated_norms_still_caught_at_the_uniform_rate(understated):
    theory = 1 - compute_escape_probability(N, 3, len(FAKED) / N)  # uniform samples only: 0.681
    rate = _catch_rate(understated, uniform=3, largest=1)
    assert abs(rate - theory) <= 4 * math.sqrt(theory * (1 - theory) / 4000), (rate, theory)
    assert rate < 0.9  # the largest-update share no longer helps ...


def test_understated_norms_end_to_end_with_fresh_randomness(understated):
    """... and end to end every catch is the false norm claim, found before any replay of that segment."""
    reports = [verify(understated, samples=4, largest=1) for _ in range(16)]
    theory = 1 - compute_escape_probability(N, 3, len(FAKED) / N)
    caught = [r for r in reports if not r.accepted]
    assert abs(len(caught) / 16 - theory) <= 4 * math.sqrt(theory * (1 - theory) / 16)
    for r in caught:
        failed = [c for c in r.checks if not c.ok]
        assert failed and all(c.index in FAKED and "committed update norm" in c.problem for c in failed), r.reason
    for r in reports:
        assert (r.uniform_samples, r.largest_samples) == (3, 1)
        assert set(r.escape_probability) and r.escape_probability["0.1"] == compute_escape_probability(N, 3, 0.1)


def test_an_overstated_honest_norm_is_rejected_when_replayed(honest_bundles, tmp_path):
    """Overstating an honest segment's norm would pull largest-update picks onto it: those picks are replayed,
    so the false claim is caught exactly where it was meant to work."""
    import shutil

    path = tmp_path / "over"
    shutil.copytree(honest_bundles["mlp"], path)
    with open_bundle(path) as b:
        claimed = committed_update_norms(b)[1]
    restate_update_norms(path, {2: claimed * (1 + 2**-40)})  # off in the last bits only
    report = verify(path, segments=[2], seed=0)
    assert report.verdict == "reject" and "committed update norm" in report.reason
    assert verify(path, segments=[1, 3], seed=0).accepted  # the other segments' claims are untouched


def test_the_norm_is_the_same_bits_on_any_thread_count():
    g = torch.Generator().manual_seed(0)
    before = {"param/w": torch.randn(300_000, generator=g), "param/b": torch.randn(7, generator=g), "buffer/x": torch.ones(3)}
    after = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in before.items()}
    threads = torch.get_num_threads()
    try:
        values = []
        for n in (1, 2):
            torch.set_num_threads(n)
            values.append(compute_update_norm(before, after))
    finally:
        torch.set_num_threads(threads)
    assert values[0] == values[1]
    reference = math.sqrt(sum(float(((after[k].double() - before[k].double()) ** 2).sum()) for k in ("param/w", "param/b")))
    assert values[0] == pytest.approx(reference, rel=1e-6)  # the norm it claims to be; buffers do not count
    assert compute_update_norm(before, before) == 0.0
    assert compute_update_norm({}, {"param/w": torch.full((2,), 3.0)}) == pytest.approx(math.sqrt(18))  # new: in full
    assert compute_update_norm(before, {"param/w": torch.full((1,), 1e30)}) == 3.4028234663852886e38  # capped, finite


def _manifest(path) -> dict:
    return parse_json_strict((path / "manifest.json").read_bytes())


@pytest.mark.parametrize("change, problem", [
    (lambda m: m["records"][1].update(update=None), "records[1].update"),
    (lambda m: m["records"][0].update(update=1.0), "records[0].update"),
    (lambda m: m["records"][2].update(update=-1.0), "records[2].update"),
    (lambda m: m["records"][2].update(update=True), "records[2].update"),
    (lambda m: m["records"][2].pop("update"), "records[2]"),
])
def test_malformed_update_claims_are_manifest_errors(honest_bundles, change, problem):
    manifest = _manifest(honest_bundles["mlp"])
    change(manifest)
    with pytest.raises(ManifestError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        manifest_from_dict(manifest)


def test_a_bundle_of_an_older_pol_without_norms_cannot_be_verified_here(honest_bundles):
    """Records of another record format, from another pol: "cannot verify" (use that pol), not a broken bundle."""
    manifest = _manifest(honest_bundles["mlp"])
    for r in manifest["records"]:
        r.pop("update")
    manifest["spec"]["versions"]["pol"] = "0.5.0-old"
    manifest["job_id"] = spec_from_dict(manifest["spec"], require_resolved=True).job_id
    with pytest.raises(BundleVersionError, match="0.5.0-old"):
        manifest_from_dict(json.loads(json.dumps(manifest)))
