"""pol from Python, for people who already have a training loop: write the loop body once, as a step function,
and let pol run it, prove it and verify it.

    import pol

    @pol.step
    def train_step(model, batch, ctx):          # the body of your loop, up to the loss
        return ctx.loss(model(batch["x"]), batch)

    job = pol.job(model=make_net, data=make_data, step_fn=train_step, steps=200, batch_size=64,
                  optimizer=pol.optimizer("AdamW", lr=3e-3, weight_decay=0.1, clip_grad_norm=1.0, ema=0.999,
                                          scheduler=("CosineAnnealingLR", {"T_max": 200})))
    pol.train(job, "run")
    pol.verify_bundle("run", allow_code=["mypkg"])

What stays pol's: the data order and batching (pol's keyed order), backward, gradient accumulation over
micro-batches, clipping, the optimizer update, the schedule and the EMA, so that a verifier re-derives each of them
from the spec. Everything here is the same job the CLI and a spec file express: `job` only turns functions and
classes into their import paths (`module:name`), which is what a spec names and pins by code digest. A function
must therefore live at the top level of an importable module (not `__main__`, not a lambda or a closure), since
the verifier imports it by that path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .components import CodePolicy
from .errors import SpecError
from .spec import Component, JobSpec, spec_from_dict

__all__ = ["step", "ref", "job", "optimizer", "train", "verify_bundle"]

F = TypeVar("F", bound=Callable[..., Any])


def ref(obj: Any, *, check_import: bool = True) -> str:
    """The import path `module:qualname` of a top-level function or class, checked (unless `check_import` is
    False) to import back to `obj`. Strings pass through. Raises SpecError for lambdas, closures, methods and code
    in `__main__`."""
    if isinstance(obj, str):
        return obj
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    name = getattr(obj, "__name__", type(obj).__name__)
    if not module or not qualname or "<" in qualname or "." in qualname:
        raise SpecError(f"{name!r} is not a top-level function or class of a module: a verifier imports it by path, "
                        "so define it at the top level of an importable module")
    if module == "__main__":
        raise SpecError(f"{name!r} is defined in the script being run (__main__), which a verifier cannot import: "
                        "move it into a module of your package")
    if not check_import:
        return f"{module}:{qualname}"
    try:
        found = getattr(importlib.import_module(module), qualname, None)
    except ImportError as exc:
        raise SpecError(f"{name!r}: its module {module!r} does not import: {exc}") from None
    if found is not obj and getattr(found, "__wrapped__", None) is not obj:
        raise SpecError(f"{module}:{qualname} does not import back to {name!r} (shadowed or generated at run time)")
    return f"{module}:{qualname}"


def step(fn: F) -> F:
    """Mark a loop body `fn(model, batch, ctx) -> loss` as a pol step (see `pol.engine.StepContext` for `ctx`).
    It checks now, rather than at training time, that `fn` has a path a verifier can import (a top-level function
    of a module other than `__main__`; `job` checks that the path imports back to it)."""
    ref(fn, check_import=False)
    fn.__pol_step__ = True  # type: ignore[attr-defined]
    return fn


def _component(value: Any) -> Any:
    """A spec component from a callable/class, a (callable, kwargs) pair, a name, or a table."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
        return {"name": ref(value[0]), "kwargs": dict(value[1])}
    if isinstance(value, (Mapping, Component)) or value is None:
        return value
    return ref(value)


def optimizer(name: Any, lr: float, *, scheduler: Any = None, clip_grad_norm: float = 0.0, clip_grad_value: float = 0.0,
              ema: float = 0.0, param_groups: Iterable[Mapping[str, Any]] = (), **kwargs: Any) -> dict[str, Any]:
    """An optimizer table: pol's `sgd`/`adamw` (their fields in `kwargs`), torch.optim's class by name or the class
    itself (`torch.optim.AdamW`), or your optimizer class; `kwargs` are its keyword arguments. `scheduler`:
    a torch.optim.lr_scheduler name or class with its kwargs as a pair, e.g. ("CosineAnnealingLR", {"T_max": 200})."""
    import torch

    if isinstance(name, type) and getattr(torch.optim, name.__name__, None) is name:
        name = name.__name__  # torch.optim's own class: by name, no code to pin
    table: dict[str, Any] = {"name": ref(name), "lr": lr, "clip_grad_norm": clip_grad_norm, "clip_grad_value": clip_grad_value,
                             "ema": ema, "param_groups": [dict(g) for g in param_groups]}
    if table["name"] in ("sgd", "adamw"):
        table.update(kwargs)
    else:
        table["kwargs"] = kwargs
    if scheduler is not None:
        sched_name, sched_kwargs = scheduler if isinstance(scheduler, tuple) else (scheduler, {})
        if isinstance(sched_name, type) and getattr(torch.optim.lr_scheduler, sched_name.__name__, None) is sched_name:
            sched_name = sched_name.__name__
        table["scheduler"] = {"name": ref(sched_name), "kwargs": dict(sched_kwargs)}
    return table


def job(**fields: Any) -> JobSpec:
    """A job spec from keyword fields (the fields of a spec file), where `model`, `data`, `loss` and `step_fn` may
    be functions or classes (or `(callable, kwargs)` pairs) and `optimizer` a table from `optimizer()`.
    Raises SpecError."""
    for key in ("model", "data", "loss", "step_fn"):
        if key in fields:
            fields[key] = _component(fields[key])
    if isinstance(fields.get("evaluation"), Mapping):
        ev = dict(fields["evaluation"])
        ev["data"] = _component(ev.get("data"))
        if "metrics" in ev:
            ev["metrics"] = [_component(m) for m in ev["metrics"]]
        fields["evaluation"] = ev
    return spec_from_dict(fields)


def train(spec: JobSpec, out: str | Path, **kwargs: Any) -> Any:
    """Train `spec` with a proof into the bundle directory `out` (`pol.prove.train_and_prove`; its keyword
    arguments: resume, force, device, on_progress, data_dir). Returns its ProveResult."""
    from .prove import train_and_prove

    return train_and_prove(spec, out, **kwargs)


def verify_bundle(path: str | Path, *, allow_code: Iterable[str] = (), **kwargs: Any) -> Any:
    """Verify a bundle (`pol.verify.verify`), importing user code only from the packages in `allow_code`.
    Returns its Report (`.verdict` is "accept" or "reject")."""
    from .verify import verify as run_verify

    return run_verify(path, code=CodePolicy.allowing(allow_code), **kwargs)
