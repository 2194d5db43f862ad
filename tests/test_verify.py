import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pol.bundle import checkpoint_name, open_bundle
from pol.errors import BundleNotFound, DataDiffers, PolError
from pol.prove import train_and_prove
from pol.verify import (
    choose_segments,
    compute_escape_probability,
    compute_required_samples,
    derive_randomness,
    verify,
)

from .conftest import tiny_spec

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_honest_bundles_are_accepted(honest_bundles):
    for model, path in honest_bundles.items():
        report = verify(path, samples=3, seed=1)
        assert report.verdict == "accept", (model, report.reason)
        assert len(report.checks) == 3 and all(c.ok and c.data_ok for c in report.checks)
        assert report.thresholds is not None and report.thresholds.rel_l2 >= 1e-5
        assert 0 < report.compute_fraction <= 2.0


def test_sample_depends_only_on_randomness_and_root():
    root = "ab" * 32
    a = choose_segments(100, b"x" * 32, root, 8, 2, [float(i) for i in range(100)])
    assert a == choose_segments(100, b"x" * 32, root, 8, 2, [float(i) for i in range(100)])
    assert a != choose_segments(100, b"y" * 32, root, 8, 2, [float(i) for i in range(100)])
    assert a != choose_segments(100, b"x" * 32, "cd" * 32, 8, 2, [float(i) for i in range(100)])
    largest = [i for i, why in a if why == "largest-update"]
    assert len(largest) == 2 and all(i >= 97 for i in largest)  # among the top 2x2 updates (segments 97..100)
    assert len({i for i, _ in a}) == 10


def test_uniform_sampling_is_uniform():
    counts = [0] * 20
    for r in range(2000):
        for i, _ in choose_segments(20, r.to_bytes(32, "little"), "00" * 32, 3, 0, None):
            counts[i - 1] += 1
    expected = 2000 * 3 / 20
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts), counts


def test_escape_probability_matches_the_formula():
    assert compute_escape_probability(1000, 66, 0.1) == pytest.approx(
        math.comb(900, 66) / math.comb(1000, 66))
    assert compute_escape_probability(10, 10, 0.1) == 0.0
    assert compute_escape_probability(10, 0, 0.5) == 1.0
    s = compute_required_samples(1000, 0.999, 0.1)
    assert compute_escape_probability(1000, s, 0.1) <= 0.001 < compute_escape_probability(1000, s - 1, 0.1)
    assert s / 1000 <= 0.1  # the target: 0.999 against f = 0.1 for at most 10% of the segments


def test_randomness_sources():
    assert derive_randomness(seed=3) == derive_randomness(seed=3)
    assert derive_randomness(seed=3)[0] != derive_randomness(seed=4)[0]
    assert derive_randomness(beacon="ab" * 16) == (bytes.fromhex("ab" * 16), "beacon")
    assert derive_randomness()[0] != derive_randomness()[0]
    for bad in ({"beacon": "zz"}, {"beacon": "ab"}, {"seed": 1, "beacon": "ab" * 16}):
        with pytest.raises(PolError):
            derive_randomness(**bad)


def test_a_beacon_replays_the_same_sample(honest_bundles):
    first = verify(honest_bundles["mlp"], samples=2)
    again = verify(honest_bundles["mlp"], samples=2, beacon=first.randomness)
    assert first.randomness_source == "fresh" and again.randomness_source == "beacon"
    assert [c.index for c in first.checks] == [c.index for c in again.checks]


