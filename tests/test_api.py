"""The Python API for people with a loop (issue 14 item 8) and the README's loop-conversion example, run as
written: a plain PyTorch loop (AdamW, cosine schedule, clipping, EMA, an L1 penalty) as a pol job in a few changed
lines, trained, proven and verified; the same job as a spec file has the same job id."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pol
from cli import app
from pol.errors import SpecError

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

LOOP = '''\
import torch
from torch import nn

import pol


def make_net(width: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


def make_data(n: int = 512) -> dict[str, torch.Tensor]:
    x = ((torch.arange(n * 8) * 7919) % 97).to(torch.float32).reshape(n, 8) / 97 - 0.5
    return {"x": x, "y": x[:, :4].argmax(dim=1)}


@pol.step
def train_step(model, batch, ctx):
    # the loop body up to the loss; pol runs backward, clipping, the update, the schedule and the EMA
    l1 = sum(p.abs().sum() for p in model.parameters())
    return ctx.loss(model(batch["x"]), batch) + 1e-5 * l1


JOB = pol.job(
    model=make_net, data=make_data, step_fn=train_step, steps=40, every=10, batch_size=32,
    optimizer=pol.optimizer(torch.optim.AdamW, lr=3e-3, weight_decay=0.1, clip_grad_norm=1.0, ema=0.99,
                            scheduler=(torch.optim.lr_scheduler.CosineAnnealingLR, {"T_max": 40})),
)
'''

RUN = '''\
import pol
from looppkg.train import JOB

pol.train(JOB, "run")
print(pol.verify_bundle("run", allow_code=["looppkg"]).verdict)  # accept
'''

SPEC = '''\
model = "looppkg.train:make_net"
data = "looppkg.train:make_data"
step_fn = "looppkg.train:train_step"
steps = 40
every = 10
batch_size = 32

[optimizer]
name = "AdamW"
lr = 3e-3
kwargs = { weight_decay = 0.1 }
clip_grad_norm = 1.0
ema = 0.99
scheduler = { name = "CosineAnnealingLR", kwargs = { T_max = 40 } }
'''


def test_the_readme_shows_this_example():
    for text in (LOOP, RUN, SPEC):
        assert text in README, text.splitlines()[0]


@pytest.fixture
def looppkg(tmp_path, monkeypatch):
    (tmp_path / "looppkg").mkdir()
    (tmp_path / "looppkg" / "__init__.py").write_text("")
    (tmp_path / "looppkg" / "train.py").write_text(LOOP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "looppkg" or m.startswith("looppkg.")]:
        del sys.modules[name]


def test_a_plain_loop_as_a_pol_job_trains_verifies_and_is_the_spec_files_job(looppkg, capsys):
    exec(compile(RUN, "run.py", "exec"), {})
    assert capsys.readouterr().out.strip() == "accept"
    from looppkg.train import JOB

    from pol.bundle import open_bundle

    with open_bundle(looppkg / "run") as b:
        proven = b.spec
        assert any(n.startswith("optim/ema/") for n in b.load_state(10))
    (looppkg / "job.toml").write_text(SPEC)
    cli_id = CliRunner().invoke(app, ["job", "--spec", "job.toml", "--id"])
    assert cli_id.exit_code == 0, cli_id.output
    assert cli_id.output.strip() == proven.job_id  # the CLI and the spec express the same job
    assert JOB.optimizer.name == "AdamW" and JOB.step_fn.name == "looppkg.train:train_step"


def test_functions_a_verifier_cannot_import_are_refused_by_name():
    with pytest.raises(SpecError, match="top-level"):
        pol.job(model=lambda: None, data="synthetic")

    def local_model():  # a closure: no import path
        return None

    with pytest.raises(SpecError, match="top-level"):
        pol.step(local_model)
    main_fn = type(lambda: None)(compile("def f(): pass", "x", "exec").co_consts[0], {"__name__": "__main__"})
    main_fn.__module__, main_fn.__qualname__ = "__main__", "f"
    with pytest.raises(SpecError, match="__main__"):
        pol.job(model=main_fn, data="synthetic")


def test_the_public_api_is_importable_from_pol_and_typed():
    for name in pol.__all__:
        assert getattr(pol, name) is not None, name
    assert (Path(pol.__file__).parent / "py.typed").is_file()
    with pytest.raises(AttributeError):
        pol.no_such_thing  # noqa: B018


def test_version_and_env():
    runner = CliRunner()
    done = runner.invoke(app, ["--version"])
    assert done.exit_code == 0 and done.output.strip() == f"pol {pol.__version__}"
    env = runner.invoke(app, ["env", "--json"])
    import json

    info = json.loads(env.output)
    assert info["pol"] == pol.__version__ and info["cpu_capability"] and isinstance(info["exact_kernels"], bool)
    assert "torch" in info and "transformers" in info["libraries"]
