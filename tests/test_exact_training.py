"""Exact numerics through the trainer and the verifier: one digest on every CPU configuration, digest verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pol.errors import SpecError
from pol.prove import train_and_prove
from pol.verify import verify

from .attacks.forge import forge
from .conftest import tiny_spec

REPO = Path(__file__).resolve().parent.parent
MODELS = ("mlp", "cnn", "transformer")

RUN = """
import json, sys, torch
from pol import engine
from pol.digest import state_digest
from tests.conftest import tiny_spec
threads, mkldnn, numerics = int(sys.argv[1]), sys.argv[2] == "on", sys.argv[3]
torch.set_num_threads(threads)
torch.backends.mkldnn.enabled = mkldnn
out = {}
for model in ("mlp", "cnn", "transformer"):
    spec = tiny_spec(model, steps=20, every=20, numerics=numerics)
    rt = engine.build_runtime(spec)
    engine.initial_state(rt)
    engine.run_steps(rt, 20)
    out[model] = state_digest(engine.capture_state(rt))
print(json.dumps(out))
"""

# the widest instruction set torch may use here (asking for AVX-512 on a CPU without it kills torch with SIGILL)
TOP = "avx512" if "avx512f" in Path("/proc/cpuinfo").read_text(errors="replace") else "avx2"
CONFIGS = [  # (ATEN_CPU_CAPABILITY, threads, oneDNN, compiled exact kernels)
    ("default", 2, "on", "1"),
    ("avx2", 2, "on", "1"),
    (TOP, 2, "on", "1"),
    (TOP, 1, "on", "1"),
    (TOP, 2, "off", "1"),
    (TOP, 2, "on", "0"),  # the torch path of every exact primitive and of the AdamW update
    ("default", 1, "off", "0"),
]


def _digests(capability: str, threads: int, mkldnn: str, kernels: str, numerics: str) -> dict[str, str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "POL_EXACT_NATIVE": kernels}
    done = subprocess.run([sys.executable, "-c", RUN, str(threads), mkldnn, numerics], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.slow
def test_exact_training_is_bitwise_identical_across_cpu_configurations():
    """20 steps of each built-in model: one exact digest under every configuration; native differs somewhere."""
    exact = [_digests(*config, "exact") for config in CONFIGS]
    native = [_digests(*config, "native") for config in CONFIGS]
    for model in MODELS:
        assert len({d[model] for d in exact}) == 1, (model, [d[model][:12] for d in exact])
    assert any(len({d[model] for d in native}) > 1 for model in MODELS), "native never differed: the test has no teeth"


@pytest.mark.parametrize("model", MODELS)
def test_exact_bundles_train_and_verify_by_digest(tmp_path, model):
    spec = tiny_spec(model, steps=8, every=4, numerics="exact")
    a = train_and_prove(spec, tmp_path / "a").manifest
    b = train_and_prove(spec, tmp_path / "b", split=None).manifest
    assert a.root == b.root
    report = verify(tmp_path / "a", segments=[1, 2], seed=0, threads=1)
    assert report.verdict == "accept" and report.thresholds is None and report.numerics == "exact"
    assert all(c.ok and not c.differing_tensors for c in report.checks)


def test_exact_and_native_losses_agree(tmp_path):
    for model in MODELS:
        losses = [train_and_prove(tiny_spec(model, steps=20, every=10, numerics=n), tmp_path / f"{model}-{n}")
                  .manifest.records[-1].loss for n in ("native", "exact")]
        assert abs(losses[0] - losses[1]) <= 0.02 * abs(losses[0]), (model, losses)


def test_one_ulp_is_enough_to_reject_in_exact_mode(tmp_path):
    """Exact verification has no tolerance: a single last-bit change in one weight, with every digest recomputed."""
    honest = train_and_prove(tiny_spec("mlp", steps=8, every=4, numerics="exact"), tmp_path / "h").path

    name = "param/head.weight"

    def nudge(spec, states):
        t = states[8][name].clone()
        t.view(torch.int32).view(-1)[0] += 1
        states[8] = {**states[8], name: t}
        return spec, states

    forged = forge(honest, tmp_path / "f", nudge)
    report = verify(forged, segments=[2], seed=0)
    assert report.verdict == "reject" and report.checks[0].differing_tensors == (name,)


def test_exact_mode_fixes_the_split(tmp_path):
    with pytest.raises(SpecError, match="micro-batch"):
        train_and_prove(tiny_spec("mlp", numerics="exact"), tmp_path / "x", split=4)
    spec = tiny_spec("mlp", steps=4, every=2, numerics="exact", microbatch=4)
    assert verify(train_and_prove(spec, tmp_path / "m").path, segments=[1, 2], seed=0).verdict == "accept"


def test_the_prepared_device_check_compares_commitments_across_runs():
    """benchmarks/exact_gpu_check.py (issue 4's one-call device check) on the CPU: 1 and 2 threads through the
    solver give one commitment per built-in model, and the script says so."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.exact_gpu_check import check

    threads = torch.get_num_threads()
    try:
        rows = check(["mlp", "transformer"], ["cpu"], [1, 2], steps=2, every=1, timing=False)
    finally:
        torch.set_num_threads(threads)
    assert [(r["model"], r["threads"]) for r in rows] == [("mlp", 1), ("mlp", 2), ("transformer", 1), ("transformer", 2)]
    assert all(r["same"] for r in rows) and rows[0]["root"] != rows[2]["root"]
