"""The optimizer a spec names, its learning-rate schedule, parameter groups, gradient clipping and EMA weights.

Two kinds of optimizer, one contract (`TrainingOptimizer`): the state is a dict of named tensors
(`optim/<slot>/<param name>`, plus pol's scalars), hyper-parameters come from the spec alone (never from a
checkpoint, where a prover could choose them), and the learning rate of every step is a pure function of the spec
and the step.

- pol's own `sgd` and `adamw` (`apply_update`): plain functions over named tensors, written with the same in-place
  kernels as torch.optim's single-tensor path (lerp_, addcmul_, addcdiv_); in exact numerics AdamW runs as one
  compiled kernel per parameter with the same bits. They differ from torch.optim's classes in one documented way:
  AdamW's bias corrections use running products of the betas kept in the state (`optim/beta1_power`), not
  `beta ** step` through libm's pow, so they are the same on every platform.
- torch.optim's classes by name (`Adam`, `RMSprop`, `NAdam`, ...) and user optimizer classes (`module:Class`): the
  class itself runs the update; pol keeps its per-parameter state in the named-tensor dict (the tensors are shared,
  so the optimizer updates pol's state in place) and sets each group's learning rate before every step. In exact
  numerics they run their single-tensor implementation (`foreach=False`, `fused=False`) under the exact dispatch
  mode like any other operator.

Schedules: pol's `constant`/`linear` (only + - * / on Python floats), or a torch.optim.lr_scheduler class by name
(`LrSchedule`: the learning rate of step s is what that scheduler gives after s steps on a stand-in optimizer with
the job's groups, recomputed by the verifier; schedulers whose formula calls libm's cos/pow, such as
CosineAnnealingLR, inherit its last-bit behaviour, the same on every platform with a correctly-rounded libm such as
glibc's).
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .components import CodePolicy, load_callable
from .errors import ComponentError
from .spec import Component, OptimSpec

__all__ = [
    "init_optimizer_state",
    "compute_lr",
    "apply_update",
    "make_workspace",
    "assign_groups",
    "LrSchedule",
    "TrainingOptimizer",
    "build_optimizer",
]


def init_optimizer_state(opt: OptimSpec, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optimizer's state at step 0, keyed `optim/<slot>/<param name>`."""
    state: dict[str, torch.Tensor] = {}
    if opt.name == "sgd":
        if opt.momentum > 0.0:
            state.update({f"optim/momentum/{n}": torch.zeros_like(p) for n, p in params.items()})
    else:
        state.update({f"optim/exp_avg/{n}": torch.zeros_like(p) for n, p in params.items()})
        state.update({f"optim/exp_avg_sq/{n}": torch.zeros_like(p) for n, p in params.items()})
        # running powers of the betas: multiplied once per step, never computed with pow() (libm-dependent)
        state["optim/beta1_power"] = torch.ones((), dtype=torch.float64)
        state["optim/beta2_power"] = torch.ones((), dtype=torch.float64)
    return state


