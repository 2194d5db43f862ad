"""The model zoo (pol.zoo): tiny transformers models (GPT-2, Llama, BERT with an attention mask, ViT, a batch-norm
ResNet) with their default dropout, SDPA attention and initialisation train and verify in both numerics; forgeries
are rejected with every segment replayed; exact digests are one under threads, kernels and instruction sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from pol.errors import VersionMismatch
from pol.prove import train_and_prove
from pol.spec import spec_from_dict
from pol.verify import check_versions, verify

from ..attacks.forge import forge, other_data_order, train_states, write_forged

REPO = Path(__file__).resolve().parents[2]
MODELS = ("gpt2", "llama", "bert", "vit", "resnet")
NUMERICS = ("native", "exact")
SMALL_DATA = {"gpt2": {"length": 4096}, "llama": {"length": 4096}, "bert": {"length": 4096, "padded": 1}, "vit": {"n": 64},
              "resnet": {"n": 64}}


def zoo_spec(model: str, numerics: str, steps: int = 4, every: int = 2):
    data = "pixels" if model in ("vit", "resnet") else "tokens"
    return spec_from_dict({"model": model, "data": {"name": data, "kwargs": SMALL_DATA[model]}, "steps": steps, "every": every,
                           "numerics": numerics})


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    made: dict[tuple[str, str], Path] = {}

    def get(model: str, numerics: str) -> Path:
        if (model, numerics) not in made:
            made[model, numerics] = train_and_prove(zoo_spec(model, numerics), tmp_path_factory.mktemp(f"{model}-{numerics}")).path
        return made[model, numerics]

    return get


def all_segments(path: Path) -> list[int]:
    return [1, 2]  # 4 steps every 2: two segments


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("model", MODELS)
def test_honest_bundles_are_accepted(honest, model, numerics):
    path = honest(model, numerics)
    report = verify(path, segments=all_segments(path), seed=0)
    assert report.verdict == "accept", report.reason
    import transformers

    spec = zoo_spec(model, numerics)
    from pol.bundle import open_bundle

    with open_bundle(path) as b:
        assert b.spec.versions["transformers"] == transformers.__version__
        assert b.spec.model == spec.model


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("model", MODELS)
def test_forgeries_are_rejected(honest, tmp_path, model, numerics):
    path = honest(model, numerics)
    from pol.bundle import open_bundle

    with open_bundle(path) as b:
        spec, data = b.spec, {r.step: r.data for r in b.records}

    def add_noise(spec, states):
        state = states[2]
        for name in [n for n in state if n.startswith("param/")]:
            state[name] = state[name] + 1e-3 * torch.ones_like(state[name])
        return spec, states

    tampered = forge(path, tmp_path / "tampered", add_noise)
    report = verify(tampered, segments=all_segments(tampered), seed=0)
    assert report.verdict == "reject" and {c.index for c in report.checks if not c.ok} == {1, 2}, report.reason

    with other_data_order():  # trained on another order, claiming the committed batches
        states, _, losses = train_states(spec)
    reordered = write_forged(tmp_path / "reordered", spec, states, data=data, losses=losses)
    report = verify(reordered, segments=all_segments(reordered), seed=0)
    assert report.verdict == "reject" and all(not c.ok for c in report.checks), report.reason


def test_a_bundle_of_another_transformers_version_cannot_be_verified(honest):
    from pol.bundle import open_bundle

    with open_bundle(honest("llama", "native")) as b:
        spec = b.spec
    check_versions(spec)
    with pytest.raises(VersionMismatch, match="transformers 4.0.0"):
        check_versions(spec.replace(versions={**spec.versions, "transformers": "4.0.0"}))
    with pytest.raises(VersionMismatch, match="transformers none"):
        check_versions(spec.replace(versions={k: v for k, v in spec.versions.items() if k != "transformers"}))


RUN = """
import json, sys, torch
from pol import engine
from pol.digest import state_digest
from tests.zoo.test_zoo import MODELS, zoo_spec
torch.set_num_threads(int(sys.argv[1]))
out = {}
for model in MODELS:
    rt = engine.build_runtime(zoo_spec(model, sys.argv[2], steps=2, every=2))
    engine.initial_state(rt)
    engine.run_steps(rt, 2)
    out[model] = state_digest(engine.capture_state(rt))
print(json.dumps(out))
"""


def _digests(threads: int, numerics: str = "exact", kernels: str = "1", capability: str | None = None) -> dict[str, str]:
    env = {**os.environ, "POL_EXACT_NATIVE": kernels}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, "-c", RUN, str(threads), numerics], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_exact_digests_are_one_across_threads_and_kernels():
    runs = [_digests(1), _digests(2), _digests(2, kernels="0")]
    for model in MODELS:
        assert len({d[model] for d in runs}) == 1, (model, [d[model][:12] for d in runs])


@pytest.mark.slow
def test_exact_digests_are_one_across_instruction_sets():
    runs = [_digests(2, capability="default"), _digests(2, capability="avx2")]
    for model in MODELS:
        assert len({d[model] for d in runs}) == 1, (model, [d[model][:12] for d in runs])


def test_without_transformers_a_zoo_model_is_one_clear_error(monkeypatch):
    from pol.errors import ComponentError
    from pol.models import build_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it imports
    with pytest.raises(ComponentError, match=r"pip install 'pol\[zoo\]'"):
        build_model(zoo_spec("gpt2", "native").model)
