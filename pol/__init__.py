"""pol: verifiable machine-learning training (the solver's and verifier's side).

The public API, importable from `pol` itself (loaded on first use, so `import pol` stays light):

- writing a job: `job`, `optimizer`, `step` (pol.api), `JobSpec`, `spec_from_dict`, `load_spec_file` (pol.spec),
  `StepContext` (what a step function is given, pol.engine)
- proving and verifying: `train` / `train_and_prove` (pol.prove), `verify_bundle` (pol.api: `pol.verify.verify` with `allow_code`),
  `open_bundle` (pol.bundle), `CodePolicy` (pol.components)
- errors: `pol.errors` (every error carries the exit code the CLI gives for it)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.6.0"

_EXPORTS = {
    "job": "pol.api", "optimizer": "pol.api", "step": "pol.api", "train": "pol.api", "verify_bundle": "pol.api",
    "JobSpec": "pol.spec", "spec_from_dict": "pol.spec", "load_spec_file": "pol.spec",
    "StepContext": "pol.engine", "train_and_prove": "pol.prove", "open_bundle": "pol.bundle", "CodePolicy": "pol.components",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pol' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
