"""Certified evaluation (pol.evaluate): committed at every checkpoint, recomputed by the verifier, forged metrics
rejected, data and code it cannot judge said so (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from cli import app
from pol.bundle import open_bundle, write_bundle
from pol.components import CodePolicy
from pol.data import build_dataset
from pol.engine import build_runtime, restore_state
from pol.errors import ManifestError
from pol.evaluate import EvalDataDiffers, Evaluator, build_eval_dataset, evaluate
from pol.prove import train_and_prove
from pol.spec import JobSpec, spec_from_dict
from pol.trace import record_from_dict
from pol.verify import verify

runner = CliRunner()
EVAL = {"data": {"name": "synthetic", "kwargs": {"seed": 1, "n": 300}}, "metrics": ["loss", "accuracy"], "batch_size": 128}


def eval_spec(numerics: str = "native", **fields: Any) -> JobSpec:
    return spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 32}}, "data": {"name": "synthetic", "kwargs": {"n": 512}},
                           "steps": 12, "every": 4, "batch_size": 16, "numerics": numerics, "evaluation": EVAL, **fields})


def top2(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A user metric: top-2 accuracy as (hits, rows)."""
    hits = (output.topk(2, dim=-1).indices == batch["y"].unsqueeze(-1)).any(-1)
    return hits.sum(), int(hits.numel())


def make_bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    return {n: train_and_prove(eval_spec(n), root / n).path for n in ("native", "exact")}


def _forge_metric(src: Path, dst: Path, step: int, metric: str, delta: float) -> Path:
    """A consistent bundle (digests, root, commitment recomputed) claiming a better metric at `step`."""
    with open_bundle(src) as b:
        spec, records = b.spec, list(b.records)
        states = {r.step: b.load_state(r.step) for r in records}
    evals = {r.step: dict(r.eval or {}) for r in records}
    evals[step][metric] += delta
    write_bundle(dst, spec, ((r.step, states[r.step], r.data, r.loss, evals[r.step]) for r in records), {"forged": "yes"})
    return dst


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_honest_evaluation_is_certified(bundles: dict[str, Path], numerics: str) -> None:
    report = verify(bundles[numerics], samples=1, seed=3)
    assert report.verdict == "accept", report.reason
    ev = report.evaluation
    assert ev is not None and ev.final_checked and ev.ok and ev.final_step == 12
    assert 0 in ev.checked_steps and 12 in ev.checked_steps  # step 0 and the final checkpoint, always
    with open_bundle(bundles[numerics]) as b:
        committed = dict(b.records[-1].eval or {})
        assert all(r.eval is not None and set(r.eval) == {"loss", "accuracy"} for r in b.records)
    assert report.certified_metrics == committed
    if numerics == "exact":  # bit for bit
        assert ev.final_recomputed == committed
    assert "certified" not in report.reason and "evaluation matched" in report.reason
    body = report.to_dict()
    assert body["certified_metrics"] == committed and body["evaluation"]["final_checked"]


def test_certified_metric_is_a_plain_re_evaluation_of_the_final_model(bundles: dict[str, Path]) -> None:
    with open_bundle(bundles["native"]) as b:
        spec, state_dict, committed = b.spec, b.model_state_dict(12), dict(b.records[-1].eval or {})
    model = build_runtime(spec).model
    model.load_state_dict(state_dict)
    model.eval()
    data = build_dataset("synthetic", {"seed": 1, "n": 300})
    loss_sum, hits, rows = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, 300, 128):
            x, y = data.tensors["x"][start:start + 128], data.tensors["y"][start:start + 128]
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y)) * len(y)
            hits += int((out.argmax(-1) == y).sum())
            rows += len(y)
    assert committed["accuracy"] == hits / rows
    assert committed["loss"] == pytest.approx(loss_sum / rows, rel=1e-6)
    assert verify(bundles["native"], samples=1, seed=0).certified_metrics == committed


def test_exact_evaluation_is_the_same_bits_at_1_and_2_threads(bundles: dict[str, Path]) -> None:
    with open_bundle(bundles["exact"]) as b:
        spec, state, committed = b.spec, b.load_state(12), dict(b.records[-1].eval or {})
    rt = build_runtime(spec)
    restore_state(rt, state)
    evaluator = Evaluator(spec, build_eval_dataset(spec), loss_fn=rt.loss_fn)
    before = torch.get_num_threads()
    try:
        values = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            values.append(evaluator(rt.model, step=12))
    finally:
        torch.set_num_threads(before)
    assert values[0] == values[1] == committed
    assert [v.hex() for v in values[0].values()] == [v.hex() for v in values[1].values()]


