"""One-line errors: user code that fails, a bad output path or a failing first step each give one line naming the
problem (exit 2 for what the user must fix), no traceback without --debug, and no half-written output."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli import app
from pol.canonical import is_digest, parse_digest

runner = CliRunner()
USER = {"loss": "mse", "steps": 4, "every": 2, "batch_size": 8}


def _spec(tmp_path, model, data="tests.userpkg:make_data"):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**USER, "model": model, "data": data}))
    return path


def test_an_exception_in_the_users_model_is_one_line(tmp_path):
    spec = _spec(tmp_path, "tests.userpkg:shape_mismatch_model")
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(tmp_path / "b"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: model 'tests.userpkg:shape_mismatch_model' failed on a batch x (8, 4) float32")
    assert "RuntimeError" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()  # found by the dry run, before anything was written
    debug = runner.invoke(app, ["--debug", "train", "--spec", str(spec), "--out", str(tmp_path / "b"), "--quiet"])
    assert debug.exit_code != 0 and debug.exception is not None  # --debug lets the exception through


def test_the_output_is_checked_before_anything_is_built(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = _spec(tmp_path, "tests.userpkg:shape_mismatch_model")
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "exists" in result.stderr and "failed on a batch" not in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"x")
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(archive), "--quiet"])
    assert result.exit_code == 2 and "exists" in result.stderr and archive.read_bytes() == b"x"


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path):
    spec = _spec(tmp_path, "tests.userpkg:make_model", data="tests.userpkg:nan_data")
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(tmp_path / "b"), "--quiet"])
    assert result.exit_code == 1 and "non-finite" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(tmp_path / "b"), "--quiet"])
    assert "exists" not in result.stderr  # the next run is not refused for a leftover


def test_one_parser_for_hex_digests():
    good = "0123456789abcdef" * 4
    assert is_digest(good) and parse_digest(good) == good
    for bad in (good + "\n", good.upper(), good[:-1], good + "0", " " + good, "g" * 64, None, 64, b"00" * 32):
        assert not is_digest(bad), repr(bad)
