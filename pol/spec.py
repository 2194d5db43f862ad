"""The job spec: a frozen, canonical description of everything needed to re-run a training bit for bit.

`job_id = blake3(canonical JSON of the spec)`, canonical JSON being RFC 8785 (JCS, see pol.canonical), so a
verifier in another language can recompute it. A spec is *resolved* once the digest of its data, the digests of the
user code it names (`Component.code`) and the versions that matter are bound into it; only resolved specs have a
job id, and only they go into bundles. Every field is checked on construction, and every count is bounded: a spec
read from a stranger's bundle gets the same scrutiny as one typed on the command line. A spec that could prove
nothing (no steps, a zero learning rate) is refused.

`apply_flags` turns command-line flags over a spec file's fields into spec fields (a pure function, shared by
`pol train` and `pol job`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .canonical import MAX_SAFE_INTEGER, Digest, canonical_bytes, compute_hash, is_digest, parse_json_strict
from .errors import SpecError

__all__ = [
    "Component",
    "GroupRule",
    "EvalSpec",
    "METRICS",
    "OptimSpec",
    "JobSpec",
    "Flags",
    "NUMERICS",
    "LOSSES",
    "TORCH_OPTIMIZERS",
    "SCHEDULERS",
    "MAX_CHECKPOINTS",
    "MAX_BATCH_TENSORS",
    "apply_flags",
    "load_spec_file",
    "spec_from_dict",
    "FORMAT_VERSION",
    "BUILTIN_DEFAULTS",
]

FORMAT_VERSION = 1
NUMERICS = ("native", "exact")
# built-in losses and the keyword arguments each takes (name -> allowed kwargs); see pol.losses
LOSSES: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("label_smoothing", "ignore_index"),
    "mse": (),
    "l1": (),
    "huber": ("delta",),
    "smooth_l1": ("beta",),
    "bce_with_logits": (),
    "kl_div": ("temperature", "log_target"),
}
OPTIMIZERS = ("sgd", "adamw")  # pol's own (fused exact kernels); torch.optim's classes by their names; or module:Class
TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "NAdam", "RAdam", "Adamax", "ASGD", "Rprop")
SCHEDULES = ("constant", "linear")
SCHEDULERS = ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR",
              "CosineAnnealingWarmRestarts", "OneCycleLR", "CyclicLR", "SequentialLR", "ChainedScheduler")
MAX_PARAM_GROUPS = 16
INITS = ("model", "pol")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_MAX_SEED = MAX_SAFE_INTEGER  # seeds are JCS numbers
_MAX_STEPS = 10**9
MAX_CHECKPOINTS = 1 << 20  # records (checkpoints) a job may have: bounds every list built from a spec
_MAX_KWARGS_BYTES = 1 << 16
_MAX_SPEC_FILE_BYTES = 1 << 20
MAX_BATCH_TENSORS = 32  # named tensors in a batch (inputs and target)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# Defaults for the built-in models, so `pol train --model transformer` works alone. User models name their data.
BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"data": "synthetic", "optimizer": {"name": "adamw", "lr": 1e-3}, "batch_size": 64},
    "cnn": {"data": "images", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "batch_size": 32},
    "transformer": {"data": "chars", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch_size": 16},
    # the model zoo (pol.zoo: tiny transformers models on pol's own data)
    "gpt2": {"data": "tokens", "target": "labels", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch_size": 8},
    "llama": {"data": "tokens", "target": "labels", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch_size": 8},
    "bert": {"data": {"name": "tokens", "kwargs": {"padded": 1}}, "target": "labels", "optimizer": {"name": "adamw", "lr": 3e-3},
             "batch_size": 8},
    "vit": {"data": "pixels", "target": "labels", "optimizer": {"name": "adamw", "lr": 1e-3}, "batch_size": 8},
    "resnet": {"data": "pixels", "target": "labels", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "batch_size": 8},
}


def _fail(field_name: str, problem: str) -> SpecError:
    return SpecError(f"spec field {field_name!r}: {problem}")


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(name, f"{value} is outside [{low}, {high}]")
    return value


def _check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise _fail(name, f"{value} is outside [{low}, {high}]")
    return value


def _check_name(name: str, value: Any) -> str:
    """A batch tensor name: an identifier of at most 64 characters (it becomes a keyword argument)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _fail(name, f"{str(value)[:80]!r} is not a tensor name (an identifier of at most 64 characters)")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(name, f"{value!r} is not one of {', '.join(choices)}")
    return value