@pytest.mark.parametrize("numerics", ["native", "exact"])
def test_a_forged_final_metric_is_rejected(bundles: dict[str, Path], tmp_path: Path, numerics: str) -> None:
    forged = _forge_metric(bundles[numerics], tmp_path / "forged", 12, "accuracy", 0.05)
    report = verify(forged, samples=1, seed=3)  # whatever the sample: the final checkpoint is always evaluated
    assert report.verdict == "reject" and report.certified_metrics is None
    assert "evaluation" in report.reason and "'accuracy'" in report.reason and "step 12" in report.reason
    result = runner.invoke(app, ["verify", str(forged), "--seed", "3", "--samples", "1"])
    assert result.exit_code == 1 and "REJECT" in result.stdout and "not certified" in result.stdout


def test_a_forged_intermediate_metric_is_rejected_when_touched(bundles: dict[str, Path], tmp_path: Path) -> None:
    forged = _forge_metric(bundles["exact"], tmp_path / "forged", 4, "loss", -1e-6)  # a tiny improvement
    report = verify(forged, segments=[2])  # segment 2 starts at step 4
    assert report.verdict == "reject" and "step 4" in report.reason and "'loss'" in report.reason
    assert verify(forged, segments=[3]).verdict == "accept"  # untouched: only a sample finds it (like a segment)
    from games.market import replay_dispute

    assert replay_dispute(forged, 1).ruling == "solver_wrong"  # the market's referee recomputes it


def test_native_tolerance_is_tight(bundles: dict[str, Path], tmp_path: Path) -> None:
    forged = _forge_metric(bundles["native"], tmp_path / "forged", 12, "loss", -1e-3)
    assert verify(forged, samples=1, seed=3).verdict == "reject"


