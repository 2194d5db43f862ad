"""The key test: tiny MLP, CNN and attention models trained with AdamW in fresh processes under every CPU
capability, with oneDNN off or limited to older instruction sets, with 1 or 2 threads, and with or without the
compiled exact kernels give ONE digest each in exact mode, and several in native mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({"ATEN_CPU_CAPABILITY": "default"}, ["--threads", "2"]),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, ["--threads", "2"]),
    "avx512": ({"ATEN_CPU_CAPABILITY": "avx512"}, ["--threads", "2"]),
    "no-mkldnn": ({}, ["--no-mkldnn", "--threads", "2"]),
    "1-thread": ({}, ["--threads", "1"]),
    # oneDNN (behind torch._int_mm) limited to pre-VNNI int8 kernels, where u8*s8 pair sums saturate at 2**15
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, ["--threads", "2"]),
    "onednn-sse41": ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, ["--threads", "2"]),
    # the torch path of every primitive instead of the compiled kernels (what a CUDA device or a machine with no C
    # compiler runs): the same definition, so the same digests
    "no-kernels": ({"POL_EXACT_NATIVE": "0"}, ["--threads", "2"]),
    "no-kernels-default": ({"POL_EXACT_NATIVE": "0", "ATEN_CPU_CAPABILITY": "default"}, ["--threads", "1"]),
}
STEPS = "5"


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _digests(mode: str, env_extra: dict[str, str], args: list[str]) -> dict[str, str]:
    env = (
        {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "POL_EXACT_NATIVE")}
        | {"OMP_WAIT_POLICY": "PASSIVE"}
        | env_extra
    )
    out = subprocess.run(
        [sys.executable, "-m", "tests.exact.digest_run", mode, STEPS, "--batch", "16", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    return dict(line.split() for line in out.strip().splitlines())


@pytest.mark.slow
def test_exact_digests_agree_everywhere_and_native_ones_do_not() -> None:
    configs = {k: v for k, v in CONFIGS.items() if k != "avx512" or _has_avx512()}
    exact = {name: _digests("exact", env, args) for name, (env, args) in configs.items()}
    native = {name: _digests("native", env, args) for name, (env, args) in configs.items()}
    for model in ("mlp", "cnn", "attn"):
        assert len({d[model] for d in exact.values()}) == 1, {k: d[model] for k, d in exact.items()}
        # teeth: the same runs with native kernels do not all agree
        assert len({d[model] for d in native.values()}) > 1, {k: d[model] for k, d in native.items()}
