"""Choosing the checkpoint interval k against the protocol tax (pol.every, `--every auto`)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from cli import app
from games.cost import CostModel, best_every
from pol.every import compute_escape_probability, least_tax_every, measured_every, modelled_tax
from pol.verify import compute_required_samples

from .conftest import tiny_spec

runner = CliRunner()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 19, 20, 64, 100, 333, 1000, 5000])
@pytest.mark.parametrize("confidence, fraction", [(0.999, 0.1), (0.99, 0.05), (0.9, 0.5)])
def test_required_samples_is_the_least_sample_the_escape_bound_allows(n, confidence, fraction):
    """The one-pass search against its definition: the smallest s whose escape probability is small enough."""
    s = compute_required_samples(n, confidence, fraction)
    assert s == next((k for k in range(1, n + 1) if compute_escape_probability(n, k, fraction) <= 1 - confidence), n)
    assert s == 1 or compute_escape_probability(n, s - 1, fraction) > 1 - confidence


@pytest.mark.parametrize("steps, c", [(200, 0.1), (1000, 1.0), (3000, 0.3), (777, 5.0)])
def test_least_tax_every_is_the_argmin(steps, c):
    k = least_tax_every(steps, c)
    brute = min(range(1, steps + 1), key=lambda j: (modelled_tax(steps, j, c), -j))
    assert modelled_tax(steps, k, c) == modelled_tax(steps, brute, c)


def test_the_least_tax_k_grows_like_the_square_root_of_the_run():
    ks = {n: least_tax_every(n, 1.0) for n in (10_000, 40_000, 160_000)}
    assert ks[10_000] < ks[40_000] < ks[160_000]
    for n, k in ks.items():  # near sqrt(N c / s), s about 66 once n is large
        assert 0.5 <= k / math.sqrt(n * 1.0 / 66) <= 2.0, (n, k)
    assert modelled_tax(160_000, ks[160_000], 1.0) < 0.10  # long runs: under the 10%


def test_the_model_agrees_with_the_markets_cost_model():
    """games.cost spells the same model out in seconds and bytes (one shared committee sample, exact numerics)."""
    for steps, c in ((10_000, 1.0), (2_000, 0.2)):
        model = CostModel(step_seconds=1.0, state_bytes=10**6, write_bytes_per_s=2e6 / c, hash_bytes_per_s=2e6 / c,
                          read_bytes_per_s=2e6 / c, steps=steps, numerics="exact", shared=True)
        ours, theirs = least_tax_every(steps, c), best_every(model)
        assert abs(modelled_tax(steps, ours, c) - modelled_tax(steps, theirs, c)) <= 0.01 * modelled_tax(steps, ours, c)


def test_measured_every_measures_this_job():
    m = measured_every(tiny_spec("mlp", steps=400))
    assert m.step_seconds > 0 and m.checkpoint_seconds > 0
    assert m.checkpoint_steps == pytest.approx(m.checkpoint_seconds / m.step_seconds)
    assert m.every == least_tax_every(400, m.checkpoint_steps) and m.tax <= m.tax_at_default


def test_pol_job_every_auto(tmp_path):
    result = runner.invoke(app, ["job", "--model", "mlp", "--steps", "300", "--every", "auto", "--json"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout)["spec"]
    assert 1 <= spec["every"] <= 300
    for bad in ("0", "-3", "often"):
        refused = runner.invoke(app, ["job", "--model", "mlp", "--every", bad])
        assert refused.exit_code == 2 and "--every" in refused.output
    refused = runner.invoke(app, ["train", "--model", "mlp", "--every", "auto", "--nproc", "2", "--out", str(tmp_path / "b")])
    assert refused.exit_code == 2 and "pol job --every auto" in refused.output
    assert not (tmp_path / "b").exists()


def test_every_auto_does_not_resume(tmp_path):
    refused = runner.invoke(app, ["train", "--model", "mlp", "--every", "auto", "--resume", "--out", str(tmp_path / "b")])
    assert refused.exit_code == 2 and "--every K" in refused.output
