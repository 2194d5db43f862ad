"""The exact dispatch mode: every aten operator of a training step goes to an exact implementation.

Routing, in order (`route_operator`):
  1. random draws                       -> UnsupportedOperator (draws come from the hardware-independent generator)
  2. an exact handler for the overload  -> products, reductions, transcendentals, convolution, pooling, scatter-adds,
                                           layer norm, softmax, log-softmax, GELU, NLL loss and embedding backward
                                           (torch's decompositions written out, one fused kernel per row or element
                                           where it pays), and the split of multi-rounding ops (add/sub with alpha,
                                           addcmul, addcdiv, lerp: one rounding per step, in a fixed order)
  3. pass-through                       -> data movement, comparisons and single-rounding IEEE ops (+ - * /...; not
                                           sqrt: torch's CPU sqrt is not correctly rounded, so it has a handler)
  4. torch's own decomposition         -> the listed ones (other losses and activations...) and any
                                           CompositeImplicitAutograd operator; the decomposition runs under this
                                           mode again, so its pieces are routed too
  5. in-place form `op_` of a routed op  -> computed out of place, then copied into `self`
  6. an operator on integer/bool tensors only -> native (integer arithmetic is exact)
  7. anything else                      -> UnsupportedOperator naming the operator; never a silent native kernel.

The mode keeps a per-instance count of the operators it saw (`ExactMode.seen`), so tests can check that autograd's
backward and the optimizer step were routed through it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
import torch._decomp
from torch.utils._python_dispatch import TorchDispatchMode

from pol.errors import UnsupportedOperator
from pol.exact.operators import (
    DECOMPOSED,
    EXACT_HANDLERS,
    PASSTHROUGH_PACKETS,
    RANDOM_PACKETS,
    SINGLE_ROUNDING_SPLITS,
    Handler,
    OpOverload,
)

__all__ = ["ExactMode", "exact_mode", "route_operator", "supported_operators", "is_supported"]

aten = torch.ops.aten


def _is_float_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _float_only(name: str, func: OpOverload, exact: Handler, allowed: frozenset[torch.dtype]) -> Handler:
    """Run `exact` on inputs of the allowed float dtypes, the native op on integer/bool-only inputs; refuse others."""

    def handler(*args: Any, **kwargs: Any) -> Any:
        floats = [t for t in _tensors(args, kwargs) if t.is_floating_point()]
        if not floats:
            return func(*args, **kwargs)
        if any(t.dtype not in allowed for t in floats):
            raise UnsupportedOperator(name, f"exact mode computes in float32, got {sorted({str(t.dtype) for t in floats})}")
        return exact(*args, **kwargs)

    return handler


_GUARDED: dict[OpOverload, Handler] = {
    op: _float_only(
        str(op),
        op,
        h,
        frozenset((torch.float32, torch.float64)) if op in SINGLE_ROUNDING_SPLITS else frozenset((torch.float32,)),
    )
    for op, h in EXACT_HANDLERS.items()
}


def _inplace_functional(func: OpOverload) -> OpOverload | None:
    """aten.add_.Tensor -> aten.add.Tensor, when that functional overload exists."""
    name = func.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    return getattr(packet, func._overloadname, None)


@cache
def _is_composite(func: OpOverload) -> bool:
    """True for operators defined in terms of other aten operators (CompositeImplicitAutograd)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def supported_operators() -> frozenset[str]:
    """Names of the operators exact mode computes, passes through or decomposes (random draws excluded)."""
    names = {str(op) for op in EXACT_HANDLERS} | {str(op) for op in DECOMPOSED}
    names |= {f"aten.{p}" for p in PASSTHROUGH_PACKETS}
    return frozenset(names)


def is_supported(func: OpOverload) -> bool:
    """True when `route_operator` would not refuse `func` for float32 inputs."""
    packet = func.overloadpacket.__name__
    if packet in RANDOM_PACKETS:
        return False
    if func in EXACT_HANDLERS or func in DECOMPOSED or packet in PASSTHROUGH_PACKETS or _is_composite(func):
        return True
    functional = _inplace_functional(func)
    return functional is not None and is_supported(functional)


