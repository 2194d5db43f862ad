import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pol.bundle import open_bundle
from pol.errors import ComponentError, DataError, PolError, ResumeError, TrainingError
from pol.prove import PROGRESS_NAME, train_and_prove
from pol.spec import spec_from_dict

from .conftest import tiny_spec

REPO = Path(__file__).resolve().parent.parent


def test_same_spec_twice_gives_the_same_root(tmp_path):
    for model in ("mlp", "cnn", "transformer"):
        a = train_and_prove(tiny_spec(model), tmp_path / f"{model}-a").manifest
        b = train_and_prove(tiny_spec(model), tmp_path / f"{model}-b").manifest
        assert a.root == b.root and a.records == b.records
        assert train_and_prove(tiny_spec(model, seed=1), tmp_path / f"{model}-c").manifest.root != a.root


def test_background_and_inline_checkpoint_writers_give_the_same_bundle(tmp_path, monkeypatch):
    """Large states are written by a background thread, small ones inline: the bundle cannot tell them apart,
    and a failed background write surfaces as the solver's error."""
    import pol.bundle
    import pol.prove

    inline = train_and_prove(tiny_spec("transformer"), tmp_path / "inline").manifest
    monkeypatch.setattr(pol.prove, "BACKGROUND_MIN_BYTES", 0)
    background = train_and_prove(tiny_spec("transformer"), tmp_path / "background").manifest
    assert background.root == inline.root and background.records == inline.records and background.files == inline.files

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pol.bundle, "write_checkpoint", failing)
    with pytest.raises(OSError, match="No space left"):
        train_and_prove(tiny_spec("transformer"), tmp_path / "full")


def test_state_covers_params_buffers_optimizer_and_step(honest_bundles):
    with open_bundle(honest_bundles["transformer"]) as b:
        state = b.load_state(8)
    assert int(state["meta/step"]) == 8
    assert any(n.startswith("optim/exp_avg/") for n in state) and "optim/beta1_power" in state
    assert any(n.startswith("param/blocks.0.attn") for n in state)
    with open_bundle(honest_bundles["cnn"]) as b:
        assert any(n.startswith("optim/momentum/") for n in b.load_state(4))


def test_training_learns(tmp_path):
    for model in ("mlp", "cnn", "transformer"):
        records = train_and_prove(tiny_spec(model, steps=60, every=20), tmp_path / model).manifest.records
        assert records[-1].loss < records[1].loss, model


def test_interrupted_run_resumes_to_the_same_root(tmp_path):
    spec = tiny_spec("transformer", steps=20, every=4)
    reference = train_and_prove(spec, tmp_path / "ref").manifest.root

    def crash(step, total, loss):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_prove(spec, tmp_path / "run", on_progress=crash)
    assert (tmp_path / "run" / PROGRESS_NAME).exists() and not (tmp_path / "run" / "manifest.json").exists()
    result = train_and_prove(spec, tmp_path / "run", resume=True)
    assert result.resumed_from == 8 and result.manifest.root == reference


def test_a_torn_last_journal_line_is_dropped_on_resume(tmp_path):
    """The progress journal is appended one line per checkpoint: a crash mid-line leaves a torn last line, which
    resuming drops (that checkpoint is trained and written again); a damaged earlier line is a ResumeError."""
    spec = tiny_spec("mlp", steps=16, every=4)
    reference = train_and_prove(spec, tmp_path / "ref").manifest.root

    def crash(step, total, loss, at=10):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_prove(spec, tmp_path / "run", on_progress=crash)
    journal = tmp_path / "run" / PROGRESS_NAME
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 3  # the spec, then steps 0, 4 and 8: one line each, appended
    journal.write_text("\n".join(lines) + "\n" + lines[-1][:40])  # a crash while step 8's line was written again
    with pytest.raises(KeyboardInterrupt):  # resumed, crashed again after step 12's line: not glued onto the torn one
        train_and_prove(spec, tmp_path / "run", resume=True, on_progress=lambda step, total, loss: crash(step, total, loss, 14))
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 4 and all(line.startswith("{") and line.endswith("}") for line in lines)
    result = train_and_prove(spec, tmp_path / "run", resume=True)
    assert result.resumed_from == 12 and result.manifest.root == reference

    with pytest.raises(KeyboardInterrupt):
        train_and_prove(spec, tmp_path / "run2", on_progress=crash)
    journal = tmp_path / "run2" / PROGRESS_NAME
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], lines[1][:-3], *lines[2:]]) + "\n")
    with pytest.raises(ResumeError, match="damaged"):
        train_and_prove(spec, tmp_path / "run2", resume=True)