def test_bundle_trained_with_two_threads_verified_with_one(tmp_path):
    code = ("import torch; torch.set_num_threads(2); from pol.prove import train_and_prove; from tests.conftest import tiny_spec; "
            f"train_and_prove(tiny_spec('transformer', steps=16, every=4), {str(tmp_path / 'b')!r})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    with open_bundle(tmp_path / "b") as b:
        assert b.manifest.env["threads"] == 2
    report = verify(tmp_path / "b", segments=[1, 2, 3, 4], seed=0, threads=1)
    assert report.verdict == "accept", report.reason


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_bundle_trained_in_micro_batches_is_accepted(tmp_path, model):
    result = train_and_prove(tiny_spec(model), tmp_path / "b", split=4)
    assert result.manifest.spec.microbatch == 0  # an execution choice, not part of the job
    report = verify(tmp_path / "b", segments=[1, 2, 3], seed=0)
    assert report.verdict == "accept", report.reason
    assert any(c.max_rel_l2 > 0 for c in report.checks) or model == "cnn"  # the split really changed the bits


@pytest.mark.slow
def test_no_false_alarms_over_many_honest_runs(tmp_path):
    """24 honest bundles (3 models x 4 seeds x whole/split batches), every segment replayed: zero rejections."""
    verdicts = []
    for model in ("mlp", "cnn", "transformer"):
        for seed in range(4):
            for split in (None, 8):
                path = train_and_prove(tiny_spec(model, seed=seed, steps=8, every=2), tmp_path / f"{model}-{seed}-{split}", split=split).path
                report = verify(path, segments=[1, 2, 3, 4], seed=seed, threads=1 + seed % 2)
                verdicts.append((model, seed, split, report.verdict, report.reason))
    rejected = [v for v in verdicts if v[3] != "accept"]
    assert len(verdicts) == 24 and not rejected, rejected


def test_tampered_file_is_rejected_not_an_error(honest_bundles, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(honest_bundles["mlp"], path)
    ckpt = path / checkpoint_name(4)
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 0x04
    ckpt.write_bytes(bytes(data))
    report = verify(path, segments=[1])  # a segment that reads it (one that does not would not notice: lazy integrity)
    assert report.verdict == "reject" and "integrity" in report.reason


def test_unexpected_commitment_is_rejected(honest_bundles):
    report = verify(honest_bundles["mlp"], samples=1, seed=0, expected_root="00" * 32)
    assert report.verdict == "reject" and "expected" in report.reason


def test_cannot_verify_cases(honest_bundles, tmp_path):
    with pytest.raises(BundleNotFound):
        verify(tmp_path / "missing", samples=1)
    with pytest.raises(PolError):
        verify(honest_bundles["mlp"], samples=0)
    with pytest.raises(PolError):
        verify(honest_bundles["mlp"], confidence=0.9)
    with pytest.raises(PolError):
        verify(honest_bundles["mlp"], segments=[99])


def test_data_differs_is_not_an_accusation(tmp_path):
    from safetensors.torch import save_file

    from tests.userpkg import make_data

    data = make_data(64)
    (tmp_path / "data").mkdir()
    save_file({"x": data["x"].contiguous(), "y": data["y"].contiguous()}, str(tmp_path / "data" / "a.safetensors"))
    fields = dict(model="tests.userpkg:make_model", data=f"dir:{tmp_path / 'data'}", loss="mse", steps=4, every=2, batch_size=8)
    from pol.spec import spec_from_dict

    path = train_and_prove(spec_from_dict(fields), tmp_path / "b").path
    (tmp_path / "other").mkdir()
    save_file({"x": data["x"].contiguous() * 2, "y": data["y"].contiguous()}, str(tmp_path / "other" / "a.safetensors"))
    from pol.components import CodePolicy

    code = CodePolicy.allowing(["tests"])
    with pytest.raises(DataDiffers):
        verify(path, samples=1, seed=0, data_dir=str(tmp_path / "other"), code=code)
    result = runner.invoke(app, ["verify", str(path), "--data-dir", str(tmp_path / "other"), "--quiet", "--allow-code", "tests"])
    assert result.exit_code == 2 and "data differs" in result.stderr and "not evidence of fraud" in result.stderr
    assert verify(path, samples=1, seed=0, data_dir=str(tmp_path / "data"), code=code).verdict == "accept"


def test_a_bundle_never_chooses_which_local_path_a_verifier_reads(tmp_path, monkeypatch):
    """`dir:PATH` names a directory on the solver's machine. A verifier that did not say where its copy is gets
    DataNotProvided (exit 2) before any file is opened: a stranger cannot make it read (or time) a path it picked."""
    from safetensors.torch import save_file

    from pol.components import CodePolicy
    from pol.errors import DataNotProvided
    from pol.spec import spec_from_dict
    from tests.userpkg import make_data

    data = make_data(64)
    (tmp_path / "data").mkdir()
    save_file({"x": data["x"].contiguous(), "y": data["y"].contiguous()}, str(tmp_path / "data" / "a.safetensors"))
    fields = dict(model="tests.userpkg:make_model", data=f"dir:{tmp_path / 'data'}", loss="mse", steps=4, every=2, batch_size=8)
    path = train_and_prove(spec_from_dict(fields), tmp_path / "b").path
    opened: list[str] = []
    import pol.data

    real = pol.data.safe_open
    monkeypatch.setattr(pol.data, "safe_open", lambda f, *a, **k: opened.append(f) or real(f, *a, **k))
    code = CodePolicy.allowing(["tests"])
    with pytest.raises(DataNotProvided, match="--data-dir"):
        verify(path, samples=1, seed=0, code=code)
    assert opened == []
    assert verify(path, samples=1, seed=0, data_dir=str(tmp_path / "data"), code=code).verdict == "accept"
    assert opened  # the watch sees reads: the verifier reads its own --data-dir
    opened.clear()
    result = runner.invoke(app, ["verify", str(path), "--quiet", "--allow-code", "tests"])
    assert result.exit_code == 2 and "reads no path a bundle names" in result.stderr and opened == []
    assert verify(path, samples=1, seed=0, data_dir=str(tmp_path / "data"), code=code).verdict == "accept"
    # the verifier's own spec file names its own data: --spec uses that path
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(fields))
    ok = runner.invoke(app, ["verify", str(path), "--spec", str(spec_file), "--quiet", "--allow-code", "tests", "--seed", "1"])
    assert ok.exit_code == 0, ok.output


def test_cli_exit_codes_and_json(honest_bundles, tmp_path):
    ok = runner.invoke(app, ["verify", str(honest_bundles["cnn"]), "--samples", "2", "--seed", "5", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["verdict"] == "accept" and len(report["checks"]) == 2 and "0.1" in report["escape_probability"]
    human = runner.invoke(app, ["verify", str(honest_bundles["cnn"]), "--confidence", "0.9", "--cheat-fraction", "0.5", "--quiet"])
    assert human.exit_code == 0 and "ACCEPT" in human.stdout and "--beacon" in human.stdout
    from .attacks.forge import forge

    forged = forge(honest_bundles["cnn"], tmp_path / "f", lambda spec, states: (spec, {s: states[0] for s in states}))
    bad = runner.invoke(app, ["verify", str(forged), "--segments", "1,2", "--quiet"])
    assert bad.exit_code == 1 and "REJECT" in bad.stdout
    for args in (["verify", str(tmp_path / "none")], ["verify", str(honest_bundles["cnn"]), "--samples", "2", "--confidence", "0.9"],
                 ["verify", str(honest_bundles["cnn"]), "--segments", "x"], ["verify", str(honest_bundles["cnn"]), "--beacon", "zz"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)


def test_bundle_trained_on_one_instruction_set_verified_on_another(tmp_path):
    """Native numerics across CPU capabilities: bits differ, the calibrated thresholds absorb it (no false alarm)."""
    import os

    train = ("from pol.prove import train_and_prove; from tests.conftest import tiny_spec; "
             f"train_and_prove(tiny_spec('transformer', steps=16, every=4), {str(tmp_path / 'b')!r})")
    subprocess.run([sys.executable, "-c", train], cwd=REPO, check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    check = ("import json; from pol.verify import verify; "
             f"r = verify({str(tmp_path / 'b')!r}, segments=[1, 2, 3, 4], seed=0); "
             "print(json.dumps([r.verdict, max(c.max_rel_l2 for c in r.checks)]))")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True, capture_output=True, text=True,
                          env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    verdict, worst = json.loads(done.stdout)
    assert verdict == "accept", worst


def test_a_bundle_from_another_version_cannot_be_verified_here(tmp_path, monkeypatch):
    """A step is defined per pol version (and, in exact numerics, per torch): replaying another version's bundle
    could only raise false alarms, so the verifier says it cannot verify, never that the solver cheated."""
    import pol.engine
    import pol.verify
    from pol.errors import VersionMismatch

    with monkeypatch.context() as m:
        m.setattr(pol.engine, "__version__", "0.0.9")
        old = train_and_prove(tiny_spec(), tmp_path / "old").path
    with pytest.raises(VersionMismatch, match="made with pol 0.0.9"):
        verify(old, seed=1)
    result = CliRunner().invoke(app, ["verify", str(old), "--seed", "1"])
    assert result.exit_code == 2 and "cannot verify" in result.stderr and "pol 0.0.9" in result.stderr

    exact = train_and_prove(tiny_spec(numerics="exact", steps=4, every=2), tmp_path / "exact").path
    native = train_and_prove(tiny_spec(steps=4, every=2), tmp_path / "native").path
    monkeypatch.setattr(pol.verify.torch, "__version__", "9.9.9")
    with pytest.raises(VersionMismatch, match="torch"):
        verify(exact, seed=1)
    assert verify(native, seed=1).accepted  # native numerics tolerates another torch