def route_operator(mode: ExactMode, func: OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Run one aten operator the exact way (see module docstring). Raises UnsupportedOperator naming it."""
    packet = func.overloadpacket.__name__
    if packet in RANDOM_PACKETS:
        raise UnsupportedOperator(str(func), "random draws must come from the hardware-independent generator")
    handler = _GUARDED.get(func)
    if handler is not None:
        return handler(*args, **kwargs)
    if packet in PASSTHROUGH_PACKETS or func.namespace == "profiler":  # profiler marks (torch.optim's steps) compute nothing
        return func(*args, **kwargs)
    if func in DECOMPOSED:
        with mode:
            return torch._decomp.decomposition_table[func](*args, **kwargs)
    if _is_composite(func):
        with mode:
            return func.decompose(*args, **kwargs)
    functional = _inplace_functional(func)
    if functional is not None and is_supported(functional):
        out = route_operator(mode, functional, args, kwargs)
        args[0].copy_(out)
        return args[0]
    if not any(t.is_floating_point() for t in _tensors(args, kwargs)) and _tensors(args, kwargs):
        return func(*args, **kwargs)
    raise UnsupportedOperator(str(func))


_DIRECT: dict[int, tuple[OpOverload, Handler | None]] = {}
"""Per operator, what `route_operator` would run without needing the mode: its guarded handler, or the C++ op itself
for pass-through; None where routing needs more (a decomposition under the mode, an in-place form, a refusal).
Keyed by id (hashing an OpOverload runs Python code); each entry holds its operator, so no id is ever reused."""


def _direct(func: OpOverload) -> Handler | None:
    packet = func.overloadpacket.__name__
    if packet in RANDOM_PACKETS:
        return None
    handler = _GUARDED.get(func)
    if handler is not None:
        return handler
    if packet in PASSTHROUGH_PACKETS or func.namespace == "profiler":
        return func._op
    if func in DECOMPOSED or _is_composite(func):
        return None
    functional = _inplace_functional(func)
    if functional is None or not is_supported(functional):
        return None
    out_of_place = _direct(functional)
    if out_of_place is None:
        return None

    def in_place(*args: Any, **kwargs: Any) -> Any:  # route_operator's step 5, without its look-ups each call
        args[0].copy_(out_of_place(*args, **kwargs))
        return args[0]

    return in_place


class ExactMode(TorchDispatchMode):
    """TorchDispatchMode that computes every operator exactly or refuses it (see the module docstring).

    `seen` counts the operators routed through this instance by name (its own state; nothing global).
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[int, int] = {}
        self._ops: dict[int, OpOverload] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No dynamo-disable wrapper around __torch_dispatch__ (about 1.2 us per operator): pol never compiles,
        and exact mode refuses to run under torch.compile's tracing anyway (its handlers call C kernels)."""
        return False

    @property
    def seen(self) -> Counter[str]:
        """How often each operator (by name, e.g. "aten.mm.default") was routed through this mode."""
        return Counter({str(self._ops[key]): n for key, n in self._seen.items()})

    def __torch_dispatch__(self, func: OpOverload, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        key = id(func)
        count = self._seen.get(key)
        if count is None:
            self._ops[key] = func
            if key not in _DIRECT:
                _DIRECT[key] = (func, _direct(func))
            count = 0
        self._seen[key] = count + 1
        direct = _DIRECT[key][1]
        if direct is not None:
            return direct(*args, **(kwargs or {}))
        return route_operator(self, func, args, kwargs or {})


def exact_mode() -> ExactMode:
    """A fresh exact dispatch mode, to be used as `with exact_mode(): ...` around forward, backward and the
    optimizer step. Operators it cannot make exact raise `pol.errors.UnsupportedOperator`."""
    return ExactMode()
