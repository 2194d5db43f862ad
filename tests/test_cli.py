import json

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
TINY = ["--model", "mlp", "--model-kwargs", '{"hidden": 16}', "--data-kwargs", '{"n": 256}', "--steps", "6", "--every", "3", "--batch-size", "8", "--quiet"]


def test_train_then_inspect_json(tmp_path):
    out = tmp_path / "b"
    result = runner.invoke(app, ["train", *TINY, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["root"] == trained["root"] and len(summary["root"]) == 64
    assert [r["step"] for r in summary["records"]] == [0, 3, 6]
    assert summary["spec"]["model"]["kwargs"] == {"hidden": 16}
    human = runner.invoke(app, ["inspect", str(out)])
    assert human.exit_code == 0 and "integrity ok" in human.stdout and trained["root"] in human.stdout


def test_inspect_fails_on_a_damaged_bundle(tmp_path):
    out = tmp_path / "b"
    assert runner.invoke(app, ["train", *TINY, "--out", str(out)]).exit_code == 0
    ckpt = out / "checkpoints" / "step-000000003.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-3] ^= 0x10
    ckpt.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1 and "digest mismatch" in result.stderr and "step-000000003" in result.stderr
    assert runner.invoke(app, ["inspect", str(tmp_path / "nothing")]).exit_code == 2  # no bundle there: usage


def test_a_failing_disk_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    import pol.bundle

    def full(directory, step, *args, **kwargs):
        raise OSError(28, "No space left on device", str(directory / f"step-{step}"))

    monkeypatch.setattr(pol.bundle, "write_checkpoint", full)
    result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "No space left on device" in result.stderr and "step-0" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_pack_and_inspect_archive(tmp_path):
    out = tmp_path / "b"
    assert runner.invoke(app, ["train", *TINY, "--out", str(out)]).exit_code == 0
    assert runner.invoke(app, ["pack", str(out), str(tmp_path / "b.tar")]).exit_code == 0
    assert runner.invoke(app, ["inspect", str(tmp_path / "b.tar")]).exit_code == 0


def test_spec_file_with_flag_overrides(tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_text('model = "cnn"\nsteps = 50\nevery = 5\nbatch_size = 8\n[model_kwargs_are_not_fields]\n')
    result = runner.invoke(app, ["train", "--spec", str(spec), "--out", str(tmp_path / "x"), "--quiet"])
    assert result.exit_code == 2 and "unknown spec fields" in result.stderr
    spec.write_text('model = "cnn"\nsteps = 50\nevery = 5\nbatch_size = 8\n[data]\nname = "images"\nkwargs = {n = 64}\n')
    result = runner.invoke(app, ["train", "--spec", str(spec), "--steps", "4", "--every", "2", "--lr", "0.01",
                                 "--out", str(tmp_path / "x"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "x"), "--json"]).stdout)["spec"]
    assert summary["steps"] == 4 and summary["model"]["name"] == "cnn" and summary["optimizer"] == {**summary["optimizer"], "name": "sgd", "lr": 0.01}


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["train", "--model", "nope"], 2, "unknown model"),
        (["train", "--model", "mlp", "--steps", "0"], 2, "steps"),
        (["train", "--model", "mlp", "--numerics", "fast"], 2, "numerics"),
        (["train", "--model", "mlp", "--model-kwargs", "{bad"], 2, "not JSON"),
        (["train", "--model", "mlp", "--device", "cuda:7"], 2, "cuda"),
        (["train", "--model", "mlp", "--resume", "--out", "/nonexistent/pol/x"], 1, "nothing to resume"),
        (["train", "--spec", "/nonexistent/job.toml"], 2, "cannot read"),
        (["frobnicate"], 2, "No such command"),
    ],
)
def test_bad_flags_give_helpful_messages(args, code, message):
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert message in result.output


def test_help_teaches():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--every" in result.stdout and "Examples" in result.stdout
    assert runner.invoke(app, ["--help"]).exit_code == 0


def test_debug_shows_the_traceback():
    result = runner.invoke(app, ["--debug", "train", "--model", "nope"])
    assert result.exit_code != 0 and result.exception is not None


