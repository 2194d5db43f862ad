"""Shared fixtures: small specs and honestly trained bundles, built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from pol.prove import train_and_prove
from pol.spec import JobSpec, spec_from_dict

# CI replays the same examples every run (a failure there is reproducible); local runs keep exploring new ones
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TINY_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": {"model": {"name": "mlp", "kwargs": {"hidden": 32}}, "data": {"name": "synthetic", "kwargs": {"n": 512}}},
    "cnn": {"model": {"name": "cnn", "kwargs": {"width": 4}}, "data": {"name": "images", "kwargs": {"n": 256}}},
    "transformer": {
        "model": {"name": "transformer", "kwargs": {"n_layer": 1, "n_embd": 32, "block_size": 16}},
        "data": {"name": "chars", "kwargs": {"length": 8192, "block_size": 16}},
    },
}


def tiny_spec(model: str = "mlp", **fields: Any) -> JobSpec:
    """A small, fast spec for a built-in model; `fields` override anything."""
    return spec_from_dict({**TINY_KWARGS[model], "steps": 12, "every": 4, "batch_size": 16, **fields})


@pytest.fixture(scope="session")
def honest_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One honest bundle per built-in model (read-only: copy before altering)."""
    root = tmp_path_factory.mktemp("honest")
    return {m: train_and_prove(tiny_spec(m), root / m).path for m in TINY_KWARGS}


@pytest.fixture
def bundle_copy(honest_bundles: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the honest MLP bundle, free to corrupt."""
    dest = tmp_path / "bundle"
    shutil.copytree(honest_bundles["mlp"], dest)
    return dest