def test_records_are_parsed_strictly(bundles: dict[str, Path], tmp_path: Path) -> None:
    good = {"step": 4, "state": "a" * 64, "data": "b" * 64, "loss": 1.0, "update": 0.5}
    assert record_from_dict(good, "r").eval is None
    assert record_from_dict({**good, "eval": {"loss": 2}}, "r").eval == {"loss": 2.0}
    for bad in ({}, {"loss": float("inf")}, {"loss": True}, {"loss": "1"}, [1.0], {f"m{i}": 1.0 for i in range(9)}):
        with pytest.raises(ManifestError):
            record_from_dict({**good, "eval": bad}, "r")
    copy = tmp_path / "b"
    shutil.copytree(bundles["native"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["records"][1]["eval"] = {"loss": 1.0}  # a metric missing (and the commitment broken: parsed first)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="spec's metrics"):
        open_bundle(copy)
    report = verify(copy, samples=1, seed=0)
    assert report.verdict == "reject" and "bundle integrity" in report.reason


def test_a_spec_without_evaluation_is_as_before(tmp_path: Path) -> None:
    spec = spec_from_dict({**eval_spec().to_dict(), "evaluation": None})
    path = train_and_prove(spec, tmp_path / "b").path
    manifest = json.loads((path / "manifest.json").read_text())
    assert all("eval" not in r for r in manifest["records"])  # byte-compatible with bundles before evaluation
    report = verify(path, samples=1, seed=0)
    assert report.accepted and report.evaluation is None and report.certified_metrics is None
    result = runner.invoke(app, ["verify", str(path), "--seed", "0", "--samples", "1"])
    assert result.exit_code == 0 and "certified" not in result.stdout


def test_dir_evaluation_data_needs_the_verifiers_copy(tmp_path: Path) -> None:
    data = build_dataset("synthetic", {"seed": 1, "n": 200})
    held = tmp_path / "held"
    held.mkdir()
    np.save(held / "x.npy", data.tensors["x"].numpy())
    np.save(held / "y.npy", data.tensors["y"].numpy())
    spec = eval_spec(evaluation={**EVAL, "data": f"dir:{held}"})
    path = train_and_prove(spec, tmp_path / "b").path
    result = runner.invoke(app, ["verify", str(path), "--seed", "0", "--samples", "1"])
    assert result.exit_code == 2 and "--eval-data-dir" in result.stderr
    other = tmp_path / "other"
    other.mkdir()
    y = data.tensors["y"].numpy().copy()
    y[0] = (y[0] + 1) % 10  # one label changed
    np.save(other / "x.npy", data.tensors["x"].numpy())
    np.save(other / "y.npy", y)
    result = runner.invoke(app, ["verify", str(path), "--seed", "0", "--samples", "1", "--eval-data-dir", str(other)])
    assert result.exit_code == 2 and "evaluation data differs" in result.stderr and "REJECT" not in result.stdout
    with pytest.raises(EvalDataDiffers):
        verify(path, samples=1, seed=0, eval_data_dir=str(other))
    result = runner.invoke(app, ["verify", str(path), "--seed", "0", "--samples", "1", "--eval-data-dir", str(held)])
    assert result.exit_code == 0 and "certified" in result.stdout
    posted = tmp_path / "job.json"  # the verifier's own spec file: its dir: paths are the verifier's data
    posted.write_text(json.dumps({k: v for k, v in spec.to_dict().items() if v is not None and k not in ("versions",)}))
    result = runner.invoke(app, ["verify", str(path), "--seed", "0", "--samples", "1", "--spec", str(posted)])
    assert result.exit_code == 0 and "(the job you asked for)" in result.stdout, result.stdout + result.stderr


def test_a_user_metric_is_pinned_and_needs_allowing(tmp_path: Path) -> None:
    spec = eval_spec(evaluation={**EVAL, "metrics": ["accuracy", "tests.test_evaluation:top2"]})
    path = train_and_prove(spec, tmp_path / "b").path
    with open_bundle(path) as b:
        assert b.spec.evaluation is not None and b.spec.evaluation.metrics[1].code is not None  # pinned
        final = dict(b.records[-1].eval or {})
    assert final["accuracy"] <= final["tests.test_evaluation:top2"] <= 1.0
    result = runner.invoke(app, ["verify", str(path), "--seed", "0", "--samples", "1"])
    assert result.exit_code == 2 and "not allowed" in result.stderr
    result = runner.invoke(app, ["verify", str(path), "--seed", "0", "--samples", "1", "--allow-code", "tests", "--json"])
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["certified_metrics"] == final


def test_evaluation_leaves_the_model_as_it_was() -> None:
    spec = spec_from_dict({"model": "tests.test_evaluation:make_bn_model", "data": {"name": "synthetic", "kwargs": {"n": 64}},
                           "evaluation": {**EVAL, "metrics": ["loss", "accuracy"], "batch_size": 50}})
    torch.manual_seed(0)
    model = make_bn_model()
    model.train()
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    data = build_dataset("synthetic", {"seed": 1, "n": 120})
    values = evaluate(model, spec, data, code=CodePolicy.trust_all_code())
    assert set(values) == {"loss", "accuracy"} and model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # batch-norm statistics unchanged
    again = evaluate(model, spec, data, code=CodePolicy.trust_all_code())
    assert again == values
    assert all(p.grad is None for p in model.parameters())


def test_train_prints_the_final_metrics(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.toml"
    spec_file.write_text('model = { name = "mlp", kwargs = { hidden = 16 } }\n'
                         'data = { name = "synthetic", kwargs = { n = 256 } }\nsteps = 4\nevery = 2\nbatch_size = 8\n'
                         'evaluation = { data = { name = "synthetic", kwargs = { seed = 1, n = 100 } }, '
                         'metrics = ["loss", "accuracy"], batch_size = 64 }\n')
    result = runner.invoke(app, ["train", "--spec", str(spec_file), "--out", str(tmp_path / "b"), "--quiet"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "final eval  loss" in result.stdout and "accuracy" in result.stdout
    result = runner.invoke(app, ["train", "--spec", str(spec_file), "--out", str(tmp_path / "c"), "--json"])
    body = json.loads(result.stdout)
    assert set(body["final_eval"]) == {"loss", "accuracy"}
    result = runner.invoke(app, ["inspect", str(tmp_path / "c")])
    assert result.exit_code == 0 and "claimed eval" in result.stdout


class Noisy(nn.Module):
    """Draws random numbers even in eval mode (rare): pol serves them, keyed by (seed, "eval", step)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 0.5 * torch.randn(x.shape[0], 10)


def make_noisy_model() -> nn.Module:
    return Noisy()


def test_a_model_that_draws_in_eval_mode_is_served_by_pol() -> None:
    spec = spec_from_dict({"model": "tests.test_evaluation:make_noisy_model", "data": {"name": "synthetic", "kwargs": {"n": 64}},
                           "evaluation": EVAL})
    model = make_noisy_model()
    data = build_dataset("synthetic", {"seed": 1, "n": 120})
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # torch's own generator does not matter
        values.append(evaluate(model, spec, data, step=4, code=CodePolicy.trust_all_code()))
    assert values[0] == values[1]
    assert evaluate(model, spec, data, step=8, code=CodePolicy.trust_all_code()) != values[0]  # keyed by step
