"""Verification costs what it samples (issue 16, items 1 and 4): checkpoint digests are checked when, and only when,
a checkpoint is read; `pol inspect` checks them all (`--full`, the default) and says which check it did; calibration
replays a few steps, not whole segments, and its thresholds stay within 2x of whole-segment calibration."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pol.bundle import checkpoint_name, open_bundle, pack_bundle
from pol.engine import build_runtime
from pol.errors import DigestMismatch
from pol.prove import train_and_prove
from pol.verify import CALIBRATION_STEPS, FEW_STEP_MIN_SEGMENT, calibrate_thresholds, verify
from tests.conftest import TINY_KWARGS, tiny_spec

runner = CliRunner()


def _flip(path: Path, offset_from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01  # inside the last tensor's data
    path.write_bytes(bytes(data))


def _read_cost(bundle: Path, steps: list[int]) -> int:
    """Bytes a verification touching these checkpoints reads: each file in full, plus its header for the layout check."""
    total = 0
    for step in steps:
        path = bundle / checkpoint_name(step)
        header = int.from_bytes(path.read_bytes()[:8], "little")
        total += path.stat().st_size + 8 + header
    return total


def test_a_corrupt_unsampled_checkpoint_costs_nothing(bundle_copy):
    _flip(bundle_copy / checkpoint_name(12))  # segment 3's end; segment 1 reads steps 0 and 4 only
    report = verify(bundle_copy, segments=[1], seed=0)
    assert report.accepted, report.reason
    assert report.checkpoints_read == 2
    assert report.bytes_read == _read_cost(bundle_copy, [0, 4])  # nothing of steps 8 and 12
    assert report.to_dict()["bytes_read"] == report.bytes_read

    # the same checkpoint sampled: a REJECT naming the file, found on the bytes read
    rejected = verify(bundle_copy, segments=[3], seed=0)
    assert rejected.verdict == "reject" and "bundle integrity" in rejected.reason
    assert checkpoint_name(12) in rejected.reason and rejected.steps_replayed == 0

    # pol inspect checks every file by default, and says so; --quick does not, and says that too
    full = runner.invoke(app, ["inspect", str(bundle_copy)])
    assert full.exit_code == 1 and "digest mismatch" in full.stderr and checkpoint_name(12) in full.stderr
    quick = runner.invoke(app, ["inspect", str(bundle_copy), "--quick"])
    assert quick.exit_code == 0 and "quick check" in quick.stdout and "NOT checked" in quick.stdout
    summary = json.loads(runner.invoke(app, ["inspect", str(bundle_copy), "--no-full", "--json"]).stdout)
    assert summary["integrity_check"] == "quick" and summary["bytes_read"] == 0


def test_inspect_says_it_checked_everything(honest_bundles):
    result = runner.invoke(app, ["inspect", str(honest_bundles["mlp"]), "--json"])
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    sizes = sum((honest_bundles["mlp"] / checkpoint_name(r["step"])).stat().st_size for r in summary["records"])
    assert summary["integrity_check"] == "full" and summary["bytes_read"] == sizes
    assert "full check" in runner.invoke(app, ["inspect", str(honest_bundles["mlp"]), "--full"]).stdout


def test_lazy_integrity_in_an_archive(honest_bundles, tmp_path):
    archive = pack_bundle(honest_bundles["mlp"], tmp_path / "b.tar")
    with tarfile.open(archive) as tf:
        member = tf.getmember(checkpoint_name(12))
    data = bytearray(archive.read_bytes())
    data[member.offset_data + member.size - 7] ^= 0x01
    archive.write_bytes(bytes(data))
    assert verify(archive, segments=[1], seed=0).accepted
    rejected = verify(archive, segments=[2, 3], seed=0)
    assert rejected.verdict == "reject" and checkpoint_name(12) in rejected.reason
    with pytest.raises(DigestMismatch, match=checkpoint_name(12)):
        open_bundle(archive)  # a full open still checks every file


def test_a_lazy_bundle_checks_each_file_once_on_the_bytes_read(bundle_copy):
    _flip(bundle_copy / checkpoint_name(8))
    with open_bundle(bundle_copy, full=False) as b:
        assert b.bytes_read == 0 and not b.fully_checked
        b.load_state(4)
        assert b.bytes_read == (bundle_copy / checkpoint_name(4)).stat().st_size  # one read: parsed and hashed
        with pytest.raises(DigestMismatch, match=checkpoint_name(8)):
            b.load_state(8)
        with pytest.raises(DigestMismatch, match=checkpoint_name(8)):
            b.check_files()


def test_largest_update_ranking_reads_no_checkpoint(tmp_path):
    """Ranking uses the update norms the records commit: only the sampled segments' checkpoints are read."""
    path = train_and_prove(tiny_spec("mlp", steps=24, every=2), tmp_path / "b").path  # 12 segments
    report = verify(path, samples=4, largest=2, seed=0)
    assert report.accepted and (report.uniform_samples, report.largest_samples) == (2, 2)
    touched = {0} | {c.start for c in report.checks} | {c.end for c in report.checks}  # step 0: always checked
    assert report.checkpoints_read == len(touched) <= 9 < 13


@pytest.fixture(scope="module")
def k10_bundles(tmp_path_factory) -> dict[str, Path]:
    """One honest bundle per built-in model at the default k = 10, with 4 segments."""
    root = tmp_path_factory.mktemp("k10")
    return {m: train_and_prove(tiny_spec(m, steps=40, every=10), root / m).path for m in ("mlp", "transformer")}


def test_calibration_costs_under_a_tenth_of_the_sampled_replay(k10_bundles):
    for model, path in k10_bundles.items():
        report = verify(path, samples=4, seed=1)
        assert report.accepted, (model, report.reason)
        sampled = sum(c.end - c.start for c in report.checks)
        assert sampled == 40 and report.calibration_steps == CALIBRATION_STEPS
        assert report.steps_replayed == sampled + report.calibration_steps  # counted in the compute fraction
        assert report.compute_fraction == pytest.approx((sampled + CALIBRATION_STEPS) / 40)
        assert report.calibration_steps / sampled < 0.10
        assert report.thresholds is not None and report.thresholds.observed["steps"] == CALIBRATION_STEPS


@pytest.mark.parametrize("model", sorted(TINY_KWARGS))
def test_few_step_thresholds_within_2x_of_whole_segment_calibration(model, honest_bundles, k10_bundles, tmp_path):
    paths = [honest_bundles[model]]  # k = 4
    paths.append(k10_bundles[model] if model in k10_bundles else train_and_prove(tiny_spec(model, steps=20, every=10), tmp_path / model).path)
    for path in paths:
        with open_bundle(path, full=False) as b:
            rt = build_runtime(b.spec)
            n = len(b.records) - 1
            for segment in sorted({1, n}):
                few, few_steps, _ = calibrate_thresholds(rt, b, segment)
                whole, whole_steps, _ = calibrate_thresholds(rt, b, segment, steps=None)
                span = b.records[segment].step - b.records[segment - 1].step
                assert whole_steps == 3 * span and few_steps == (span + CALIBRATION_STEPS if span >= FEW_STEP_MIN_SEGMENT else 3 * span)
                pairs = {"rel_l2": (few.rel_l2, whole.rel_l2), "cosine gap": (1 - few.min_cosine, 1 - whole.min_cosine),
                         "log ratio": (few.max_log_ratio, whole.max_log_ratio), "loss": (few.loss_rel, whole.loss_rel)}
                for name, (a, w) in pairs.items():
                    assert 0.5 <= a / w <= 2.0, (model, path.name, segment, name, a, w)