def test_solver_killed_with_sigkill_resumes_to_the_same_root(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "cli", "train", "--model", "mlp", "--model-kwargs", '{"hidden": 256}',
            "--steps", "200", "--every", "10", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "checkpoints").glob("*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(args + ["--resume", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    reference = subprocess.run(args[:-2] + [str(tmp_path / "ref"), "--quiet", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    import json

    a, b = json.loads(resumed.stdout), json.loads(reference.stdout)
    assert a["resumed_from"] >= 10 and a["root"] == b["root"]  # the last checkpoint may be on disk before its record


def test_resume_refuses_what_it_cannot_trust(tmp_path):
    with pytest.raises(ResumeError, match="nothing to resume"):
        train_and_prove(tiny_spec(), tmp_path / "empty", resume=True)
    spec = tiny_spec()

    def crash(step, total, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_prove(spec, tmp_path / "run", on_progress=crash)
    with pytest.raises(ResumeError, match="different job"):
        train_and_prove(tiny_spec(seed=5), tmp_path / "run", resume=True)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000000004.safetensors"
    save_file({"meta/step": torch.tensor(4)}, str(ckpt))
    with pytest.raises(ResumeError, match="does not match its record"):
        train_and_prove(spec, tmp_path / "run", resume=True)


def test_existing_output_needs_force(tmp_path):
    train_and_prove(tiny_spec(), tmp_path / "b")
    with pytest.raises(PolError, match="--force"):
        train_and_prove(tiny_spec(), tmp_path / "b")
    assert train_and_prove(tiny_spec(), tmp_path / "b", force=True).manifest


def test_archive_output(tmp_path):
    result = train_and_prove(tiny_spec(), tmp_path / "b.tar")
    assert result.path.is_file() and not (tmp_path / "b.tar.partial").exists()
    with open_bundle(result.path) as b:
        assert b.manifest.root == result.manifest.root


def test_user_model_and_data_by_import_path(tmp_path):
    spec = spec_from_dict({
        "model": {"name": "tests.userpkg:make_model", "kwargs": {"width": 6}},
        "data": {"name": "tests.userpkg:make_data", "kwargs": {"n": 64}},
        "loss": "mse", "steps": 8, "every": 4, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.1},
    })
    result = train_and_prove(spec, tmp_path / "user")
    with open_bundle(result.path) as b:
        assert b.load_state(8)["param/0.weight"].shape == (6, 4)
        assert b.records[-1].loss < b.records[1].loss


def test_dataset_from_a_directory_of_safetensors(tmp_path):
    from tests.userpkg import make_data

    data = make_data(64)
    (tmp_path / "data").mkdir()
    save_file({"x": data["x"][:40].contiguous(), "y": data["y"][:40].contiguous()}, str(tmp_path / "data" / "a.safetensors"))
    save_file({"x": data["x"][40:].contiguous(), "y": data["y"][40:].contiguous()}, str(tmp_path / "data" / "b.safetensors"))
    fields = {"model": "tests.userpkg:make_model", "data": f"dir:{tmp_path / 'data'}", "loss": "mse", "steps": 4, "every": 2, "batch_size": 8}
    by_dir = train_and_prove(spec_from_dict(fields), tmp_path / "d1").manifest
    by_fn = train_and_prove(spec_from_dict({**fields, "data": {"name": "tests.userpkg:make_data", "kwargs": {"n": 64}}}), tmp_path / "d2").manifest
    assert by_dir.spec.data_digest == by_fn.spec.data_digest


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"model": "tests.userpkg:not_a_model", "data": "synthetic"}, ComponentError),
        ({"model": "tests.nowhere:make", "data": "synthetic"}, ComponentError),
        ({"model": "tests.userpkg:missing", "data": "synthetic"}, ComponentError),
        ({"model": {"name": "mlp", "kwargs": {"bogus": 1}}}, ComponentError),
        ({"model": "tests.userpkg:make_model", "data": "tests.userpkg:bad_data"}, ComponentError),
        ({"model": "tests.userpkg:make_model", "data": "nodata"}, ComponentError),
        ({"model": "tests.userpkg:make_model", "data": "dir:/nonexistent/pol"}, DataError),
        ({"model": "mlp", "data": {"name": "synthetic", "kwargs": {"n": 8}}, "batch_size": 16}, DataError),
    ],
)
def test_bad_components_give_typed_errors(tmp_path, fields, error):
    with pytest.raises(error):
        train_and_prove(spec_from_dict({"steps": 2, "every": 1, **fields}), tmp_path / "x")