_DIST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")  # a normalised distribution name: never a path


@dataclass(frozen=True, slots=True)
class Component:
    """A model or dataset: a built-in name, `module:callable`, or (data only) `dir:PATH` of safetensors files.

    `code`: for `module:callable`, the digest of the named package's code (bound when the spec is resolved,
    `pol.components.compute_code_digest`); None for built-ins and directories, which pol itself defines."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    code: Digest | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 512:
            raise _fail("name", "expected a non-empty string of at most 512 characters")
        if self.code is not None and not is_digest(self.code):
            raise _fail("code", "expected a code digest of 64 lowercase hex characters, or null")
        if self.code is not None and not self.is_user_code:
            raise _fail("code", f"{self.name!r} is not user code (module:callable), so it has no code digest")
        if not isinstance(self.kwargs, Mapping):
            raise _fail("kwargs", "expected a table of keyword arguments")
        try:
            encoded = canonical_bytes(dict(self.kwargs))
        except (TypeError, ValueError) as exc:
            raise _fail("kwargs", f"not canonical JSON: {exc}") from None
        if len(encoded) > _MAX_KWARGS_BYTES:
            raise _fail("kwargs", "too large")
        object.__setattr__(self, "kwargs", json.loads(encoded))

    @property
    def is_user_code(self) -> bool:
        """True for `module:callable` (code pol does not ship)."""
        return _IMPORT_PATH.fullmatch(self.name) is not None and not self.name.startswith("dir:")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs), "code": self.code}

    @staticmethod
    def from_value(value: Any, field_name: str) -> Component:
        """Accept `"name"` or `{"name": ..., "kwargs": {...}}`."""
        if isinstance(value, Component):
            return value
        if isinstance(value, str):
            return Component(value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"name", "kwargs", "code"}
            if unknown or "name" not in value:
                raise _fail(field_name, "expected keys 'name' and optional 'kwargs' and 'code'")
            return Component(value["name"], value.get("kwargs", {}), value.get("code"))
        raise _fail(field_name, f"expected a name or a table, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class GroupRule:
    """A parameter group: the parameters whose name matches `match` (a glob, e.g. "*.bias") and whose owning
    module's class is named `module` (e.g. "LayerNorm"), where given, get a learning rate `lr_scale` times the
    schedule's and, where given, their own `weight_decay`. The first matching rule wins; unmatched parameters form
    the default group."""

    match: str = ""
    module: str = ""
    lr_scale: float = 1.0
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not isinstance(self.module, str) or len(self.match) > 256 or len(self.module) > 128:
            raise _fail("optimizer.param_groups", "match and module are short strings")
        if not (self.match or self.module):
            raise _fail("optimizer.param_groups", "a rule needs a name pattern (match) or a module class name (module)")
        object.__setattr__(self, "lr_scale", _check_float("optimizer.param_groups.lr_scale", self.lr_scale, 0.0, 1e3))
        if self.weight_decay is not None:
            object.__setattr__(self, "weight_decay", _check_float("optimizer.param_groups.weight_decay", self.weight_decay, 0.0, 1e3))

    @staticmethod
    def from_value(value: Any) -> GroupRule:
        if isinstance(value, GroupRule):
            return value
        if not isinstance(value, Mapping) or set(value) - {"match", "module", "lr_scale", "weight_decay"}:
            raise _fail("optimizer.param_groups", "each rule is a table of match, module, lr_scale and weight_decay")
        return GroupRule(**value)


@dataclass(frozen=True, slots=True)
class OptimSpec:
    """Optimizer and its full hyper-parameter schedule. The verifier takes these from the spec, never a checkpoint.

    `name`: pol's own "sgd" / "adamw" (the fields below; fused exact kernels), one of torch.optim's classes by its
    name ("Adam", "RMSprop", ...: `kwargs` are its keyword arguments, `lr` its learning rate), or a user optimizer
    class `module:Class` (a torch.optim.Optimizer taking (params, lr=..., **kwargs); pinned by `code`).
    `scheduler`: one of torch.optim.lr_scheduler's classes by name, with kwargs (SequentialLR/ChainedScheduler take
    "schedulers": a list of such tables), or `module:Class`; else pol's `schedule`. `clip_grad_value` /
    `clip_grad_norm`: gradient clipping before the update (0: off; value first if both). `ema`: a decay for an
    exponential moving average of the parameters, kept in the state as `optim/ema/<param>` (0: off)."""

    name: str = "adamw"
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # pol's sgd only
    beta1: float = 0.9  # pol's adamw only
    beta2: float = 0.999  # pol's adamw only
    eps: float = 1e-8  # pol's adamw only
    weight_decay: float = 0.0  # pol's: decoupled for adamw, L2 for sgd; torch.optim's: in kwargs
    schedule: str = "constant"  # pol's: "constant" or "linear" (warm-up, then linear decay to 10% of lr)
    warmup: int = 0  # warm-up steps of the linear schedule
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # a torch.optim or user optimizer's keyword arguments
    code: Digest | None = None  # a user optimizer's code digest (bound when the spec is resolved)
    scheduler: Component | None = None
    param_groups: tuple[GroupRule, ...] = ()
    clip_grad_value: float = 0.0
    clip_grad_norm: float = 0.0
    ema: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not (self.name in OPTIMIZERS or self.name in TORCH_OPTIMIZERS or _IMPORT_PATH.fullmatch(self.name)):
            raise _fail("optimizer.name", f"{str(self.name)[:80]!r} is not one of {', '.join(OPTIMIZERS)} (pol's), "
                        f"{', '.join(TORCH_OPTIMIZERS)} (torch.optim's) or module:Class")
        _check_float("optimizer.lr", self.lr, 0.0, 1e3)
        if self.lr == 0.0:
            raise _fail("optimizer.lr", "a zero learning rate trains nothing, so a proof of it proves nothing")
        _check_float("optimizer.momentum", self.momentum, 0.0, 1.0)
        _check_float("optimizer.beta1", self.beta1, 0.0, 1.0)
        _check_float("optimizer.beta2", self.beta2, 0.0, 1.0)
        _check_float("optimizer.eps", self.eps, 0.0, 1.0)
        _check_float("optimizer.weight_decay", self.weight_decay, 0.0, 1e3)
        _check_choice("optimizer.schedule", self.schedule, SCHEDULES)
        _check_int("optimizer.warmup", self.warmup, 0, _MAX_STEPS)
        for name in ("lr", "momentum", "beta1", "beta2", "eps", "weight_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "kwargs", _check_kwargs("optimizer.kwargs", self.kwargs))
        if not self.is_pol:
            defaults = OptimSpec()
            moved = [f for f in ("momentum", "beta1", "beta2", "eps", "weight_decay") if getattr(self, f) != getattr(defaults, f)]
            if moved:
                raise _fail("optimizer", f"{moved} are fields of pol's own sgd/adamw; give {self.name}'s arguments in kwargs")
            if set(self.kwargs) & {"lr", "params", "foreach", "fused", "capturable", "differentiable"}:
                raise _fail("optimizer.kwargs", "lr is the field lr; params, foreach, fused, capturable and differentiable are pol's to set")
        elif self.kwargs:
            raise _fail("optimizer.kwargs", f"pol's {self.name} takes its fields (lr, momentum, beta1, ...), not kwargs")
        if self.code is not None and (not is_digest(self.code) or not self.is_user_code):
            raise _fail("optimizer.code", "only a module:Class optimizer has a code digest (64 lowercase hex characters)")
        if self.scheduler is not None:
            object.__setattr__(self, "scheduler", Component.from_value(self.scheduler, "optimizer.scheduler"))
            _check_scheduler(self.scheduler, depth=0)
            if self.schedule != "constant" or self.warmup:
                raise _fail("optimizer.scheduler", "a scheduler replaces pol's schedule: leave schedule constant and warmup 0")
        if isinstance(self.param_groups, (str, bytes)) or not isinstance(self.param_groups, (list, tuple)) or len(self.param_groups) > MAX_PARAM_GROUPS:
            raise _fail("optimizer.param_groups", f"expected a list of at most {MAX_PARAM_GROUPS} rules")
        object.__setattr__(self, "param_groups", tuple(GroupRule.from_value(r) for r in self.param_groups))
        for name in ("clip_grad_value", "clip_grad_norm"):
            object.__setattr__(self, name, _check_float(f"optimizer.{name}", getattr(self, name), 0.0, 1e9))
        object.__setattr__(self, "ema", _check_float("optimizer.ema", self.ema, 0.0, 1.0))
        if self.ema == 1.0:
            raise _fail("optimizer.ema", "a decay of 1 never moves the average; use 0 (off) or a decay below 1")

    @property
    def is_pol(self) -> bool:
        """pol's own sgd/adamw (not a torch.optim or user class)."""
        return self.name in OPTIMIZERS

    @property
    def is_user_code(self) -> bool:
        return _IMPORT_PATH.fullmatch(self.name) is not None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["kwargs"] = dict(self.kwargs)
        out["scheduler"] = self.scheduler.to_dict() if self.scheduler is not None else None
        out["param_groups"] = [dataclasses.asdict(r) for r in self.param_groups]
        return out


