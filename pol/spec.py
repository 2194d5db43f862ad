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
    "OptimSpec",
    "JobSpec",
    "Flags",
    "NUMERICS",
    "LOSSES",
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
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "linear")
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
class OptimSpec:
    """Optimizer and its full hyper-parameter schedule. The verifier takes these from the spec, never a checkpoint."""

    name: str = "adamw"  # "sgd" (with momentum) or "adamw"
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    beta1: float = 0.9  # adamw only
    beta2: float = 0.999  # adamw only
    eps: float = 1e-8  # adamw only
    weight_decay: float = 0.0  # decoupled for adamw, L2 for sgd
    schedule: str = "constant"  # "constant" or "linear" (warm-up, then linear decay to 10% of lr)
    warmup: int = 0  # warm-up steps of the linear schedule

    def __post_init__(self) -> None:
        _check_choice("optimizer.name", self.name, OPTIMIZERS)
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


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything needed to re-run a training job bit for bit."""

    model: Component
    data: Component
    loss: str = "cross_entropy"  # "cross_entropy" or "mse"
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
    data_digest: Digest | None = None  # bound by `resolve`; required in a bundle
    versions: Mapping[str, str] = field(default_factory=dict)  # {"pol": ..., "torch": ...}, bound by `resolve`

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Component.from_value(self.model, "model"))
        object.__setattr__(self, "data", Component.from_value(self.data, "data"))
        if isinstance(self.optimizer, Mapping):
            object.__setattr__(self, "optimizer", optim_from_dict(self.optimizer))
        if not isinstance(self.optimizer, OptimSpec):
            raise _fail("optimizer", "expected a table")
        _check_choice("loss", self.loss, LOSSES)
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
        return self.data_digest is not None and all(c.code is not None for c in self.user_code)

    @property
    def user_code(self) -> tuple[Component, ...]:
        """The components that name user code (`module:callable`), model first."""
        return tuple(c for c in (self.model, self.data) if c.is_user_code)

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
            "loss": self.loss,
            "optimizer": dataclasses.asdict(self.optimizer),
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
