"""The README's "Your own model and data" example, run as written: a transformers model from a config (user code,
`module:callable`) on scikit-learn's digits as a `dir:` of safetensors files, through `pol train` and
`pol verify --allow-code` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from typer.testing import CliRunner

from cli import app

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()

MODEL = '''\
from transformers import ViTConfig, ViTForImageClassification


def make_vit(hidden_size: int = 32):
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, num_hidden_layers=1, hidden_size=hidden_size,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config)  # its own initialisation, drawn from pol.rng
'''

DATA = '''\
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

digits = load_digits()  # 1797 8x8 images, values 0..16, shipped with scikit-learn
pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8)
labels = torch.tensor(digits.target, dtype=torch.int64)  # (N,)
save_file({"pixel_values": pixels[:1024], "labels": labels[:1024]}, "digits/part-0.safetensors")
save_file({"pixel_values": pixels[1024:], "labels": labels[1024:]}, "digits/part-1.safetensors")
'''

SPEC = '''\
model = { name = "digitsjob.model:make_vit", kwargs = { hidden_size = 32 } }
data = "dir:digits"
target = "labels"
batch_size = 32
steps = 6
every = 2
optimizer = { name = "adamw", lr = 1e-3 }
'''


def test_the_readme_shows_this_example():
    for text in (MODEL, DATA, SPEC):
        assert text in README, text.splitlines()[0]


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_a_transformers_model_on_sklearn_digits_trains_and_verifies(tmp_path, monkeypatch, numerics):
    (tmp_path / "digitsjob").mkdir()
    (tmp_path / "digitsjob" / "__init__.py").write_text("")
    (tmp_path / "digitsjob" / "model.py").write_text(MODEL)
    (tmp_path / "digits").mkdir()
    (tmp_path / "job.toml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    exec(compile(DATA, "make_digits.py", "exec"), {})
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=. does
    runner = CliRunner()
    done = runner.invoke(app, ["train", "--spec", "job.toml", "--numerics", numerics, "--out", "run"])
    assert done.exit_code == 0, done.output
    job = runner.invoke(app, ["job", "--spec", "job.toml", "--numerics", numerics, "--id"])
    assert job.exit_code == 0, job.output
    spec = json.loads(runner.invoke(app, ["job", "--spec", "job.toml", "--numerics", numerics, "--json"]).output)["spec"]
    import transformers

    assert spec["versions"]["transformers"] == transformers.__version__  # the package imports it: pinned
    refused = runner.invoke(app, ["verify", "run", "--job-id", job.output.strip(), "--data-dir", "digits"])
    assert refused.exit_code == 2 and "not allowed" in refused.output
    no_data = runner.invoke(app, ["verify", "run", "--job-id", job.output.strip(), "--allow-code", "digitsjob"])
    assert no_data.exit_code == 2 and "--data-dir" in no_data.output
    done = runner.invoke(app, ["verify", "run", "--job-id", job.output.strip(), "--data-dir", "digits", "--allow-code", "digitsjob",
                               "--samples", "3", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["verdict"] == "accept"
