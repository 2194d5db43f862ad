"""Native verification is sound or says it cannot be: calibration perturbs only what leaves a step's mathematics
unchanged (threads, oneDNN kernels; a batch split only for models without batch-coupled layers), and thresholds
have hard caps beyond which the verdict is "cannot verify soundly" (exit 2), never ACCEPT."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import app
from pol.components import CodePolicy
from pol.errors import CannotVerifySoundly, SpecError
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import CAP_MIN_COSINE, CAP_REL_L2, Thresholds, verify, verify_sound

ALLOW = CodePolicy.allowing(["tests"])
USER = {"data": "tests.userpkg:make_data", "loss": "mse", "steps": 6, "every": 3, "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}


def test_a_model_whose_honest_spread_is_too_large_cannot_be_verified_soundly(tmp_path):
    path = train_and_prove(spec_from_dict({**USER, "model": "tests.userpkg:thread_sensitive"}), tmp_path / "b").path
    with pytest.raises(CannotVerifySoundly, match="cannot verify soundly in native numerics"):
        verify(path, samples=1, seed=0, code=ALLOW)
    result = CliRunner().invoke(app, ["verify", str(path), "--quiet", "--allow-code", "tests"])
    assert result.exit_code == 2 and "numerics exact" in result.stderr and "ACCEPT" not in result.stdout


def test_a_batch_norm_model_is_calibrated_without_splitting_its_batch(tmp_path):
    spec = spec_from_dict({**USER, "model": "tests.userpkg:batchnorm_mlp"})
    path = train_and_prove(spec, tmp_path / "b").path
    report = verify(path, segments=[1, 2], seed=0, code=ALLOW)
    assert report.accepted and report.thresholds.rel_l2 < CAP_REL_L2 and report.thresholds.min_cosine > CAP_MIN_COSINE
    with pytest.raises(SpecError, match="batch norm"):
        train_and_prove(spec, tmp_path / "split", split=4)  # a split changes batch statistics: not an execution choice


def test_the_caps_themselves():
    ok = Thresholds(rel_l2=1e-2, min_cosine=0.9999, max_log_ratio=1e-3, loss_rel=1e-5)
    verify_sound(ok)
    for change in ({"rel_l2": 0.5}, {"min_cosine": 0.9}, {"max_log_ratio": 0.2}, {"loss_rel": 0.01}):
        with pytest.raises(CannotVerifySoundly):
            verify_sound(Thresholds(**{**{"rel_l2": 1e-2, "min_cosine": 0.9999, "max_log_ratio": 1e-3, "loss_rel": 1e-5}, **change}))
