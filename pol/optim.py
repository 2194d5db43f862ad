"""Optimizers as plain functions over named tensors, with the learning-rate schedule a pure function of the step.

torch.optim keeps hyper-parameters and step counters inside its state, where a prover could choose them. Here the
spec alone fixes them and the state holds only tensors. The update is written with the same in-place kernels as
torch.optim's single-tensor path (lerp_, addcmul_, addcdiv_: the fewest passes over memory, which is what a CPU
optimizer step costs); exact numerics decomposes each of them into single-rounding steps in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

import torch

from .spec import OptimSpec

__all__ = ["init_optimizer_state", "compute_lr", "apply_update", "make_workspace"]


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
) -> None:
    """One optimizer step, in place on `params` and `state`: torch.optim's SGD (momentum, no dampening) and AdamW
    (decoupled weight decay) formulas, with hyper-parameters from the spec and beta powers kept as state.

    `workspace` (see `make_workspace`) holds AdamW's temporary: without it each parameter's step allocates one,
    and a fresh large allocation costs more in page faults than the arithmetic does.

    `exact_kernels` (exact numerics, outside a pinpoint capture): an AdamW parameter's step runs as one compiled
    kernel (`pol.exact.native.adamw`) that computes the bits the exact dispatch mode gives this code, where it
    applies; elsewhere this code runs as written.
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