def _check_kwargs(field_name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _fail(field_name, "expected a table of keyword arguments")
    try:
        encoded = canonical_bytes(dict(value))
    except (TypeError, ValueError) as exc:
        raise _fail(field_name, f"not canonical JSON: {exc}") from None
    if len(encoded) > _MAX_KWARGS_BYTES:
        raise _fail(field_name, "too large")
    return dict(json.loads(encoded))


def _check_scheduler(c: Component, depth: int) -> None:
    if c.name not in SCHEDULERS and not c.is_user_code:
        raise _fail("optimizer.scheduler", f"{c.name[:80]!r} is not one of {', '.join(SCHEDULERS)} (torch.optim.lr_scheduler's; "
                    "ReduceLROnPlateau and LambdaLR need a metric or a function: write a module:Class) or module:Class")
    if c.name in ("SequentialLR", "ChainedScheduler"):
        inner = c.kwargs.get("schedulers")
        if depth > 2 or not isinstance(inner, list) or not 0 < len(inner) <= 8:
            raise _fail("optimizer.scheduler", f"{c.name} takes schedulers: a list of 1 to 8 scheduler tables (nested at most twice)")
        for item in inner:
            _check_scheduler(Component.from_value(item, "optimizer.scheduler"), depth + 1)
        if any(Component.from_value(item, "optimizer.scheduler").is_user_code for item in inner):
            raise _fail("optimizer.scheduler", "a user scheduler cannot be nested (name it as the scheduler itself)")


METRICS = ("loss", "accuracy")  # built-in evaluation metrics (pol.evaluate); or module:callable


@dataclass(frozen=True, slots=True)
class EvalSpec:
    """Certified evaluation: held-out data (bound by its digest, like the training data) and the metrics computed on
    it at every checkpoint, committed in the trace and recomputed by the verifier for the checkpoints it touches.
    A metric is "loss" (the spec's loss), "accuracy" (argmax of the loss's output against the target) or user code
    `module:callable` (see pol.evaluate)."""

    data: Component
    metrics: tuple[Component, ...] = (Component("loss"),)
    batch_size: int = 256
    data_digest: Digest | None = None  # bound when the spec is resolved

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Component.from_value(self.data, "evaluation.data"))
        if isinstance(self.metrics, (str, bytes, Mapping)) or not isinstance(self.metrics, (list, tuple)) or not 0 < len(self.metrics) <= 8:
            raise _fail("evaluation.metrics", "expected a list of 1 to 8 metrics")
        metrics = tuple(Component.from_value(m, "evaluation.metrics") for m in self.metrics)
        for m in metrics:
            if m.name not in METRICS and not m.is_user_code:
                raise _fail("evaluation.metrics", f"{m.name[:80]!r} is not one of {', '.join(METRICS)} or module:callable")
        if len({m.name for m in metrics}) != len(metrics):
            raise _fail("evaluation.metrics", "names a metric twice")
        object.__setattr__(self, "metrics", metrics)
        _check_int("evaluation.batch_size", self.batch_size, 1, 1 << 20)
        if self.data_digest is not None and not is_digest(self.data_digest):
            raise _fail("evaluation.data_digest", "expected 64 lowercase hex characters")

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data.to_dict(), "metrics": [m.to_dict() for m in self.metrics], "batch_size": self.batch_size,
                "data_digest": self.data_digest}

    @staticmethod
    def from_value(value: Any) -> EvalSpec | None:
        if value is None or isinstance(value, EvalSpec):
            return value
        if not isinstance(value, Mapping) or "data" not in value or set(value) - {"data", "metrics", "batch_size", "data_digest"}:
            raise _fail("evaluation", "expected a table with data and optional metrics, batch_size")
        return EvalSpec(**value)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything needed to re-run a training job bit for bit."""

    model: Component
    data: Component
    loss: Component = field(default_factory=lambda: Component("cross_entropy"))  # built-in (pol.losses) or module:callable
    optimizer: OptimSpec = field(default_factory=OptimSpec)
    batch_size: int = 32
    microbatch: int = 0  # 0: whole batch at once; else the batch is run in micro-batches of this many rows
    steps: int = 200
    every: int = 10  # checkpoint interval k
    seed: int = 0
    numerics: str = "native"  # "native" or "exact"
    dtype: str = "float32"
    inputs: tuple[str, ...] = ()  # batch tensors passed to the model; () = every one but the target (a lone "x" positionally)
    target: str = "y"  # the batch tensor the loss compares the output with
    init: str = "model"  # "model": the model's own initialisation, its draws served by pol.rng; "pol": pol's rule
    output: str = ""  # the part of the model's output the loss reads: "" = the tensor itself, else .logits/["logits"]/[0]; a name or an index picks one
    step_fn: Component | None = None  # a user step, module:callable(model, batch, ctx) -> loss (pol.engine.StepContext)
    evaluation: EvalSpec | None = None  # certified evaluation at every checkpoint
    data_digest: Digest | None = None  # bound by `resolve`; required in a bundle
    versions: Mapping[str, str] = field(default_factory=dict)  # {"pol": ..., "torch": ...}, bound by `resolve`

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Component.from_value(self.model, "model"))
        object.__setattr__(self, "data", Component.from_value(self.data, "data"))
        object.__setattr__(self, "loss", Component.from_value(self.loss, "loss"))
        if self.step_fn is not None:
            object.__setattr__(self, "step_fn", Component.from_value(self.step_fn, "step_fn"))
            if not self.step_fn.is_user_code:
                raise _fail("step_fn", f"{self.step_fn.name[:80]!r} is not module:callable (a function of model, batch and context)")
        object.__setattr__(self, "evaluation", EvalSpec.from_value(self.evaluation))
        if isinstance(self.optimizer, Mapping):
            object.__setattr__(self, "optimizer", optim_from_dict(self.optimizer))
        if not isinstance(self.optimizer, OptimSpec):
            raise _fail("optimizer", "expected a table")
        _check_loss(self.loss)
        _check_int("batch_size", self.batch_size, 1, 1 << 20)
        _check_int("microbatch", self.microbatch, 0, self.batch_size)
        if self.microbatch and self.batch_size % self.microbatch:
            raise _fail("microbatch", f"{self.microbatch} does not divide batch_size {self.batch_size}")
        _check_int("steps", self.steps, 1, _MAX_STEPS)
        _check_int("every", self.every, 1, self.steps)
        if self.n_records > MAX_CHECKPOINTS:
            raise _fail("every", f"{self.steps} steps every {self.every} make {self.n_records} checkpoints, more than {MAX_CHECKPOINTS}")
        _check_int("seed", self.seed, 0, _MAX_SEED)
        _check_choice("numerics", self.numerics, NUMERICS)
        _check_choice("dtype", self.dtype, ("float32",))
        if isinstance(self.inputs, str) or not isinstance(self.inputs, (list, tuple)) or len(self.inputs) > MAX_BATCH_TENSORS:
            raise _fail("inputs", f"expected a list of at most {MAX_BATCH_TENSORS} batch tensor names")
        object.__setattr__(self, "inputs", tuple(_check_name("inputs", n) for n in self.inputs))
        if len(set(self.inputs)) != len(self.inputs):
            raise _fail("inputs", "names a tensor twice")
        _check_choice("init", self.init, INITS)
        _check_name("target", self.target)
        if self.target in self.inputs:
            raise _fail("target", f"{self.target!r} is also an input")
        if not isinstance(self.output, str) or len(self.output) > 64 or (self.output and not (self.output.isidentifier() or self.output.isdigit())):
            raise _fail("output", "expected \"\" (automatic), an output name or an index")
        if self.data_digest is not None and not is_digest(self.data_digest):
            raise _fail("data_digest", "expected 64 lowercase hex characters")
        if not isinstance(self.versions, Mapping) or len(self.versions) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and _DIST_NAME.fullmatch(k) and len(v) <= 128 for k, v in self.versions.items()
        ):
            raise _fail("versions", "expected at most 16 pairs of a distribution name (lowercase letters, digits, '.', "
                        "'-', at most 64) and a short version string")
        object.__setattr__(self, "versions", dict(sorted(self.versions.items())))

    @property
    def is_resolved(self) -> bool:
        """Data digest, code digests and versions bound: the spec has a job id."""
        return (self.data_digest is not None and all(c.code is not None for c in self.user_code)
                and (self.evaluation is None or self.evaluation.data_digest is not None))

    @property
    def components(self) -> tuple[tuple[str, Component], ...]:
        """(role, component) of everything the spec names that may be code: model, data, loss, optimizer (as a
        component: its name, kwargs and code digest) and scheduler."""
        opt = self.optimizer
        out = [("model", self.model), ("data", self.data), ("loss", self.loss), ("optimizer", Component(opt.name, opt.kwargs, opt.code))]
        if opt.scheduler is not None:
            out.append(("scheduler", opt.scheduler))
        if self.step_fn is not None:
            out.append(("step_fn", self.step_fn))
        if self.evaluation is not None:
            out.append(("evaluation.data", self.evaluation.data))
            out.extend((f"evaluation.metrics.{i}", m) for i, m in enumerate(self.evaluation.metrics))
        return tuple(out)

    @property
    def user_code(self) -> tuple[Component, ...]:
        """The components that name user code (`module:callable`), model first."""
        return tuple(c for _, c in self.components if c.is_user_code)

    def with_code(self, role: str, digest: Digest) -> JobSpec:
        """The spec with the code digest of the component `role` (see `components`) bound."""
        if role.startswith("evaluation."):
            assert self.evaluation is not None
            ev = self.evaluation
            if role == "evaluation.data":
                return self.replace(evaluation=dataclasses.replace(ev, data=dataclasses.replace(ev.data, code=digest)))
            i = int(role.rpartition(".")[2])
            metrics = tuple(dataclasses.replace(m, code=digest) if j == i else m for j, m in enumerate(ev.metrics))
            return self.replace(evaluation=dataclasses.replace(ev, metrics=metrics))
        if role == "optimizer":
            return self.replace(optimizer=dataclasses.replace(self.optimizer, code=digest))
        if role == "scheduler":
            assert self.optimizer.scheduler is not None
            return self.replace(optimizer=dataclasses.replace(self.optimizer, scheduler=dataclasses.replace(self.optimizer.scheduler, code=digest)))
        return self.replace(**{role: dataclasses.replace(getattr(self, role), code=digest)})

    @property
    def n_records(self) -> int:
        """Records (checkpoints) of the job: steps 0, k, 2k, ... and the last step. Computed, never enumerated."""
        return -(-self.steps // self.every) + 1

    def checkpoint_step(self, index: int) -> int:
        """The step of record `index` (0 <= index < n_records)."""
        assert 0 <= index < self.n_records, f"record {index} out of range"
        return min(index * self.every, self.steps)

    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps at which the state is committed: 0, k, 2k, ..., and always the last step (at most MAX_CHECKPOINTS)."""
        return [self.checkpoint_step(i) for i in range(self.n_records)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "loss": self.loss.to_dict(),
            "optimizer": self.optimizer.to_dict(),
            "batch_size": self.batch_size,
            "microbatch": self.microbatch,
            "steps": self.steps,
            "every": self.every,
            "seed": self.seed,
            "numerics": self.numerics,
            "dtype": self.dtype,
            "inputs": list(self.inputs),
            "init": self.init,
            "target": self.target,
            "output": self.output,
            "step_fn": self.step_fn.to_dict() if self.step_fn is not None else None,
            "evaluation": self.evaluation.to_dict() if self.evaluation is not None else None,
            "data_digest": self.data_digest,
            "versions": dict(self.versions),
        }

    def canonical(self) -> bytes:
        return canonical_bytes(self.to_dict())

    @property
    def job_id(self) -> Digest:
        """blake3 of the canonical JSON of the resolved spec. Raises SpecError if the spec is not resolved."""
        if self.data_digest is None:
            raise SpecError("the spec has no data digest yet: resolve it against its data first")
        if not self.is_resolved:
            raise SpecError("the spec names user code without its code digest: resolve it where that code is installed")
        return compute_hash("pol/job/v1", self.canonical()).hex()

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)


