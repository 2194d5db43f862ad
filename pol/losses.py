"""The loss a spec names: a built-in (by name, with keyword arguments) or user code (`module:callable`).

Built-ins read one tensor of the model's output (`select_output`: the spec's `output`, or by default the tensor
itself, `.logits`, `["logits"]` or the first element) and the batch's target tensor (the spec's `target`):

| name              | kwargs                                   | formula (mean over the batch)                          |
|-------------------|------------------------------------------|--------------------------------------------------------|
| `cross_entropy`   | `label_smoothing` (0), `ignore_index` (-100) | `F.cross_entropy` over the last dimension; class indices, or class probabilities shaped like the output (mixup) |
| `mse`             |                                          | `F.mse_loss`                                           |
| `l1`              |                                          | `F.l1_loss`                                            |
| `huber`           | `delta` (1.0)                            | `F.huber_loss`                                         |
| `smooth_l1`       | `beta` (1.0)                             | `F.smooth_l1_loss`                                     |
| `bce_with_logits` |                                          | `F.binary_cross_entropy_with_logits` (float targets)   |
| `kl_div`          | `temperature` (1.0), `log_target` (false) | distillation: `T^2 KL(target || softmax(out / T))`, the target being the teacher's probabilities (log-probabilities with `log_target`), "batchmean" over all but the last dimension |

A user loss is `module:callable` called as `loss(output, batch, **kwargs)` with the model's whole output (whatever
it returns) and the batch (a dict of named tensors, the micro-batch the model saw), returning a scalar tensor. It is
user code like a model: pinned by its package's code digest and imported by a verifier only if allowed.

Exact numerics: every built-in runs through the exact dispatch mode like any other operator; `kl_div` with
probability targets uses `xlogy`, which exact numerics does not define yet (refused by name): give
log-probabilities (`log_target = true`) there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .components import CodePolicy, load_callable
from .spec import Component

__all__ = ["LossFn", "build_loss", "select_output"]

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]  # (model output, micro-batch) -> scalar loss


def select_output(out: Any, which: str) -> torch.Tensor:
    """The tensor the loss reads from a model's output: the output itself if it is a tensor; else `which` (a key,
    an attribute or an index), or by default `.logits` / `["logits"]` / the first element. Raises ValueError."""
    if isinstance(out, torch.Tensor) and not which:
        return out
    picked: Any
    if which.isdigit() and isinstance(out, (tuple, list)):
        picked = out[int(which)] if int(which) < len(out) else None
    elif which:
        picked = out.get(which) if isinstance(out, Mapping) else getattr(out, which, None)
    elif isinstance(out, Mapping) or hasattr(out, "logits"):
        picked = out.get("logits") if isinstance(out, Mapping) else out.logits
    elif isinstance(out, (tuple, list)) and out:
        picked = out[0]
    else:
        picked = None
    if not isinstance(picked, torch.Tensor):
        wanted = f"output {which!r}" if which else "a tensor, .logits, ['logits'] or a first element"
        raise ValueError(f"the model returned {type(out).__name__}, with no {wanted} that is a tensor (set the spec's output)")
    return picked


def _cross_entropy(out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    classes = out.shape[-1]
    if y.is_floating_point() and y.shape == out.shape:  # class probabilities (soft labels, mixup): one row per sample
        return F.cross_entropy(out.reshape(-1, classes), y.reshape(-1, classes), label_smoothing=label_smoothing)
    return F.cross_entropy(out.reshape(-1, classes), y.reshape(-1), label_smoothing=label_smoothing, ignore_index=ignore_index)


def _kl_div(out: torch.Tensor, y: torch.Tensor, temperature: float = 1.0, log_target: bool = False) -> torch.Tensor:
    logp = F.log_softmax(out.reshape(-1, out.shape[-1]) / temperature, dim=-1)
    kl = F.kl_div(logp, y.reshape(-1, y.shape[-1]).to(out.dtype), reduction="batchmean", log_target=log_target)
    return kl * (temperature * temperature)


_BUILTIN: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": lambda out, y: F.mse_loss(out, y.to(out.dtype)),
    "l1": lambda out, y: F.l1_loss(out, y.to(out.dtype)),
    "huber": lambda out, y, delta=1.0: F.huber_loss(out, y.to(out.dtype), delta=delta),
    "smooth_l1": lambda out, y, beta=1.0: F.smooth_l1_loss(out, y.to(out.dtype), beta=beta),
    "bce_with_logits": lambda out, y: F.binary_cross_entropy_with_logits(out, y.to(out.dtype)),
    "kl_div": _kl_div,
}


def build_loss(loss: Component, *, output: str, target: str, code: CodePolicy) -> LossFn:
    """The loss function of a spec (`loss`, with the spec's `output` and `target`). User code is imported only if
    `code` allows it. Raises CodeNotAllowed, ComponentError."""
    kwargs = dict(loss.kwargs)
    if loss.is_user_code:
        fn = load_callable(loss.name, code)

        def user_loss(out: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            value = fn(out, batch, **kwargs)
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
                raise TypeError(f"loss {loss.name!r} returned {type(value).__name__} "
                                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}; expected a scalar float tensor")
            return value.reshape(())

        return user_loss
    builtin = _BUILTIN[loss.name]

    def builtin_loss(out: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return builtin(select_output(out, output), batch[target], **kwargs)

    return builtin_loss
