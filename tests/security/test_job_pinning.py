"""The job is pinned: a client gets the job id of the spec it posts without training, and a verifier asked for that
job rejects an honest proof of any other job (fewer steps, another seed), through the API, the CLI and the market."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import games.market as market
from cli import app
from pol.components import CodePolicy
from pol.engine import resolve_job
from pol.errors import SpecError
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import verify

from ..conftest import TINY_KWARGS, tiny_spec

runner = CliRunner()
FLAGS = ["--model", "mlp", "--model-kwargs", '{"hidden": 32}', "--data", "synthetic", "--data-kwargs", '{"n": 512}',
         "--batch-size", "16", "--every", "4"]


def _job_id(**fields):
    return resolve_job(tiny_spec("mlp", **fields), code=CodePolicy()).job_id


def test_pol_job_prints_the_id_that_training_proves(tmp_path):
    job = runner.invoke(app, ["job", *FLAGS, "--steps", "12", "--json"])
    assert job.exit_code == 0, job.output
    posted = json.loads(job.stdout)
    trained = runner.invoke(app, ["train", *FLAGS, "--steps", "12", "--out", str(tmp_path / "b"), "--json", "--quiet"])
    assert json.loads(trained.stdout)["job_id"] == posted["job_id"] == _job_id()
    import rfc8785

    from pol.canonical import compute_hash

    assert posted["canonical"] == rfc8785.dumps(posted["spec"]).decode()  # RFC 8785 (JCS): any JCS library agrees
    assert compute_hash("pol/job/v1", posted["canonical"].encode()).hex() == posted["job_id"]
    human = runner.invoke(app, ["job", *FLAGS, "--steps", "12"])
    assert human.exit_code == 0 and posted["job_id"] in human.stdout


@pytest.mark.parametrize("change", [{"steps": 8}, {"seed": 3}, {"optimizer": {"name": "adamw", "lr": 1e-6}}])
def test_an_honest_proof_of_another_job_is_rejected(honest_bundles, tmp_path, change):
    asked = _job_id()  # the client posted the honest bundle's job: steps 12, seed 0
    other = train_and_prove(tiny_spec("mlp", **change), tmp_path / "other").path
    assert verify(other, samples=1, seed=0).accepted  # honest work...
    report = verify(other, samples=1, seed=0, expected_job=asked)  # ...of the wrong job
    assert report.verdict == "reject" and report.reason.startswith(f"wrong job: asked for {asked}, the bundle proves")
    assert report.steps_replayed == 0
    assert verify(honest_bundles["mlp"], samples=1, seed=0, expected_job=asked).accepted
    cli = runner.invoke(app, ["verify", str(other), "--job-id", asked, "--quiet"])
    assert cli.exit_code == 1 and "wrong job" in cli.stdout
    spec_file = tmp_path / "posted.json"  # the spec the client posted, unresolved: the verifier resolves it
    spec_file.write_text(json.dumps({**TINY_KWARGS["mlp"], "steps": 12, "every": 4, "batch_size": 16}))
    assert runner.invoke(app, ["verify", str(other), "--spec", str(spec_file), "--quiet"]).exit_code == 1
    assert runner.invoke(app, ["verify", str(honest_bundles["mlp"]), "--spec", str(spec_file), "--quiet"]).exit_code == 0


def test_pol_job_json_output_is_a_spec_file_for_verify(honest_bundles, tmp_path):
    posted = tmp_path / "job.json"
    posted.write_text(runner.invoke(app, ["job", *FLAGS, "--steps", "12", "--json"]).stdout)
    assert runner.invoke(app, ["verify", str(honest_bundles["mlp"]), "--spec", str(posted), "--quiet"]).exit_code == 0


def test_jobs_that_prove_nothing_are_refused(tmp_path):
    with pytest.raises(SpecError, match="zero learning rate"):
        spec_from_dict({"model": "mlp", "optimizer": {"name": "sgd", "lr": 0.0}})
    with pytest.raises(SpecError, match="steps"):
        spec_from_dict({"model": "mlp", "steps": 0})
    result = runner.invoke(app, ["train", *FLAGS, "--steps", "4", "--lr", "0", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "zero learning rate" in result.stderr and not (tmp_path / "b").exists()


def test_malformed_job_ids_are_usage_errors(honest_bundles):
    job = _job_id()
    for bad in (job + "\n", job.upper(), job[:-1], " " + job):
        result = runner.invoke(app, ["verify", str(honest_bundles["mlp"]), "--job-id", bad, "--quiet"])
        assert result.exit_code == 2 and "64 lowercase hex" in result.stderr, repr(bad)


def test_the_market_rejects_a_bundle_of_another_job(tmp_path, monkeypatch):
    spec = spec_from_dict({"model": {"name": "mlp", "kwargs": {"hidden": 16}}, "data": {"name": "synthetic", "kwargs": {"n": 256}},
                           "steps": 16, "every": 4, "batch_size": 8})
    params = dataclasses.replace(market.get_market_params(spec), forced_error_bps=0)
    asked = resolve_job(spec.replace(steps=32), code=CodePolicy()).job_id  # the client posted 32 steps
    monkeypatch.setattr(market, "_job_id", lambda s: asked)  # ... but every solver trains (and proves) 16
    report = market.run_market(tmp_path, spec=spec, params=params, n_tasks=1, cheaters=())
    (task,) = report.tasks
    assert all(v.verdict == "reject" and "wrong job" in v.reason for v in task.verifications if v.verdict != "unchecked")
    assert task.outcome != "accepted" and task.disputes and all(d.ruling == "solver_wrong" for d in task.disputes)
    assert "wrong job" in task.disputes[0].description


def test_posted_job_ids_are_digests():
    from games.errors import BadMove
    from games.ledger import mint, open_account
    from games.ledger_memory import MemoryLedger
    from games.task import GameParams, Post, apply_post

    ledger = MemoryLedger(b"seed")
    open_account(ledger, "o", "submitter")
    mint(ledger, "m", "submitter", 10**12)
    with pytest.raises(BadMove, match="post.job_id"):
        apply_post(ledger, GameParams(), Post("t", 0, "submitter", 1000, job_id="ab" * 32 + "\n"))
    assert ledger.get_escrows() == {}
    assert apply_post(ledger, GameParams(), Post("t", 0, "submitter", 1000, job_id="ab" * 32)).job_id == "ab" * 32


def test_verify_report_says_which_job_it_pinned(honest_bundles):
    job = _job_id()
    report = verify(honest_bundles["mlp"], samples=1, seed=0, expected_job=job)
    assert report.expected_job == job == report.job_id
    assert "the job you asked for" in runner.invoke(app, ["verify", str(honest_bundles["mlp"]), "--job-id", job, "--seed", "0", "--samples", "1"]).stdout
    unpinned = runner.invoke(app, ["verify", str(honest_bundles["mlp"]), "--seed", "0", "--samples", "1"])
    assert "not pinned" in unpinned.stdout


def test_the_markets_verifiers_import_only_allowed_code(tmp_path):
    from pol.errors import CodeNotAllowed

    spec = spec_from_dict({"model": "tests.userpkg:make_model", "data": "tests.userpkg:make_data", "loss": "mse",
                           "steps": 8, "every": 4, "batch_size": 8})
    params = dataclasses.replace(market.get_market_params(spec), forced_error_bps=0)
    with pytest.raises(CodeNotAllowed, match="tests.userpkg"):  # the verifiers never allowed the job's code
        market.run_market(tmp_path / "a", spec=spec, params=params, n_tasks=1, cheaters=())
    report = market.run_market(tmp_path / "b", spec=spec, params=params, n_tasks=1, cheaters=(), allow_code=("tests",))
    assert report.tasks[0].outcome == "accepted"