def _check_loss(loss: Component) -> None:
    if loss.is_user_code:
        return
    if loss.name not in LOSSES:
        raise _fail("loss", f"{loss.name[:80]!r} is not one of {', '.join(LOSSES)} or module:callable")
    unknown = set(loss.kwargs) - set(LOSSES[loss.name])
    if unknown:
        raise _fail("loss", f"{loss.name} takes {list(LOSSES[loss.name]) or 'no arguments'}, not {sorted(unknown)}")
    kw = loss.kwargs
    if "label_smoothing" in kw:
        _check_float("loss.label_smoothing", kw["label_smoothing"], 0.0, 1.0)
    if "ignore_index" in kw:
        _check_int("loss.ignore_index", kw["ignore_index"], -(2**31), 2**31 - 1)
    for name in ("delta", "temperature"):
        if name in kw and _check_float(f"loss.{name}", kw[name], 0.0, 1e6) == 0.0:
            raise _fail(f"loss.{name}", "must be positive")
    if "beta" in kw:
        _check_float("loss.beta", kw["beta"], 0.0, 1e6)
    if "log_target" in kw and not isinstance(kw["log_target"], bool):
        raise _fail("loss.log_target", "expected true or false")


def optim_from_dict(value: Mapping[str, Any]) -> OptimSpec:
    names = {f.name for f in dataclasses.fields(OptimSpec)}
    unknown = set(value) - names
    if unknown:
        raise _fail("optimizer", f"unknown keys {sorted(unknown)}")
    return OptimSpec(**value)