def make_workspace(opt: OptimSpec, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Scratch memory for `apply_update`, reused every step (AdamW only): as large as the largest parameter."""
    if opt.name != "adamw" or not params:
        return None
    largest = max(params.values(), key=lambda p: p.numel())
    return torch.empty(largest.numel(), dtype=largest.dtype, device=largest.device)


def compute_lr(opt: OptimSpec, step: int, total_steps: int) -> float:
    """Learning rate for the update from state `step` to `step + 1`. Only + - * / on Python floats: portable."""
    if opt.schedule == "constant":
        return opt.lr
    if step < opt.warmup:
        return opt.lr * (step + 1) / opt.warmup
    span = max(total_steps - opt.warmup, 1)
    return opt.lr * (1.0 - 0.9 * (step - opt.warmup) / span)


@torch.no_grad()
def apply_update(
    opt: OptimSpec,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    state: MutableMapping[str, torch.Tensor],
    lr: float,
    workspace: torch.Tensor | None = None,
    exact_kernels: bool = False,
    advance_powers: bool = True,
) -> None:
    """One optimizer step, in place on `params` and `state`: torch.optim's SGD (momentum, no dampening) and AdamW
    (decoupled weight decay) formulas, with hyper-parameters from the spec and beta powers kept as state.

    `workspace` (see `make_workspace`) holds AdamW's temporary: without it each parameter's step allocates one,
    and a fresh large allocation costs more in page faults than the arithmetic does.

    `exact_kernels` (exact numerics, outside a pinpoint capture): an AdamW parameter's step runs as one compiled
    kernel (`pol.exact.native.adamw`) that computes the bits the exact dispatch mode gives this code, where it
    applies; elsewhere this code runs as written.

    `advance_powers`: multiply AdamW's running beta powers in (once per step: the first parameter group does it,
    later groups of the same step read them).
    """
    if opt.name == "sgd":
        for name, p in params.items():
            g = grads[name]
            if opt.weight_decay:
                g = g.add(p, alpha=opt.weight_decay)
            if opt.momentum > 0.0:
                g = state[f"optim/momentum/{name}"].mul_(opt.momentum).add_(g)
            p.add_(g, alpha=-lr)
        return
    b1p = state["optim/beta1_power"]
    b2p = state["optim/beta2_power"]
    if advance_powers:
        b1p.copy_(b1p * opt.beta1)
        b2p.copy_(b2p * opt.beta2)
    bias1 = 1.0 - float(b1p)
    bias2_sqrt = math.sqrt(1.0 - float(b2p))  # IEEE sqrt: correctly rounded everywhere
    step_size = lr / bias1
    for name, p in params.items():
        g = grads[name]
        m = state[f"optim/exp_avg/{name}"]
        v = state[f"optim/exp_avg_sq/{name}"]
        if exact_kernels and _fused_adamw(opt, p, g, m, v, lr, bias2_sqrt, step_size):
            continue
        if opt.weight_decay:
            p.mul_(1.0 - lr * opt.weight_decay)
        m.lerp_(g, 1.0 - opt.beta1)
        v.mul_(opt.beta2).addcmul_(g, g, value=1.0 - opt.beta2)
        fits = workspace is not None and workspace.dtype == v.dtype and workspace.device == v.device
        denom = torch.sqrt(v, out=workspace[: v.numel()].view_as(v)) if fits else torch.sqrt(v)
        denom.div_(bias2_sqrt).add_(opt.eps)
        p.addcdiv_(m, denom, value=-step_size)


def _fused_adamw(
    opt: OptimSpec, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, bias2_sqrt: float, step_size: float
) -> bool:
    """The AdamW step below for one parameter as one compiled exact kernel; False where it does not apply."""
    from pol.exact import native

    return native.adamw(
        p, g, m, v,
        decay=1.0 - lr * opt.weight_decay if opt.weight_decay else None,
        lerp_weight=1.0 - opt.beta1,
        beta2=opt.beta2,
        sq_weight=1.0 - opt.beta2,
        bias2_sqrt=bias2_sqrt,
        eps=opt.eps,
        value=-step_size,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# parameter groups


def assign_groups(opt: OptimSpec, model: nn.Module) -> list[list[str]]:
    """Parameter names per group: group 0 is the default (parameters no rule matches), then one per rule of
    `opt.param_groups`, in order (the first rule a parameter matches takes it). Groups may be empty."""
    owner: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{pname}" if module_name else pname] = type(module).__name__
    groups: list[list[str]] = [[] for _ in range(len(opt.param_groups) + 1)]
    for name, _ in model.named_parameters():
        for i, rule in enumerate(opt.param_groups, start=1):
            if (not rule.match or fnmatch.fnmatchcase(name, rule.match)) and (not rule.module or owner.get(name) == rule.module):
                groups[i].append(name)
                break
        else:
            groups[0].append(name)
    return groups


def _group_options(opt: OptimSpec, index: int) -> tuple[float, float | None]:
    """(lr scale, weight decay override or None) of group `index`."""
    if index == 0:
        return 1.0, None
    rule = opt.param_groups[index - 1]
    return rule.lr_scale, rule.weight_decay


# ---------------------------------------------------------------------------------------------------------------------
# learning-rate schedules


class LrSchedule:
    """The learning rate of each group at each step: a pure function of the spec and the step.

    pol's schedules: `compute_lr` times the group's scale. A torch.optim.lr_scheduler (or user) scheduler: the rates
    it gives after `step` scheduler steps, on a stand-in SGD optimizer holding one scalar per group with the
    group's base rate; stepping forward is incremental, going back rebuilds (a verifier starts at any step)."""

    def __init__(self, opt: OptimSpec, n_groups: int, total_steps: int, code: CodePolicy) -> None:
        self.opt, self.n_groups, self.total_steps, self.code = opt, n_groups, total_steps, code
        self.base = [opt.lr * _group_options(opt, i)[0] for i in range(n_groups)]
        self._at = -1
        self._stand_in: torch.optim.Optimizer | None = None
        self._scheduler: Any = None
        if opt.scheduler is not None:
            self._build()  # a scheduler that cannot be built is refused when the runtime is, not at its first step

    def at(self, step: int) -> list[float]:
        """The learning rate of each group for the update from state `step` to `step + 1`."""
        if self.opt.scheduler is None:
            lr = compute_lr(self.opt, step, self.total_steps)
            return [lr * _group_options(self.opt, i)[0] for i in range(self.n_groups)]
        if self._scheduler is None or step < self._at:
            self._build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": the stand-in never steps
            while self._at < step:
                self._scheduler.step()
                self._at += 1
        assert self._stand_in is not None
        return [float(g["lr"]) for g in self._stand_in.param_groups]

    def _build(self) -> None:
        assert self.opt.scheduler is not None
        groups = [{"params": [torch.zeros((), requires_grad=True)], "lr": lr} for lr in self.base]
        self._stand_in = torch.optim.SGD(groups, lr=self.opt.lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._scheduler = _make_scheduler(self.opt.scheduler, self._stand_in, self.code)
        self._at = 0


def _make_scheduler(c: Component, optimizer: torch.optim.Optimizer, code: CodePolicy) -> Any:
    kwargs = dict(c.kwargs)
    if c.is_user_code:
        cls: Any = load_callable(c.name, code)
    else:
        cls = getattr(torch.optim.lr_scheduler, c.name)
        if c.name in ("SequentialLR", "ChainedScheduler"):
            kwargs["schedulers"] = [_make_scheduler(Component.from_value(item, "optimizer.scheduler"), optimizer, code)
                                    for item in kwargs["schedulers"]]
            if c.name == "ChainedScheduler":
                kwargs.setdefault("optimizer", optimizer)
                return cls(**kwargs)
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ComponentError(f"cannot build scheduler {c.name!r} with {dict(c.kwargs)}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------------
# the optimizer of a runtime


Layout = dict[str, tuple[torch.dtype, tuple[int, ...], bool]]  # state name -> (dtype, shape, lives on the CPU)


@dataclass
class TrainingOptimizer:
    """A runtime's optimizer: its groups, schedule, state layout and update (see the module docstring).

    The state dict (`Runtime.opt_state`) is the truth: `update` reads and writes it, and may add slots a lazily
    initialising optimizer creates at its first step (so the layout depends on the step: `layout(step)`)."""

    spec: OptimSpec
    params: dict[str, nn.Parameter]
    groups: list[list[str]]
    schedule: LrSchedule
    torch_optimizer: torch.optim.Optimizer | None = None  # torch.optim's or a user class; None for pol's own
    _layouts: tuple[Layout, Layout] | None = None  # (at step 0, after a step)
    _scalar_slots: set[str] = field(default_factory=set)  # slots the optimizer keeps as Python numbers

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The optimizer's state at step 0 (EMA weights start as copies of the parameters)."""
        if self.torch_optimizer is None:
            state = init_optimizer_state(self.spec, self.params)
        else:
            fresh = self._construct({n: p for n, p in self.params.items()})
            state = {name: t.detach().clone() for name, t in self._read_state(fresh).items()}
        if self.spec.ema:
            state.update({f"optim/ema/{n}": p.detach().clone() for n, p in self.params.items()})
        return state

    def layout(self, step: int) -> Layout:
        """Every tensor of the optimizer's state at `step`: name -> (dtype, shape, kept on the CPU)."""
        if self._layouts is None:
            self._layouts = self._probe()
        return dict(self._layouts[0 if step == 0 else 1])

    def update(self, grads: Mapping[str, torch.Tensor], state: MutableMapping[str, torch.Tensor], step: int,
               workspace: torch.Tensor | None = None, exact_kernels: bool = False) -> None:
        """One update, in place on the parameters and `state`: clipping, the optimizer, the EMA."""
        lrs = self.schedule.at(step)
        self._clip(grads)
        if self.torch_optimizer is None:
            for index, names in enumerate(self.groups):
                if not names:
                    continue
                _, decay = _group_options(self.spec, index)
                group_spec = self.spec if decay is None else _replace_decay(self.spec, decay)
                apply_update(group_spec, {n: self.params[n] for n in names}, grads, state, lrs[index],
                             workspace, exact_kernels, advance_powers=index == self._first_group)
        else:
            self._torch_update(grads, state, lrs)
        if self.spec.ema:
            with torch.no_grad():
                for n, p in self.params.items():
                    state[f"optim/ema/{n}"].lerp_(p.detach(), 1.0 - self.spec.ema)

    @property
    def _first_group(self) -> int:
        return next((i for i, names in enumerate(self.groups) if names), 0)

    def _clip(self, grads: Mapping[str, torch.Tensor]) -> None:
        if not (self.spec.clip_grad_value or self.spec.clip_grad_norm):
            return
        ordered = [grads[n] for n in self.params]  # the model's parameter order: a fixed reduction order
        with torch.no_grad():
            if self.spec.clip_grad_value:
                for g in ordered:
                    g.clamp_(-self.spec.clip_grad_value, self.spec.clip_grad_value)
            if self.spec.clip_grad_norm:
                norms = torch.stack([torch.linalg.vector_norm(g, 2.0) for g in ordered])
                total = torch.linalg.vector_norm(norms, 2.0)
                coef = torch.clamp(self.spec.clip_grad_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s
                for g in ordered:
                    g.mul_(coef)

    # torch.optim and user classes -------------------------------------------------------------------------------

    def _construct(self, params: Mapping[str, torch.Tensor]) -> torch.optim.Optimizer:
        return _construct_torch(self.spec, params, self.groups, self.schedule.base, self.schedule.code)

    def _torch_update(self, grads: Mapping[str, torch.Tensor], state: MutableMapping[str, torch.Tensor], lrs: Sequence[float]) -> None:
        opt = self.torch_optimizer
        assert opt is not None
        for group, lr in zip(opt.param_groups, lrs, strict=True):
            group["lr"] = lr
        opt.state.clear()
        by_param: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in state.items():
            slot, _, pname = name.removeprefix("optim/").partition("/")
            if pname in self.params and slot != "ema":
                by_param.setdefault(pname, {})[slot] = t.item() if slot in self._scalar_slots else t
        for pname, p in self.params.items():
            p.grad = grads[pname]
            if pname in by_param:
                opt.state[p] = by_param[pname]
        opt.step()
        state.update(self._read_state(opt))

    def _read_state(self, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.params.items()}
        out: dict[str, torch.Tensor] = {}
        for p, slots in opt.state.items():
            for slot, value in slots.items():
                if value is None:
                    continue
                tensor = _state_tensor(self, slot, value)
                out[f"optim/{slot}/{names[id(p)]}"] = tensor
        return out

    def _probe(self) -> tuple[Layout, Layout]:
        """The state layout at step 0 and after one step, found on stand-in parameters (meta tensors: no memory;
        the CPU where an optimizer reads values, e.g. ASGD)."""
        if self.torch_optimizer is None:
            state = init_optimizer_state(self.spec, {n: p.detach().to("meta") for n, p in self.params.items()})
            at0: Layout = {n: (t.dtype, tuple(t.shape), t.dtype == torch.float64) for n, t in state.items()}
            if self.spec.ema:
                at0.update({f"optim/ema/{n}": (p.dtype, tuple(p.shape), False) for n, p in self.params.items()})
            return at0, at0
        for device in ("meta", "cpu"):
            stand_in = {n: nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device)) for n, p in self.params.items()}
            probe = _TorchProbe(self, stand_in)
            try:
                return probe.run()
            except (NotImplementedError, RuntimeError):
                if device == "cpu":
                    raise
        raise AssertionError("unreachable")


@dataclass
class _TorchProbe:
    owner: TrainingOptimizer
    params: dict[str, nn.Parameter]

    def run(self) -> tuple[Layout, Layout]:
        opt = _construct_torch(self.owner.spec, self.params, self.owner.groups, self.owner.schedule.base, self.owner.schedule.code)
        names = {id(p): n for n, p in self.params.items()}

        def read() -> Layout:
            out: Layout = {}
            for p, slots in opt.state.items():
                for slot, value in slots.items():
                    if value is None:
                        continue
                    t = _state_tensor(self.owner, slot, value)
                    on_cpu = slot in self.owner._scalar_slots or (t.device.type == "cpu" and p.device.type != "cpu")
                    out[f"optim/{slot}/{names[id(p)]}"] = (t.dtype, tuple(t.shape), on_cpu)
            return out

        at0 = read()
        for p in self.params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        after = read()
        if self.owner.spec.ema:
            for layout in (at0, after):
                layout.update({f"optim/ema/{n}": (p.dtype, tuple(p.shape), False) for n, p in self.owner.params.items()})
        return at0, after


def _state_tensor(owner: TrainingOptimizer, slot: str, value: Any) -> torch.Tensor:
    """A slot of a torch.optim or user optimizer's per-parameter state as a tensor: tensors as they are, Python
    integers and floats as int64/float64 scalars (remembered, so they go back to the optimizer as numbers). Anything
    else has no canonical form: ComponentError."""
    if "/" in slot:
        raise ComponentError(f"optimizer {owner.spec.name} names a state slot {slot!r}: slot names cannot hold '/'")
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        owner._scalar_slots.add(slot)
        return torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
    raise ComponentError(f"optimizer {owner.spec.name} keeps {slot!r} as {type(value).__name__}: pol checkpoints an "
                         "optimizer's state as tensors and numbers only (never pickle)")


def _construct_torch(spec: OptimSpec, params: Mapping[str, torch.Tensor], groups: list[list[str]], base: Sequence[float],
                     code: CodePolicy) -> torch.optim.Optimizer:
    cls: Any = load_callable(spec.name, code) if spec.is_user_code else getattr(torch.optim, spec.name)
    accepted = set(inspect.signature(cls).parameters)
    kwargs = dict(spec.kwargs)
    kwargs.update({k: False for k in ("foreach", "fused") if k in accepted})  # the single-tensor path: exact mode's
    param_groups = []
    for index, names in enumerate(groups):
        _, decay = _group_options(spec, index)
        group: dict[str, Any] = {"params": [params[n] for n in names], "lr": base[index]}
        if decay is not None:
            group["weight_decay"] = decay
        param_groups.append(group)
    try:
        opt = cls(param_groups, lr=spec.lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ComponentError(f"cannot build optimizer {spec.name!r} with {dict(spec.kwargs)}: {exc}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise ComponentError(f"optimizer {spec.name!r} built a {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _replace_decay(spec: OptimSpec, decay: float) -> OptimSpec:
    import dataclasses

    return dataclasses.replace(spec, weight_decay=decay)


def build_optimizer(spec: OptimSpec, model: nn.Module, params: dict[str, nn.Parameter], total_steps: int,
                    code: CodePolicy) -> TrainingOptimizer:
    """The optimizer of a runtime over `params` (the model's, by name). Raises ComponentError, CodeNotAllowed."""
    groups = assign_groups(spec, model)
    if spec.param_groups and not any(groups[1:]):
        raise ComponentError(f"optimizer.param_groups: no rule matches a parameter of the model "
                             f"(parameters: {', '.join(list(params)[:6])}...)")
    schedule = LrSchedule(spec, len(groups), total_steps, code)
    torch_opt = None if spec.is_pol else _construct_torch(spec, params, groups, schedule.base, code)
    return TrainingOptimizer(spec, params, groups, schedule, torch_opt)