def test_divergence_is_reported(tmp_path):
    spec = tiny_spec("mlp", optimizer={"name": "sgd", "lr": 1e3, "momentum": 0.9})
    with pytest.raises(TrainingError, match="non-finite"):
        train_and_prove(spec.replace(steps=40, every=10), tmp_path / "x")


def test_microbatched_training_is_close_to_whole_batch(tmp_path):
    whole = train_and_prove(tiny_spec("mlp"), tmp_path / "w").manifest
    micro = train_and_prove(tiny_spec("mlp", microbatch=4), tmp_path / "m").manifest
    assert micro.spec.job_id != whole.spec.job_id
    assert abs(micro.records[-1].loss - whole.records[-1].loss) < 1e-3


def test_environment_is_recorded_outside_the_digests(honest_bundles):
    with open_bundle(honest_bundles["mlp"]) as b:
        env = b.manifest.env
        assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu" and "cpu_capability" in env
        assert "env" not in b.spec.to_dict()
        assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_update_with_a_reused_workspace_gives_the_same_bits(name):
    """The solver's scratch buffer is an execution detail: the state after a step is bitwise the same without it."""
    from pol.optim import apply_update, init_optimizer_state, make_workspace
    from pol.spec import OptimSpec

    opt = OptimSpec(name=name, lr=0.01, momentum=0.9, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(7, 5, generator=gen), "b": torch.randn(3, generator=gen)}
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    runs = []
    for workspace in (None, make_workspace(opt, params)):
        p = {n: t.clone() for n, t in params.items()}
        state = init_optimizer_state(opt, p)
        for _ in range(3):
            apply_update(opt, p, grads, state, 0.01, workspace)
        runs.append({**p, **state})
    assert (make_workspace(opt, params) is None) == (name == "sgd")
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["a"], params["a"])


def test_capture_into_a_spare_state_reuses_its_memory(tmp_path):
    from pol.engine import build_runtime, capture_state, initial_state, run_steps

    rt = build_runtime(tiny_spec(steps=4))
    spare = initial_state(rt)
    addresses = {n: t.data_ptr() for n, t in spare.items() if n != "meta/step"}
    run_steps(rt, 2)
    again = capture_state(rt, into=spare)
    fresh = capture_state(rt)
    assert again is spare and {n: t.data_ptr() for n, t in again.items() if n != "meta/step"} == addresses
    assert again.keys() == fresh.keys() and all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert int(again["meta/step"]) == 2
