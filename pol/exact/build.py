"""The compiler driver of the exact kernels: `_kernels.c` (with `_kernels.h`) built into a shared library.

The environment is read in one place, `read_environment`, once per build (pol/exact/native.py calls it once per
process):

    CC               the C compiler (default `cc`)
    POL_CACHE_DIR    where libraries are kept (default `~/.cache/pol`)
    POL_EXACT_NATIVE `0` turns the kernels off (exact mode then takes its torch path: the same bits)

A library is compiled once per source, header, flags and compiler, for this CPU's x86-64 level where the compiler
knows it, else without one; the level changes speed, never a result (the flags forbid FMA contraction and
fast-math). Raises OSError or subprocess.SubprocessError when no compiler works, RuntimeError when there is no home
directory for the default cache.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SOURCE", "HEADER", "BASE_FLAGS", "BuildEnvironment", "read_environment", "get_cache_dir", "get_cpu_flags",
    "compile_library", "build_library",
]  # fmt: skip

SOURCE = Path(__file__).with_name("_kernels.c")
HEADER = Path(__file__).with_name("_kernels.h")
BASE_FLAGS = (
    "-O3", "-std=c11", "-fPIC", "-shared",
    "-fno-fast-math", "-ffp-contract=off",  # IEEE: no reassociation, no FMA contraction
    "-fno-math-errno", "-fno-trapping-math",  # no errno, no FP traps: lets loops vectorise, changes no value
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BuildEnvironment:
    cc: str  # the C compiler
    cache_dir: str | None  # None: ~/.cache/pol
    enabled: bool  # False with POL_EXACT_NATIVE=0


def read_environment() -> BuildEnvironment:
    """The build's environment variables, read here and nowhere else."""
    return BuildEnvironment(
        cc=os.environ.get("CC", "cc"),
        cache_dir=os.environ.get("POL_CACHE_DIR") or None,
        enabled=os.environ.get("POL_EXACT_NATIVE", "1") != "0",
    )


def get_cache_dir(env: BuildEnvironment) -> Path:
    """Where libraries are kept. Raises RuntimeError when the default needs a home directory and there is none."""
    return Path(env.cache_dir) if env.cache_dir else Path.home() / ".cache" / "pol"


def get_cpu_flags() -> tuple[str, ...]:
    """Instruction-set flags for this CPU (x86-64 levels only; they change speed, never a result)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2", "movbe"} <= flags:
        return ("-march=x86-64-v4", "-mavx512vnni") if "avx512_vnni" in flags else ("-march=x86-64-v4",)
    if {"avx2", "fma", "bmi2", "movbe"} <= flags:
        return ("-march=x86-64-v3",)
    if {"sse4_2", "popcnt"} <= flags:
        return ("-march=x86-64-v2",)
    return ()


def compile_library(cc: str, flags: tuple[str, ...], version: str, cache_dir: Path) -> Path:
    """The library built with `flags`, from the cache or compiled now. Raises OSError when the compiler fails."""
    sources = SOURCE.read_bytes() + HEADER.read_bytes()
    key = hashlib.sha256(sources + repr((cc, flags, version, platform.machine())).encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lib = cache_dir / f"pol_exact_kernels-{key}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise OSError(f"{cc} failed: {proc.stderr.strip()[:500]}")
            os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def build_library(env: BuildEnvironment, cpu_flags: tuple[str, ...]) -> Path:
    """Compile the kernels (once per source, flags and compiler) for `cpu_flags`, else (an older compiler that does
    not know the level) without them. Raises OSError or subprocess.SubprocessError when neither is possible,
    RuntimeError when there is no cache directory."""
    version = subprocess.run([env.cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    cache_dir = get_cache_dir(env)
    try:
        return compile_library(env.cc, (*BASE_FLAGS, *cpu_flags), version, cache_dir)
    except OSError:
        if not cpu_flags:
            raise
        return compile_library(env.cc, BASE_FLAGS, version, cache_dir)