def spec_from_dict(value: Any, *, require_resolved: bool = False) -> JobSpec:
    """Build a spec from parsed JSON/TOML. Raises SpecError naming the field on any problem."""
    if not isinstance(value, Mapping):
        raise SpecError("a spec must be a table of fields")
    names = {f.name for f in dataclasses.fields(JobSpec)}
    unknown = set(value) - names
    if unknown:
        raise SpecError(f"unknown spec fields {sorted(unknown)}")
    if require_resolved:
        missing = names - set(value)
        if missing:
            raise SpecError(f"missing spec fields {sorted(missing)}")
        fields = dict(value)
    else:
        if "model" not in value:
            raise _fail("model", "missing")
        model_name = Component.from_value(value["model"], "model").name
        if model_name not in BUILTIN_DEFAULTS and not _IMPORT_PATH.fullmatch(model_name):
            raise _fail("model", f"unknown model {model_name!r}: use one of {', '.join(BUILTIN_DEFAULTS)} or 'module:callable'")
        fields = {**BUILTIN_DEFAULTS.get(model_name, {}), **value}
        if "data" not in fields:
            raise _fail("data", f"missing (model {model_name!r} is not built in, so it has no default dataset)")
    try:
        spec = JobSpec(**fields)
    except TypeError as exc:  # a wrongly-typed nested value
        raise SpecError(f"invalid spec: {exc}") from None
    if require_resolved and spec.data_digest is None:
        raise _fail("data_digest", "missing")
    if require_resolved and not spec.is_resolved:
        raise _fail("code", f"user code {[c.name for c in spec.user_code if c.code is None]} has no code digest")
    return spec


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a spec file (TOML or JSON, by extension) into a plain dict. Raises SpecError if unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SPEC_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_SPEC_FILE_BYTES:
        raise SpecError(f"spec file {path} is larger than {_MAX_SPEC_FILE_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else parse_json_strict(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise SpecError(f"spec file {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must hold a table of fields")
    return data


@dataclass(frozen=True, slots=True)
class Flags:
    """Command-line flags that override a spec file's fields (None: not given)."""

    model: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    data: str | None = None
    data_kwargs: Mapping[str, Any] | None = None
    steps: int | None = None
    every: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    microbatch: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    numerics: str | None = None


def apply_flags(fields: Mapping[str, Any], flags: Flags) -> dict[str, Any]:
    """The spec fields after `flags` override `fields` (a spec file's, or none). Pure. The model defaults to `mlp`;
    a flag that changes a component's name or kwargs keeps the other half from the file or the built-in defaults.
    `every` is left out unless given, so the caller can size it (`pol.engine.compute_default_every`)."""
    out = dict(fields)
    plain = {"steps": flags.steps, "every": flags.every, "seed": flags.seed, "batch_size": flags.batch_size,
             "microbatch": flags.microbatch, "numerics": flags.numerics}
    out.update({k: v for k, v in plain.items() if v is not None})
    out.setdefault("model", "mlp")
    model_name = Component.from_value(out["model"], "model").name
    for key, name, kwargs in (("model", flags.model, flags.model_kwargs), ("data", flags.data, flags.data_kwargs)):
        if name is not None or kwargs is not None:
            current = out.get(key) or BUILTIN_DEFAULTS.get(model_name, {}).get(key)
            base = dict(current) if isinstance(current, Mapping) else {"name": current}
            base.pop("code", None)  # another component, or other kwargs: its code digest is bound anew
            out[key] = {"name": name or base.get("name"), "kwargs": dict(kwargs) if kwargs is not None else base.get("kwargs", {})}
            if key == "model":
                model_name = out["model"]["name"]
    if flags.lr is not None or flags.optimizer is not None:
        opt = dict(out.get("optimizer") or BUILTIN_DEFAULTS.get(model_name, {}).get("optimizer", {}))
        if flags.lr is not None:
            opt["lr"] = flags.lr
        if flags.optimizer is not None:
            opt["name"] = flags.optimizer
        out["optimizer"] = opt
    return out
