"""Fixtures for the pinpoint tests: faulty bundles with one corrupted operator at a drawn (step, node)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from pinpoint.capture import Fault, capture_step, get_fault_candidates
from pinpoint.parties import train_with_fault
from pol.bundle import open_bundle

from ..conftest import TINY_KWARGS, tiny_spec

MODELS = tuple(TINY_KWARGS)


@dataclass(frozen=True)
class FaultCase:
    model: str
    fault: Fault
    path: Path  # the faulty bundle
    honest: Path  # the honest bundle of the same spec
    segment: int  # the segment whose end the fault changes


def draw_fault_case(model: str, seed: int, honest: Path, root: Path) -> FaultCase:
    """Draw a (step, node) whose corruption changes the committed state, and train the faulty bundle."""
    rng = random.Random(f"{model}/{seed}")
    with open_bundle(honest) as hb:
        spec = hb.spec
        for attempt in range(20):
            step = rng.randrange(spec.steps)
            graph = capture_step(hb, step)
            fault = Fault(step, rng.choice(get_fault_candidates(graph)), rng.randrange(1 << 20))
            path = train_with_fault(spec, root / f"{model}-{seed}-{attempt}", fault)
            segment = next(i for i, r in enumerate(hb.records) if r.step > step) - 1
            with open_bundle(path) as fb:
                if fb.records[segment + 1].state != hb.records[segment + 1].state:
                    return FaultCase(model, fault, path, honest, segment)
    raise AssertionError("no drawn fault changed the commitment")


@pytest.fixture(scope="session")
def fault_cases(honest_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], FaultCase]:
    root = tmp_path_factory.mktemp("faulty")
    return {(m, seed): draw_fault_case(m, seed, honest_bundles[m], root) for m in MODELS for seed in (0, 1)}


@pytest.fixture(scope="session")
def exact_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pol.prove import train_and_prove

    spec = tiny_spec("mlp", numerics="exact", steps=8, every=4)
    return train_and_prove(spec, tmp_path_factory.mktemp("exact") / "mlp").path
