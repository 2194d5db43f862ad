"""`verify(nproc=N)` / `pol verify --nproc N`: the sampled segments replayed on N worker processes give the same
report as one process (sample, checks, steps, verdict and reason), for honest and forged bundles alike."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from pol.bundle import checkpoint_name
from pol.errors import UsageError
from pol.prove import train_and_prove
from pol.verify import Report, verify

from .attacks.forge import honest_states, write_forged
from .conftest import tiny_spec


def _same(one: Report, many: Report) -> None:
    assert (many.verdict, many.reason, many.checks) == (one.verdict, one.reason, one.checks)
    assert (many.steps_replayed, many.compute_fraction, many.calibration_steps) == (one.steps_replayed, one.compute_fraction, one.calibration_steps)
    assert (many.randomness, many.escape_probability, many.thresholds) == (one.randomness, one.escape_probability, one.thresholds)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    return {numerics: train_and_prove(tiny_spec("mlp", steps=16, every=2, numerics=numerics), root / numerics).path
            for numerics in ("native", "exact")}


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_two_processes_give_the_one_process_report(bundles, numerics):
    one = verify(bundles[numerics], samples=5, seed=3)
    many = verify(bundles[numerics], samples=5, seed=3, nproc=2)
    assert one.accepted and len(one.checks) == 5
    _same(one, many)


def test_a_forged_segment_is_rejected_the_same_way(bundles, tmp_path):
    spec, states, records = honest_states(bundles["exact"])
    states[10] = {n: t * 1.001 if n.startswith("param/") else t for n, t in states[10].items()}  # segments 5 and 6
    forged = write_forged(tmp_path / "f", spec, states, data={r.step: r.data for r in records},
                          losses={r.step: r.loss for r in records})
    one = verify(forged, segments=[2, 5, 6, 8])
    many = verify(forged, segments=[2, 5, 6, 8], nproc=3)
    assert one.verdict == "reject" and [c.ok for c in one.checks] == [True, False, False, True]
    _same(dataclasses.replace(one, randomness=many.randomness), many)


def test_a_corrupt_checkpoint_rejects_at_the_same_segment(bundles, tmp_path):
    """One process stops at the first segment whose checkpoint fails its digest; the workers read on, and the
    merged report still stops there, with the checks before it."""
    path = tmp_path / "b"
    shutil.copytree(bundles["native"], path)
    data = bytearray((path / checkpoint_name(8)).read_bytes())
    data[-3] ^= 1
    (path / checkpoint_name(8)).write_bytes(bytes(data))
    one = verify(path, segments=[1, 4, 7])
    many = verify(path, segments=[1, 4, 7], nproc=2)
    assert one.verdict == "reject" and checkpoint_name(8) in one.reason and len(one.checks) == 1
    assert (many.verdict, many.reason, many.checks, many.steps_replayed) == (one.verdict, one.reason, one.checks, one.steps_replayed)


def test_nproc_must_be_positive(bundles):
    with pytest.raises(UsageError, match="nproc"):
        verify(bundles["exact"], nproc=0)


def test_pol_verify_nproc_gives_the_same_json_report(bundles):
    import json

    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    args = ["verify", str(bundles["native"]), "--samples", "4", "--seed", "5", "--json"]
    one = runner.invoke(app, args)
    many = runner.invoke(app, [*args, "--nproc", "2"])
    assert one.exit_code == many.exit_code == 0, many.output
    a, b = json.loads(one.stdout), json.loads(many.stdout)
    for key in ("verdict", "reason", "checks", "steps_replayed", "escape_probability", "thresholds", "randomness"):
        assert a[key] == b[key], key
    text = runner.invoke(app, ["verify", str(bundles["native"]), "--samples", "4", "--seed", "5", "--nproc", "2"])
    assert text.exit_code == 0 and "ACCEPT" in text.stdout and "largest-update pick" in text.stdout


def test_workers_read_a_served_bundle_with_the_callers_remote_options(bundles, tmp_path, monkeypatch):
    """Over a URL the workers fetch with the caller's `Remote` (here: no cache, so nothing is written anywhere)."""
    pytest.importorskip("aiohttp")
    from pol.remote import Remote
    from pol.serve import serve_in_thread

    monkeypatch.setenv("POL_CACHE_DIR", str(tmp_path / "default-cache"))  # where a lost option would write
    with serve_in_thread(bundles["exact"]) as server:
        one = verify(Remote(server.url, cache_dir=None), samples=4, seed=2)
        many = verify(Remote(server.url, cache_dir=None), samples=4, seed=2, nproc=2)
    _same(one, many)
    assert not (tmp_path / "default-cache" / "blobs").exists()


def test_pol_verify_url_nproc_with_a_progress_bar(bundles, tmp_path):
    """The CLI's Remote carries a progress callback (a closure): the workers get the options without it."""
    pytest.importorskip("aiohttp")
    from typer.testing import CliRunner

    from cli import app
    from pol.serve import serve_in_thread

    with serve_in_thread(bundles["exact"]) as server:
        result = CliRunner().invoke(app, ["verify", server.url, "--samples", "3", "--seed", "1", "--nproc", "2",
                                          "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0 and "ACCEPT" in result.stdout, result.output
