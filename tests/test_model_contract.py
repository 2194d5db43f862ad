"""The model contract: batches are dicts of named tensors, the model is called with its inputs as keyword
arguments (a lone `x` positionally), and the loss reads the output the spec names: the tensor itself, `.logits`,
`["logits"]`, a tuple's first element, or an explicit key, attribute or index."""

from __future__ import annotations

import pytest
import torch

from pol.components import CodePolicy
from pol.engine import select_output
from pol.errors import DataError, UserCodeError
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import verify

TOKENS = {"model": "tests.userpkg:masked_tokens", "data": "tests.userpkg:token_data", "target": "labels",
          "steps": 6, "every": 3, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01}}
ALLOW = CodePolicy.allowing(["tests"])


@pytest.mark.parametrize("returns, output", [("object", ""), ("dict", ""), ("tuple", "1"), ("dict", "logits"), ("tensor", "")])
def test_keyword_inputs_and_every_output_form_train_and_verify(tmp_path, returns, output):
    spec = spec_from_dict({**TOKENS, "model": {"name": TOKENS["model"], "kwargs": {"returns": returns}}, "output": output})
    result = train_and_prove(spec, tmp_path / "b")
    assert result.manifest.records[-1].loss is not None
    report = verify(result.path, segments=[1, 2], seed=0, code=ALLOW, expected_job=result.manifest.job_id)
    assert report.accepted, report.reason


def test_the_spec_can_name_its_inputs(tmp_path):
    spec = spec_from_dict({**TOKENS, "inputs": ["input_ids", "attention_mask"]})
    assert verify(train_and_prove(spec, tmp_path / "b").path, samples=1, seed=0, code=ALLOW).accepted


def test_a_target_the_data_lacks_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="labelz"):
        train_and_prove(spec_from_dict({**TOKENS, "target": "labelz"}), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_an_output_the_model_lacks_is_one_line(tmp_path):
    spec = spec_from_dict({**TOKENS, "model": {"name": TOKENS["model"], "kwargs": {"returns": "tuple"}}, "output": "logits"})
    with pytest.raises(UserCodeError, match="no output 'logits' that is a tensor"):
        train_and_prove(spec, tmp_path / "b")


def test_select_output():
    t = torch.ones(2)
    assert select_output(t, "") is t
    assert select_output({"logits": t, "loss": t + 1}, "") is t and torch.equal(select_output({"loss": t + 1}, "loss"), t + 1)
    assert select_output((t + 1, t), "1") is t and torch.equal(select_output((t + 1, t), ""), t + 1)
    for bad, which in (({"other": t}, ""), ((), ""), ((t,), "3"), ("text", ""), (t, "logits")):
        with pytest.raises(ValueError):
            select_output(bad, which)
