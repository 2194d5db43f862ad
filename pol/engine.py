"""The training engine shared by the solver and the verifier: one code path from a state to the next.

`build_runtime` turns a spec into a model, data and optimizer state on a device; `initial_state` derives step 0 from
the seed; `restore_state`/`capture_state` move a full state in and out; `run_steps` trains from the current step to
a later one and returns the digest of the data it consumed. Solver and verifier both call exactly these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from . import __version__, rng
from .canonical import Digest
from .components import (
    CodePolicy,
    compute_code_digest,
    compute_imported_versions,
    get_package,
    load_callable,
    verify_code_allowed,
)
from .data import Dataset, batch_indices, build_dataset, data_digest, steps_per_epoch
from .digest import State, combine_digests, tensor_digests
from .errors import (
    CodeDiffers,
    DataDiffers,
    DataError,
    DeviceUnavailable,
    PolError,
    StateMismatch,
    TrainingError,
    UnsupportedOperator,
    UserCodeError,
)
from .losses import LossFn, build_loss, select_output
from .models import SeededDropout, build_model, init_parameters
from .numerics import numerics_context
from .optim import TrainingOptimizer, build_optimizer, make_workspace
from .randomness import random_context
from .spec import JobSpec
from .zoo import get_transformers_version, is_zoo_model

__all__ = [
    "Runtime",
    "DataParallel",
    "SegmentResult",
    "build_runtime",
    "resolve_spec",
    "verify_code",
    "dry_run",
    "initial_state",
    "capture_state",
    "restore_state",
    "run_steps",
    "one_step",
    "StepOutcome",
    "StepHooks",
    "HooksForStep",
    "compute_batch_digest",
    "StepContext",
    "user_draw_name",
    "parse_user_draw_name",
    "compute_user_draw",
    "UserStep",
    "step_batch",
    "dropout_mask",
    "describe_environment",
    "get_device",
    "compute_default_every",
    "expected_layout",
    "verify_layout",
    "build_spec",
    "resolve_job",
    "get_model_inputs",
    "verify_batch_names",
    "select_output",
]

StepCallback = Callable[[int, float], None]  # (step reached, loss of the step)


class DataParallel(Protocol):
    """This process's part in a data-parallel step (implemented by `pol.distributed.DataParallelGroup`).

    `microbatches(count)`: the indices of the step's micro-batches this process computes (a fixed, spec-derived
    share); `reduce_exact(per_micro, params)`: the exact sum of every process's micro-batch gradients, rounded once
    (the same bits as one process summing all of them); `reduce_native(grads)`: the float sum of every process's
    accumulated gradients; `gather_losses(losses, count)`: every micro-batch's (loss * micro-batch size) by index."""

    def microbatches(self, count: int) -> Sequence[int]: ...

    def reduce_exact(self, per_micro: Mapping[str, list[torch.Tensor]], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def reduce_native(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def gather_losses(self, losses: Mapping[int, float], count: int) -> dict[int, float]: ...


@dataclass
class Runtime:
    """A model, its data and optimizer state on one device, at one step. Mutable by design: it *is* the training."""

    spec: JobSpec
    device: torch.device
    model: nn.Module
    dataset: Dataset
    params: dict[str, nn.Parameter]
    buffers: dict[str, torch.Tensor]
    opt_state: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    dropouts: list[SeededDropout] = field(default_factory=list)
    workspace: torch.Tensor | None = None  # the optimizer's reusable scratch memory (not part of the state)
    optimizer: TrainingOptimizer | None = None  # groups, schedule, state layout and update (set by build_runtime)
    loss_fn: LossFn | None = None  # the spec's loss (set by build_runtime)
    step_fn: UserStep | None = None  # the spec's user step (module:callable), if it names one
    on_user_draw: Callable[[str, torch.Tensor], None] | None = None  # sees each user-stream draw by its leaf name (pinpoint)
    code: CodePolicy = field(default_factory=CodePolicy)  # the user code this runtime may import (to rebuild the model)
    pristine: bool = True  # the model holds the initialisation it was built with (no state restored, no step run)
    random_draws: int = 0  # torch random operators served from pol.rng so far (dropout, noise, augmentation)
    uses_random: bool | None = None  # the model draws torch random numbers (None: not yet known; see one_step)
    data_parallel: DataParallel | None = None  # this process's share of each step, with its peers (pol.distributed)
    # native numerics, one process: sum the micro-batch gradients as `reduce_groups` data-parallel processes would
    # (each its own micro-batches i % groups in order, then the group sums in group order): a verifier's calibration
    # of a bundle trained on that many processes (pol.verify). Exact numerics ignores it (the sum is exact).
    reduce_groups: int = 1


@dataclass(frozen=True, slots=True)
class SegmentResult:
    """What running steps `start -> end` consumed and produced."""

    start: int
    end: int
    data_digest: Digest
    loss: float | None  # mean training loss over the segment (None for an empty segment)


def get_device(name: str) -> torch.device:
    """Parse and check a device name. Raises DeviceUnavailable."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown device {name!r}: use 'cpu' or 'cuda[:N]'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"device type {device.type!r} is not supported: use 'cpu' or 'cuda'")
    return device


def describe_environment(device: torch.device) -> dict[str, str | int]:
    """Information about where a computation ran. Recorded in bundles, never hashed into digests."""
    env: dict[str, str | int] = {
        "pol": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    return env


def resolve_spec(spec: JobSpec, dataset: Dataset, *, code: CodePolicy | None = None, eval_data_dir: str | None = None) -> JobSpec:
    """Bind the data digest, the digests of the user code it names and the versions that matter into the spec (it
    then has a job id): pol's, torch's, and those of the third-party distributions the user code imports
    (`compute_imported_versions`; transformers for a zoo model). An evaluation's data is built here (with `code`,
    by default the code of whoever wrote the spec: it is the caller's own) and its digest bound. Raises
    ComponentError if named user code cannot be found to be hashed, DataError."""
    if spec.evaluation is not None and spec.evaluation.data_digest is None:
        ev = spec.evaluation
        eval_data = build_dataset(ev.data.name, ev.data.kwargs, data_dir=eval_data_dir, code=code or CodePolicy.trust_all_code())
        spec = spec.replace(evaluation=dataclasses.replace(ev, data_digest=data_digest(eval_data)))
    versions = {"pol": __version__, "torch": torch.__version__.split("+")[0]}
    if is_zoo_model(spec.model.name):  # transformers' code defines the model: its version is part of the job
        versions["transformers"] = get_transformers_version()
    for _, component in spec.components:  # so does the third-party code user code imports (read, not imported)
        if component.is_user_code:
            versions.update(compute_imported_versions(component.name))
    for role, component in spec.components:
        if component.is_user_code:
            spec = spec.with_code(role, compute_code_digest(component.name))
    return spec.replace(data_digest=data_digest(dataset), versions=versions)


def verify_code(spec: JobSpec, code: CodePolicy) -> None:
    """Check a spec's user code before anything is imported: allowed by `code` (else CodeNotAllowed), and, for a
    resolved spec, the same code as the spec pins (else CodeDiffers). Reads source files only."""
    for role, component in spec.components:
        verify_code_allowed(role, component.name, code)
    for role, component in spec.components:
        if component.is_user_code and component.code is not None:
            here = compute_code_digest(component.name)
            if here != component.code:
                raise CodeDiffers(role, get_package(component.name), component.code, here)


CHECKPOINT_BYTES_PER_STEP = 1_250_000  # the default k keeps checkpoint output near this many bytes per step


def compute_default_every(spec: JobSpec, code: CodePolicy | None = None) -> int:
    """The default checkpoint interval k for a spec: the smallest multiple of 10 (at least 10, at most the step
    count) at which the state written per step stays under CHECKPOINT_BYTES_PER_STEP. A pure function of the model
    and optimizer, so the same flags give the same spec on every machine: 10 for the small built-in models, about
    100 for a 10M-parameter model with AdamW (where writing the state costs as much as ~10 steps on a CPU).

    Raises CodeNotAllowed (user code that `code` does not allow), ComponentError if the model cannot be built.
    """
    params = sum(p.numel() * p.element_size() for p in build_model(spec.model, code).parameters())
    opt = spec.optimizer
    slots = {"sgd": 2 if opt.momentum > 0 else 1, "SGD": 2 if opt.kwargs.get("momentum") else 1, "RMSprop": 2,
             "Adagrad": 2}.get(opt.name, 3) + (1 if opt.ema else 0)  # parameters and their per-parameter state
    k = 10 * math.ceil(params * slots / CHECKPOINT_BYTES_PER_STEP / 10)
    return max(1, min(spec.steps, max(10, k)))


def build_spec(fields: Mapping[str, Any], code: CodePolicy | None = None) -> JobSpec:
    """A spec from its fields (a spec file's, after command-line flags: `pol.spec.apply_flags`). Without `every`,
    the checkpoint interval is sized by `compute_default_every`, which builds the model (on `code`'s terms).
    Raises SpecError, CodeNotAllowed, ComponentError."""
    from .spec import spec_from_dict

    spec = spec_from_dict({**fields, "every": fields.get("every", 1)})
    if "every" not in fields:
        verify_code(spec, code or CodePolicy())
        spec = spec.replace(every=compute_default_every(spec, code))
    return spec


def resolve_job(spec: JobSpec, *, code: CodePolicy | None = None, data_dir: str | None = None,
                eval_data_dir: str | None = None) -> JobSpec:
    """The spec with its data digest, code digests and versions bound (so it has a job id), without training.
    `data_dir` / `eval_data_dir`: where the caller holds a `dir:` training / evaluation dataset. A resolved spec
    is returned as it is. Raises CodeNotAllowed, ComponentError, DataError."""
    if spec.is_resolved:
        return spec
    verify_code(spec, code or CodePolicy())
    return resolve_spec(spec, build_dataset(spec.data.name, spec.data.kwargs, data_dir=data_dir, code=code),
                        code=code or CodePolicy(), eval_data_dir=eval_data_dir)


def build_runtime(
    spec: JobSpec,
    *,
    device: str | torch.device = "cpu",
    dataset: Dataset | None = None,
    data_dir: str | None = None,
    code: CodePolicy | None = None,
) -> Runtime:
    """Build model and data for a spec on a device. If the spec is resolved, the data must match its digest and its
    user code its code digests. User code is imported only if `code` allows it (default: pol's built-ins only).

    Raises CodeNotAllowed and CodeDiffers (before importing anything), ComponentError, DataError, DataDiffers (the
    data here is not the committed data), DeviceUnavailable.
    """
    dev = device if isinstance(device, torch.device) else get_device(device)
    numerics_context(spec.numerics)  # raises NumericsUnavailable now rather than at the first step
    code = code or CodePolicy()
    verify_code(spec, code)
    if dataset is None:
        dataset = build_dataset(spec.data.name, spec.data.kwargs, data_dir=data_dir, code=code)
    steps_per_epoch(len(dataset), spec.batch_size)
    verify_batch_names(spec, dataset)
    if spec.data_digest is not None:
        got = data_digest(dataset)
        if got != spec.data_digest:
            raise DataDiffers(spec.data_digest, got)
    model = build_model(spec.model, code, init_seed=spec.seed if spec.init == "model" else None).to(dev)
    model.train()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    persistent = set(model.state_dict())
    buffers = {n: b for n, b in buffers.items() if n in persistent}
    dropouts = [m for m in model.modules() if isinstance(m, SeededDropout)]
    workspace = make_workspace(spec.optimizer, params) if spec.optimizer.is_pol else None
    loss_fn = build_loss(spec.loss, output=spec.output, target=spec.target, code=code)
    step_fn = load_callable(spec.step_fn.name, code) if spec.step_fn is not None else None
    optimizer = build_optimizer(spec.optimizer, model, params, spec.steps, code)
    return Runtime(
        spec=spec, device=dev, model=model, dataset=dataset, params=params, buffers=buffers, dropouts=dropouts,
        workspace=workspace, optimizer=optimizer, loss_fn=loss_fn, step_fn=step_fn, code=code,
    )


def initial_state(rt: Runtime) -> State:
    """Derive the step-0 state from the seed alone, install it in the runtime and return a copy.

    With the spec's `init` "model" (the default), that is the model's own initialisation with its random draws
    served by pol.rng (`pol.randomness.init_context`): the model as `build_runtime` built it, or rebuilt if the
    runtime has trained or restored since. With "pol", pol's rule (`pol.models.init_parameters`)."""
    if rt.spec.init == "pol":
        init_parameters(rt.model, rt.spec.seed)
    elif not rt.pristine:
        fresh = build_model(rt.spec.model, rt.code, init_seed=rt.spec.seed)
        live = {**dict(rt.model.named_parameters()), **dict(rt.model.named_buffers())}
        with torch.no_grad():
            for name, t in {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}.items():
                live[name].copy_(t)
    # scalars the optimizer keeps on the CPU (running beta powers, step counts) stay there; the rest lives on the device
    assert rt.optimizer is not None
    layout = rt.optimizer.layout(0)
    rt.opt_state = {n: t if layout[n][2] else t.to(rt.device) for n, t in rt.optimizer.initial_state().items()}
    rt.step = 0
    rt.pristine = False
    return capture_state(rt)


def capture_state(rt: Runtime, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of the full training state: parameters, buffers, optimizer state and the step counter.

    `into`, a state captured earlier from this runtime that nothing uses any more, is overwritten and returned
    instead of allocating a new copy (a solver alternates two, so a large state costs no fresh memory per checkpoint).
    """
    live = {f"param/{n}": p for n, p in rt.params.items()}
    live.update({f"buffer/{n}": b for n, b in rt.buffers.items()})
    live.update(rt.opt_state)
    if into is not None and set(into) == {*live, "meta/step"}:
        with torch.no_grad():
            for name, t in live.items():
                into[name].copy_(t.detach())
        into["meta/step"] = torch.tensor(rt.step, dtype=torch.int64)
        return into
    state = {name: t.detach().to("cpu", copy=True) for name, t in live.items()}
    state["meta/step"] = torch.tensor(rt.step, dtype=torch.int64)
    return state


def expected_layout(rt: Runtime, step: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor a full state of this runtime's spec holds at `step`: name -> (dtype, shape). (An optimizer
    that initialises its state at its first update, as most of torch.optim's do, holds less at step 0.)"""
    assert rt.optimizer is not None
    layout = {f"param/{n}": (p.dtype, tuple(p.shape)) for n, p in rt.params.items()}
    layout.update({f"buffer/{n}": (b.dtype, tuple(b.shape)) for n, b in rt.buffers.items()})
    layout.update({n: (dtype, shape) for n, (dtype, shape, _) in rt.optimizer.layout(step).items()})
    layout["meta/step"] = (torch.int64, ())
    return layout


def verify_layout(rt: Runtime, layout: Mapping[str, tuple[str, tuple[int, ...]]], where: str, step: int) -> None:
    """Check a checkpoint's tensor names, dtypes (as torch names them, e.g. "float32") and shapes against what this
    spec's model and optimizer hold at `step`. Raises StateMismatch naming the first missing, extra or misshapen
    tensor."""
    expected = {n: (str(d).removeprefix("torch."), s) for n, (d, s) in expected_layout(rt, step).items()}
    for name in sorted(set(expected) - set(layout)):
        raise StateMismatch(f"{where}: tensor {name!r} is missing (the spec's model and optimizer hold it)")
    for name in sorted(set(layout) - set(expected)):
        raise StateMismatch(f"{where}: tensor {name[:120]!r} is not part of the spec's model and optimizer state")
    for name, (dtype, shape) in sorted(expected.items()):
        if tuple(layout[name]) != (dtype, shape):
            got_dtype, got_shape = layout[name]
            raise StateMismatch(f"{where}: tensor {name!r} is {got_dtype} {tuple(got_shape)}, expected {dtype} {shape}")


def restore_state(rt: Runtime, state: Mapping[str, torch.Tensor]) -> None:
    """Install a full state into the runtime. Raises StateMismatch if it does not fit the spec's model."""
    if not isinstance(state.get("meta/step"), torch.Tensor) or state["meta/step"].dtype != torch.int64 or state["meta/step"].dim():
        raise StateMismatch("state has no meta/step counter (an int64 scalar)")
    step = int(state["meta/step"])
    assert rt.optimizer is not None
    on_cpu = {n for n, (_, _, cpu) in rt.optimizer.layout(step).items() if cpu}
    layout = expected_layout(rt, step)
    if set(state) != set(layout):
        missing, extra = sorted(set(layout) - set(state)), sorted(set(state) - set(layout))
        raise StateMismatch(f"state does not fit the spec's model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (dtype, shape) in layout.items():
        t = state[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise StateMismatch(f"state tensor {name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
    with torch.no_grad():
        for n, p in rt.params.items():
            p.copy_(state[f"param/{n}"])
        for n, b in rt.buffers.items():
            b.copy_(state[f"buffer/{n}"])
    rt.opt_state = {n: state[n].clone() if n in on_cpu else state[n].to(rt.device, copy=True) for n in layout if n.startswith("optim/")}
    rt.step = int(state["meta/step"])
    rt.pristine = False


def step_batch(spec: JobSpec, dataset: Dataset, step: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """The one derivation of the batch that the step from state `step` to `step + 1` consumes: its sample indices
    (pol's keyed order) and its tensors. The solver, the verifier, pinpoint's capture and the referee all call this
    (a second derivation that drifted would make the referee rule against an honest solver). The samples are
    fetched in that order (on POL_DATA_WORKERS threads if set: same bits) and augmented here, with draws keyed by
    (seed, step, sample index) (`pol.augment`), so the batch digest covers the augmented batch."""
    idx = batch_indices(spec.seed, len(dataset), spec.batch_size, step)
    return idx, dataset.transform(dataset.batch(idx), seed=spec.seed, step=step, idx=idx)


def dropout_mask(spec: JobSpec, step: int, layer: int, call: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The keep mask of pol's own dropout layer `layer` at its `call`-th use in step `step`, over the whole batch
    (`shape[0]` rows; a micro-batch takes its rows). The one derivation, shared by the step and the referee."""
    return rng.keep_mask(spec.seed, "dropout", [step, layer, call], shape, p)


def _bind_randomness(rt: Runtime, step: int, row_offset: int, total_rows: int) -> None:
    """Give each dropout layer masks keyed by (seed, step, layer, call), sliced from whole-batch draws."""
    for index, module in enumerate(rt.dropouts):
        calls = [0]

        def source(shape: tuple[int, ...], index: int = index, calls: list[int] = calls, p: float = module.p) -> torch.Tensor:
            call = calls[0]
            calls[0] += 1
            full = dropout_mask(rt.spec, step, index, call, (total_rows, *shape[1:]), p)
            return full[row_offset : row_offset + shape[0]]

        module.mask_source = source


def get_model_inputs(spec: JobSpec, names: Iterable[str]) -> tuple[str, ...]:
    """The batch tensors the model is called with: the spec's `inputs`, or every tensor but the target."""
    return spec.inputs or tuple(sorted(set(names) - {spec.target}))


def verify_batch_names(spec: JobSpec, dataset: Dataset) -> None:
    """Raise DataError unless the data holds the spec's target and inputs (and the model has an input)."""
    names = set(dataset.tensors)
    missing = sorted(({spec.target} | set(spec.inputs)) - names)
    if missing:
        raise DataError(f"the data holds tensors {sorted(names)}, not {missing} that the spec's inputs and target name")
    if not get_model_inputs(spec, names):
        raise DataError(f"the data holds only the target {spec.target!r}: nothing to feed the model")


@dataclass(frozen=True)
class StepContext:
    """What a user step (`step_fn`) is given besides the model and the micro-batch.

    `step`: the step (state `step` -> `step + 1`); `microbatch`: the micro-batch's index in the step; `lrs`: each
    parameter group's learning rate for this step; `optimizer`: the job's optimizer (read it; pol runs the update);
    `loss(output, batch)`: the spec's loss; `uniform`/`normal`: pol's random streams keyed by (seed, purpose, step,
    micro-batch), the same on every machine. torch's random operators (dropout, torch.rand) inside the step are
    served by pol too; Python's `random` and numpy's global generator are not, and a step that draws from them is
    refused."""

    step: int
    microbatch: int
    lrs: tuple[float, ...]
    optimizer: TrainingOptimizer
    seed: int
    device: torch.device
    loss_fn: LossFn

    def loss(self, output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(output, batch)

    on_draw: Callable[[str, torch.Tensor], None] | None = None

    def uniform(self, shape: Sequence[int], purpose: str, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """float32 uniform on [low, high) (pol.rng.uniform), keyed by (seed, purpose, step, micro-batch)."""
        return self._draw("uniform", shape, purpose, (float(low), float(high)))

    def normal(self, shape: Sequence[int], purpose: str, std: float = 1.0) -> torch.Tensor:
        """float32 with mean 0 and standard deviation `std` (pol.rng.normal), keyed like `uniform`."""
        return self._draw("normal", shape, purpose, (float(std),))

    def _draw(self, kind: str, shape: Sequence[int], purpose: str, params: tuple[float, ...]) -> torch.Tensor:
        if not isinstance(purpose, str) or not _PURPOSE.fullmatch(purpose):
            raise ValueError(f"a stream's purpose is 1 to 64 of A-Z a-z 0-9 _ . -, got {str(purpose)[:80]!r}")
        shape = tuple(int(n) for n in shape)
        with _disable_current_modes():  # made outside any capture: a named leaf, not operators of the step
            values = compute_user_draw(self.seed, self.step, self.microbatch, kind, purpose, params, shape).to(self.device)
        if self.on_draw is not None:
            self.on_draw(user_draw_name(self.microbatch, kind, purpose, params), values)
        return values


_PURPOSE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def user_draw_name(microbatch: int, kind: str, purpose: str, params: tuple[float, ...]) -> str:
    """The leaf name of a user-stream draw: `rng/user/<micro-batch>/<kind>/<params as float hex>/<purpose>`."""
    return f"rng/user/{microbatch}/{kind}/{','.join(p.hex() for p in params)}/{purpose}"


def compute_user_draw(seed: int, step: int, microbatch: int, kind: str, purpose: str, params: tuple[float, ...],
                      shape: tuple[int, ...]) -> torch.Tensor:
    """The values of a user-stream draw (the one derivation: the step context and the referee call it)."""
    if kind == "uniform":
        low, high = params
        return rng.uniform(seed, f"user/{purpose}", [step, microbatch], shape, low, high)
    (std,) = params
    return rng.normal(seed, f"user/{purpose}", [step, microbatch], shape, std)


def parse_user_draw_name(name: str) -> tuple[int, str, tuple[float, ...], str]:
    """(micro-batch, kind, params, purpose) of a `user_draw_name`. Raises ValueError."""
    parts = name.removeprefix("rng/user/").split("/")
    if len(parts) != 4 or parts[1] not in ("uniform", "normal") or not _PURPOSE.fullmatch(parts[3]) or not parts[0].isdigit():
        raise ValueError(f"malformed user-stream leaf {name[:120]!r}")
    params = tuple(float.fromhex(p) for p in parts[2].split(","))
    if len(params) != (2 if parts[1] == "uniform" else 1) or not all(math.isfinite(p) for p in params):
        raise ValueError(f"malformed user-stream leaf {name[:120]!r}")
    return int(parts[0]), parts[1], params, parts[3]


UserStep = Callable[[nn.Module, Mapping[str, torch.Tensor], StepContext], torch.Tensor]  # -> the micro-batch's loss


def _forward_loss(rt: Runtime, batch: Mapping[str, torch.Tensor], step: int = 0, microbatch: int = 0) -> torch.Tensor:
    """The model's forward pass on one (micro-)batch and the loss (or the user step, which returns it). The inputs
    go in as keyword arguments (a lone `x` positionally); an exception from the model (user code) becomes one
    UserCodeError naming the model, the batch's shapes and what went wrong; pol's own errors pass through."""
    spec = rt.spec
    names = get_model_inputs(spec, batch)
    assert rt.loss_fn is not None and rt.optimizer is not None
    try:
        if rt.step_fn is not None:
            ctx = StepContext(step, microbatch, tuple(rt.optimizer.schedule.at(step)), rt.optimizer, spec.seed, rt.device, rt.loss_fn,
                              rt.on_user_draw)
            loss = rt.step_fn(rt.model, batch, ctx)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                raise TypeError(f"it returned {type(loss).__name__}, not the micro-batch's loss as a scalar float tensor")
            return loss.reshape(())
        out = rt.model(batch["x"]) if names == ("x",) else rt.model(**{n: batch[n] for n in names})
        return rt.loss_fn(out, batch)
    except PolError:
        raise
    except Exception as exc:
        shapes = ", ".join(f"{n} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in sorted(batch.items()))
        who = f"step {spec.step_fn.name!r}" if spec.step_fn is not None else f"model {spec.model.name!r}"
        raise UserCodeError(
            f"{who} failed on a batch {shapes} with loss {spec.loss.name!r}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from exc


def _host_generator_states() -> tuple[Any, bytes, int]:
    """Python's and numpy's global generators' states (pol never draws from them: a change is user code drawing)."""
    _, keys, pos, *_ = np.random.get_state()
    return random.getstate(), bytes(keys), int(pos)


@contextlib.contextmanager
def _randomness(rt: Runtime, step: int, microbatch: int) -> Iterator[None]:
    """Where a micro-batch's torch random draws come from: pol.rng, keyed by (seed, step, micro-batch, position).

    Serving them costs a dispatch mode around every operator (about 40% of a small native step), so it is paid
    only by models that draw: a runtime's first step (or the dry run) runs under the mode and finds out. A model
    found not to draw runs without it, and torch's own generators are watched instead: if one moved during the
    step, the model drew outside pol's control (only later than its first step) and the step is refused rather
    than let hardware-dependent values in. Either way the results are the same bits: the mode changes only draws.
    """
    host = _host_generator_states()
    if rt.uses_random is not False:
        with random_context(rt.spec.seed, "step", [step, microbatch]) as mode:
            yield
        rt.random_draws += mode.position
        rt.uses_random = bool(rt.uses_random or mode.position)
        _check_host_generators(rt, step, host)
        return
    before = _generator_states(rt.device)
    yield
    _check_host_generators(rt, step, host)
    if before != _generator_states(rt.device):
        raise UnsupportedOperator(
            "torch's random generator",
            f"model {rt.spec.model.name!r} drew random numbers at step {step} but not in its first step; pol serves "
            "a model's random draws only if it draws from its first step on",
        )


def _check_host_generators(rt: Runtime, step: int, before: tuple[Any, bytes, int]) -> None:
    if _host_generator_states() != before:
        who = f"step {rt.spec.step_fn.name!r}" if rt.spec.step_fn is not None else f"model {rt.spec.model.name!r}"
        raise UnsupportedOperator(
            "Python's random / numpy's global generator",
            f"{who} drew from an unseeded host generator at step {step}: its values are not pol's to re-derive; "
            "use torch's random operators (served by pol) or the step context's uniform/normal",
        )


def _generator_states(device: torch.device) -> list[bytes]:
    """torch's generators' states, read with every dispatch mode set aside (a capture must not see the reads)."""
    with _disable_current_modes():
        states = [torch.default_generator.get_state().numpy().tobytes()]
        if device.type == "cuda":
            states.append(torch.cuda.get_rng_state(device).numpy().tobytes())
    return states


def dry_run(rt: Runtime) -> None:
    """One forward pass and loss on the first micro-batch of step 0, without gradients or any change to the state:
    finds a model that cannot run on its data before anything is written. Raises UserCodeError."""
    spec = rt.spec
    _, first = step_batch(spec, rt.dataset, 0)
    micro = spec.microbatch or spec.batch_size
    batch = {name: t[:micro].to(rt.device) for name, t in first.items()}
    _bind_randomness(rt, 0, 0, spec.batch_size)
    saved = {n: b.detach().clone() for n, b in rt.model.named_buffers()}  # a forward may update them (batch norm)
    try:
        with torch.no_grad(), numerics_context(spec.numerics), random_context(spec.seed, "dry-run", []) as draws:
            _forward_loss(rt, batch)
        rt.random_draws += draws.position
        rt.uses_random = True if draws.position else rt.uses_random
    finally:
        with torch.no_grad():
            for n, b in rt.model.named_buffers():
                b.copy_(saved[n])


def compute_batch_digest(step: int, idx: np.ndarray, batch: Mapping[str, torch.Tensor]) -> bytes:
    return step.to_bytes(8, "little") + idx.astype("<i8").tobytes() + bytes.fromhex(combine_digests(tensor_digests(batch)))


@dataclass(frozen=True, slots=True)
class StepOutcome:
    loss: float  # the step's mean training loss
    data_part: bytes  # what the step contributes to its segment's data digest (step, sample indices, batch digest)


StepMode = Callable[[Mapping[str, torch.Tensor]], contextlib.AbstractContextManager[Any]]  # given the batch on the device
MicrobatchHook = Callable[[int], contextlib.AbstractContextManager[Any]]  # given the micro-batch's row offset


@dataclass(frozen=True, slots=True)
class StepHooks:
    """Contexts to run one step under (see `one_step`): how pinpoint captures or deliberately corrupts a step."""

    mode: StepMode | None = None
    around_microbatch: MicrobatchHook | None = None


HooksForStep = Callable[["Runtime", int], "StepHooks | None"]  # (runtime, step) -> hooks for that step, or None


def one_step(
    rt: Runtime, microbatch: int | None = None, *, mode: StepMode | None = None, around_microbatch: MicrobatchHook | None = None
) -> StepOutcome:
    """The one definition of a training step: state `rt.step` -> `rt.step + 1`, in place.

    `microbatch` overrides the spec's split (0: whole batch). `mode` (called with the step's batch on the device)
    returns a context entered inside the numerics context around the whole step, and `around_microbatch` one
    entered around each micro-batch after its dropout masks are bound: pinpoint's operator capture uses both, so
    a captured step is this step, not a copy of it. Raises TrainingError if the loss is not finite.

    The step's gradient. The batch is cut into `size / micro` micro-batches; micro-batch i's gradient g_i is the
    backward pass of its loss scaled by micro/size. Native numerics accumulates them in `.grad` (float32 adds in
    micro-batch order). Exact numerics defines the step's gradient as the EXACT sum of the g_i, rounded once to
    float32 (round to nearest even; a sum of negative zeros only is -0; IEEE rules for NaN/inf): every float32 is an
    integer multiple of 2**-149, so the sum is an integer, accumulated in fixed-point digits (pol.exact.reduce)
    and independent of the order and grouping of the micro-batches. One process computes it as an exact `sum` over
    the stacked g_i under the exact mode; with `rt.data_parallel` set (pol.distributed) each process computes its
    share of the g_i, sums them as int64 fixed-point windows, the windows are all-reduced (integer addition: any
    reduction order) and rounded once, the few elements a window cannot round summed exactly from the gathered
    g_i: the same bits. Native numerics with several processes all-reduces gradient buckets during the last
    backward pass (DDP's overlap, `overlap_native`). (Exact numerics used to add the g_i into `.grad`
    one by one, so exact digests of specs with more than one micro-batch changed; one micro-batch is unchanged.)
    The step's loss is the sum of (micro-batch loss * micro) in micro-batch order, divided by the batch size.
    """
    spec = rt.spec
    s = rt.step
    idx, batch = step_batch(spec, rt.dataset, s)
    on_device = {name: t.to(rt.device) for name, t in batch.items()}
    size = spec.batch_size
    micro = (spec.microbatch if microbatch is None else microbatch) or size
    for p in rt.params.values():
        p.grad = None
    count = -(-size // micro)  # micro-batches (a split that does not divide the batch ends with a short one)
    dp = rt.data_parallel
    mine = range(count) if dp is None else dp.microbatches(count)
    exact_sum = spec.numerics == "exact" and (count > 1 or dp is not None)  # the gradient: an exact sum, rounded once
    per_micro: dict[str, list[torch.Tensor]] = {n: [] for n in rt.params}
    grouped: list[dict[str, torch.Tensor]] | None = None
    if not exact_sum and dp is None and rt.reduce_groups > 1 and count > 1:
        grouped = [{} for _ in range(min(rt.reduce_groups, count))]
    losses: dict[int, float] = {}
    # native numerics on several processes: DDP's overlap, gradient buckets all-reduced during the last backward
    overlap = getattr(dp, "overlap_native", None) if dp is not None and not exact_sum and mode is None else None
    last = mine[-1] if len(mine) else None
    buckets = None
    with numerics_context(spec.numerics), (mode(on_device) if mode else contextlib.nullcontext()):
        for i in mine:
            offset = i * micro
            _bind_randomness(rt, s, offset, size)
            with around_microbatch(offset) if around_microbatch else contextlib.nullcontext():
                with _randomness(rt, s, i):
                    loss = _forward_loss(rt, {name: t[offset : offset + micro] for name, t in on_device.items()}, s, i)
                    if overlap is not None and i == last:
                        buckets = overlap(rt.params)
                    (loss * (micro / size) if micro != size else loss).backward()
                losses[i] = float(loss.detach()) * micro
            if exact_sum:  # keep each micro-batch's gradient apart: they are summed exactly below
                for n, p in rt.params.items():
                    per_micro[n].append(p.grad if p.grad is not None else torch.zeros_like(p))
                    p.grad = None
            elif grouped is not None:  # as the process owning micro-batch i would accumulate it
                group = grouped[i % rt.reduce_groups]
                for n, p in rt.params.items():
                    if p.grad is not None:
                        group[n] = p.grad if n not in group else group[n].add_(p.grad)
                    p.grad = None
        if exact_sum and dp is not None:
            with _disable_current_modes():  # integer windows, all-reduced: not operators of the step's arithmetic
                grads = dp.reduce_exact(per_micro, rt.params)
        elif exact_sum:
            # under the exact numerics mode a sum over the stacked gradients is their exact sum rounded once
            # (pol.exact.reduce), the same bits as pol.distributed's window all-reduce, in any micro-batch order
            grads = {n: torch.stack(gs).sum(dim=0) for n, gs in per_micro.items()}
        elif grouped is not None:  # the groups' sums added in group order, as one all-reduce order would
            grads = {}
            for n, p in rt.params.items():
                parts = [g[n] for g in grouped if n in g]
                grads[n] = torch.zeros_like(p) if not parts else parts[0]
                for part in parts[1:]:
                    grads[n] = grads[n] + part
        else:
            grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in rt.params.items()}
            if dp is not None:
                with _disable_current_modes():
                    if overlap is not None:
                        grads = (buckets if buckets is not None else overlap(rt.params)).finish()
                    else:
                        grads = dp.reduce_native(grads)
        if dp is not None:
            with _disable_current_modes():
                losses = dp.gather_losses(losses, count)
        # under a mode (pinpoint's capture) the update allocates its temporaries: a reused buffer would be a tensor
        # the step reads without computing it. Same bits either way.
        # exact numerics: AdamW as one compiled kernel per parameter (same bits), except under a capture, which
        # must see the update's operators
        assert rt.optimizer is not None
        rt.optimizer.update(grads, rt.opt_state, s, rt.workspace if mode is None else None,
                            exact_kernels=spec.numerics == "exact" and mode is None)
    rt.step = s + 1
    rt.pristine = False
    loss_sum = 0.0
    for i in range(count):  # in micro-batch order, whichever process computed each
        loss_sum += losses[i]
    loss_value = loss_sum / size
    if not math.isfinite(loss_value):
        raise TrainingError(f"the loss became non-finite at step {s}: lower the learning rate")
    return StepOutcome(loss_value, compute_batch_digest(s, idx, batch))


def run_steps(
    rt: Runtime,
    end: int,
    *,
    microbatch: int | None = None,
    on_step: StepCallback | None = None,
    hooks: HooksForStep | None = None,
) -> SegmentResult:
    """Train from `rt.step` to `end`. `microbatch` overrides the spec's split (a verifier's calibration uses it).

    Returns the digest of the data consumed (each step's sample indices and batch bytes) and the mean loss.
    """
    assert end >= rt.step, f"cannot run backwards from {rt.step} to {end}"
    start = rt.step
    hasher = blake3.blake3(b"pol/segment-data/v1\x00" + start.to_bytes(8, "little") + end.to_bytes(8, "little"))
    losses = []
    while rt.step < end:
        step_hooks = hooks(rt, rt.step) if hooks is not None else None
        if step_hooks is None:
            outcome = one_step(rt, microbatch)
        else:
            outcome = one_step(rt, microbatch, mode=step_hooks.mode, around_microbatch=step_hooks.around_microbatch)
        hasher.update(outcome.data_part)
        losses.append(outcome.loss)
        if on_step is not None:
            on_step(rt.step, outcome.loss)
    return SegmentResult(start, end, hasher.hexdigest(), sum(losses) / len(losses) if losses else None)