def test_game_simulate_and_ledger_show(tmp_path):
    result = runner.invoke(app, ["game", "simulate", "--tasks", "200", "--json", "--plot", str(tmp_path / "sim.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_tasks"] == 200 and (tmp_path / "sim.png").stat().st_size > 0
    assert {s["strategy"] for s in report["strategies"]} >= {"solver honest", "verifier lazy"}
    assert runner.invoke(app, ["game", "simulate", "--tasks", "10", "--lazy", "1.5"]).exit_code == 2

    from games.ledger import mint, open_account, transfer
    from games.ledger_sqlite import SqliteLedger

    path = tmp_path / "ledger.sqlite"
    with SqliteLedger(path) as ledger:
        open_account(ledger, "op-1", "alice")
        open_account(ledger, "op-2", "bob")
        mint(ledger, "op-3", "alice", 100)
        transfer(ledger, "op-4", "alice", "bob", 30)
    shown = runner.invoke(app, ["ledger", "show", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["accounts"]["alice"] == 70 and data["accounts"]["bob"] == 30 and data["total_supply"] == 100
    assert "alice" in runner.invoke(app, ["ledger", "show", str(path)]).stdout
    assert runner.invoke(app, ["ledger", "show", str(tmp_path / "none.sqlite")]).exit_code == 2


@pytest.mark.slow
def test_game_run_then_ledger_show(tmp_path):
    result = runner.invoke(app, ["game", "run", "--workdir", str(tmp_path / "m"), "--tasks", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (task,) = report["tasks"]
    assert task["winner"] == "solver-2" and task["cheated"] and task["outcome"] == "solver_wrong"
    shown = json.loads(runner.invoke(app, ["ledger", "show", str(tmp_path / "m" / "ledger.db"), "--json"]).stdout)
    assert shown["accounts"] == report["balances"] and shown["total_supply"] == report["total_supply"]
    assert runner.invoke(app, ["game", "run", "--workdir", str(tmp_path / "m2"), "--cheater", "nobody"]).exit_code == 2


def test_graph_and_dispute_commands(tmp_path):
    tiny = ["--model", "transformer", "--model-kwargs", '{"n_layer": 1, "n_embd": 16, "block_size": 8}',
            "--data-kwargs", '{"length": 2048, "block_size": 8}', "--steps", "8", "--every", "4", "--batch-size", "4", "--quiet"]
    assert runner.invoke(app, ["train", *tiny, "--out", str(tmp_path / "b")]).exit_code == 0
    g = runner.invoke(app, ["graph", str(tmp_path / "b"), "--step", "2", "--out", str(tmp_path / "g.json"), "--json"])
    assert g.exit_code == 0, g.output
    summary = json.loads(g.stdout)
    assert summary["nodes"] > 10 and (tmp_path / "g.json").exists() and (tmp_path / "g.graphml").exists()
    honest_root = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "b"), "--json"]).stdout)["root"]
    ops = [n["op"] for n in json.loads((tmp_path / "g.json").read_text())["nodes"]]
    for node in [i for i, op in enumerate(ops) if "mm" in op]:  # the first product whose corruption reaches the state
        bad = runner.invoke(app, ["train", *tiny, "--out", str(tmp_path / "f"), "--fault", f"5:{node}", "--force", "--json"])
        assert bad.exit_code == 0, bad.output
        if json.loads(bad.stdout)["root"] != honest_root:
            break
    d = runner.invoke(app, ["dispute", str(tmp_path / "f"), "--segment", "2", "--fault-step", "5", "--fault-node", str(node),
                            "--transcript", str(tmp_path / "t.json"), "--json"])
    assert d.exit_code == 1, d.output  # the solver loses
    result = json.loads(d.stdout)
    assert result["step"] == 5 and result["node"] == node and result["referee"]["executed"] == 1
    ok = runner.invoke(app, ["dispute", "--check", str(tmp_path / "t.json")])
    assert ok.exit_code == 0 and "transcript ok" in ok.stdout
    edited = json.loads((tmp_path / "t.json").read_text())
    edited["outcome"]["loser"] = "challenger"
    (tmp_path / "t2.json").write_text(json.dumps(edited))
    assert runner.invoke(app, ["dispute", "--check", str(tmp_path / "t2.json")]).exit_code == 1
    honest = runner.invoke(app, ["dispute", str(tmp_path / "b"), "--segment", "1", "--challenger", "disagree"])
    assert honest.exit_code == 0 and "challenger loses" in honest.stdout
    assert runner.invoke(app, ["dispute"]).exit_code == 2
    assert runner.invoke(app, ["train", *tiny, "--out", str(tmp_path / "x"), "--fault", "nope"]).exit_code == 2


def test_exact_training_reports_whether_the_compiled_kernels_ran(tmp_path):
    out = tmp_path / "exact"
    result = runner.invoke(app, ["train", *TINY, "--numerics", "exact", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["exact_kernels"] == "compiled kernels loaded"
    human = runner.invoke(app, ["train", *TINY, "--numerics", "exact", "--out", str(out), "--force"])
    assert "exact math  compiled kernels loaded" in human.output
    native = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "native"), "--json"])
    assert "exact_kernels" not in json.loads(native.output)


def test_export_writes_a_plain_state_dict(honest_bundles, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pol.bundle import open_bundle
    from pol.models import build_model

    out = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["export", str(honest_bundles["transformer"]), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    weights = load_file(str(out))
    with open_bundle(honest_bundles["transformer"]) as b:
        model = build_model(b.spec.model)
        state = b.load_state(b.spec.steps)
        job = b.manifest.job_id
    model.load_state_dict(weights)  # strict: exactly the model's own names
    assert all(torch.equal(t, state[f"param/{n}"] if f"param/{n}" in state else state[f"buffer/{n}"]) for n, t in weights.items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["pol_job_id"] == job and f.metadata()["pol_step"] == "12"
    assert runner.invoke(app, ["export", str(honest_bundles["transformer"]), "--out", str(out)]).exit_code == 2  # exists
    bad = runner.invoke(app, ["export", str(honest_bundles["transformer"]), "--out", str(tmp_path / "x.safetensors"), "--step", "5"])
    assert bad.exit_code == 2 and "not a checkpoint" in bad.stderr
    step4 = runner.invoke(app, ["export", str(honest_bundles["transformer"]), "--out", str(tmp_path / "s4.safetensors"), "--step", "4"])
    assert step4.exit_code == 0
