import json

import pytest

from pol.errors import SpecError
from pol.spec import JobSpec, load_spec_file, spec_from_dict

from .conftest import tiny_spec


def test_job_id_is_stable_and_depends_on_every_field():
    a = tiny_spec("mlp").replace(data_digest="ab" * 32)
    assert a.job_id == a.replace().job_id
    for change in ({"seed": 1}, {"steps": 13}, {"every": 3}, {"batch_size": 8}, {"numerics": "exact"}, {"loss": "mse"}):
        assert a.replace(**change).job_id != a.job_id, change


def test_dict_order_does_not_change_the_spec():
    fields = {"model": {"name": "mlp", "kwargs": {"hidden": 8, "depth": 1}}, "steps": 5, "every": 5, "seed": 3}
    reordered = {"seed": 3, "every": 5, "steps": 5, "model": {"kwargs": {"depth": 1, "hidden": 8}, "name": "mlp"}}
    assert spec_from_dict(fields).canonical() == spec_from_dict(reordered).canonical()


def test_job_id_needs_a_data_digest():
    with pytest.raises(SpecError, match="no data digest"):
        _ = tiny_spec().job_id


def test_builtin_defaults_fill_data_and_optimizer():
    spec = spec_from_dict({"model": "transformer"})
    assert spec.data.name == "chars" and spec.optimizer.name == "adamw"
    assert spec_from_dict({"model": "cnn"}).optimizer.name == "sgd"


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"model": "nope"}, "unknown model"),
        ({"model": "pkg.mod:fn"}, "data"),
        ({"model": "mlp", "steps": 0}, "steps"),
        ({"model": "mlp", "steps": 10, "every": 11}, "every"),
        ({"model": "mlp", "batch_size": 10, "microbatch": 3}, "microbatch"),
        ({"model": "mlp", "numerics": "fast"}, "numerics"),
        ({"model": "mlp", "optimizer": {"name": "adamw", "lr": float("nan")}}, "lr"),
        ({"model": "mlp", "optimizer": {"name": "rmsprop"}}, "optimizer.name"),
        ({"model": "mlp", "optimizer": {"nesterov": True}}, "unknown keys"),
        ({"model": "mlp", "seed": -1}, "seed"),
        ({"model": "mlp", "seed": True}, "seed"),
        ({"model": "mlp", "colour": "red"}, "unknown spec fields"),
        ({"model": {"name": "mlp", "kwargs": {"x": float("inf")}}}, "kwargs"),
        ({"model": "mlp", "data_digest": "xyz"}, "data_digest"),
    ],
)
def test_bad_fields_name_the_problem(fields, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict(fields)


def test_bundle_specs_must_be_complete():
    with pytest.raises(SpecError, match="missing spec fields"):
        spec_from_dict({"model": "mlp"}, require_resolved=True)


def test_spec_files_toml_and_json(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text('model = "cnn"\nsteps = 30\nevery = 5\n[optimizer]\nname = "sgd"\nlr = 0.01\n')
    js = tmp_path / "job.json"
    js.write_text(json.dumps({"model": "cnn", "steps": 30, "every": 5, "optimizer": {"name": "sgd", "lr": 0.01}}))
    assert spec_from_dict(load_spec_file(toml)) == spec_from_dict(load_spec_file(js))
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "mlp", "steps": NaN}')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec_file(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec_file(tmp_path / "missing.toml")


def test_checkpoint_steps_end_at_the_last_step():
    assert spec_from_dict({"model": "mlp", "steps": 10, "every": 4}).checkpoint_steps == [0, 4, 8, 10]
    assert isinstance(tiny_spec(), JobSpec)
