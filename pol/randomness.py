"""Every torch random operator, served from `pol.rng`: the same values on every instruction set and device.

`with random_context(seed, purpose, counters): ...` enters `RandomMode`, a TorchDispatchMode. Each random aten
operator that reaches it and draws values (the position counter then advances by one) is served from the key

    (seed, "torch/" + purpose, [*counters, position])

(`rng.raw_bits`: blake3 of the key -> Philox-4x64 -> raw uint64 draws, integer arithmetic only), computed on the CPU
with numpy and copied to the operator's device and dtype. torch's generators (whose values differ between CPU
instruction sets and devices) are never called; a `generator=` argument is ignored. The step's definition picks the
purpose and counters: e.g. `random_context(seed, "step", [step, microbatch])` around a micro-batch, and
`init_context(seed)` (purpose "init", no counters) around building a model, so that its own `reset_parameters`,
`_init_weights` and `torch.nn.init` calls draw from pol.

The definitions below are part of the protocol (a change alters every draw). `raw[i]` is the i-th raw draw of the
operator's key; element i of the output (row-major, logical order) uses raw[i] unless said otherwise.

- uniform grid: `U24 = (raw >> 40) * 2^-24`, `U53 = (raw >> 11) * 2^-53`, both in [0, 1); float64 outputs use U53,
  every other float dtype U24.
- open uniform: `V = (2 * (raw >> 12) + 1) * 2^-53`, in (0, 1), exact, symmetric (1 - V is on the grid too).
- rounding: values are computed in float64 (fixed operations, each correctly rounded: + - * / sqrt, frexp and
  ldexp; never a libm transcendental), then rounded once to float32 (float64 outputs: not rounded); float16 and
  bfloat16 then take torch's round-to-nearest-even conversion from float32. Complex dtypes are refused.
- log(x): x = m * 2^e with m in [sqrt(1/2), sqrt(2)); s = (m - 1) / (m + 1); log x = e * LN2_HI + (e * LN2_LO +
  2s * P(s^2)), P the series sum_{k<=11} z^k / (2k + 1) in Horner form. exp(x): k = rint(x / ln 2), r = (x - k *
  LN2_HI) - k * LN2_LO, exp x = ldexp(sum_{n<=13} r^n / n! (Horner), k). Constants as in fdlibm.
- standard normal Z: Wichura's AS241 (PPND16) inverse CDF of V, in float64 (tails through the log above and sqrt).
- `uniform_(from, to)`, `rand`: from + (to - from) * U.  `normal_(mean, std)`, `randn`, `normal.*`: mean + std * Z
  (tensor means and stds broadcast).  `exponential_(lambd)`: -log(V) / lambd.  `log_normal_(mean, std)`:
  exp(mean + std * Z).  `cauchy_(median, sigma)`: median + sigma * Z[2i] / Z[2i+1] (two draws per element: the
  ratio of two standard normals is standard Cauchy).  `geometric_(p)`: max(1, ceil(log(V) / log(1 - p))).
- `bernoulli(p)` (float p or tensor p): 1 where `(raw >> 11) < p * 2^53` (exact), else 0, in the output dtype.
- integers on [low, high) (`randint`, `random_`, `randint_like`): span = high - low, b = bit length of span - 1;
  candidates `raw >> (64 - b)` taken in stream order, those >= span rejected (no bias); element i is the i-th
  accepted candidate, plus low. `random_` without bounds: [0, 2^digits] for float dtypes (digits = 24, 53, 11, 8),
  [0, max] for integer dtypes, {0, 1} for bool.
- `randperm(n)`: indices sorted by raw draw, stable (ties by index), as `rng.permutation`.
- `multinomial(w, k, replacement)`, per row r with draws raw[r * m: (r + 1) * m]: with replacement (m = k), sample
  j is the first category whose float64 running sum (left to right) exceeds U53 * total, clamped to the last
  positive category; without replacement (m = categories), keys -log(V) / w (inf for w = 0) and the k smallest
  keys in ascending order, ties by index (Efraimidis-Spirakis).
- dropout (`native_dropout(x, p, train)`): keep = bernoulli(1 - p) as above (so the CPU path of `F.dropout`,
  `bernoulli_(1 - p)` on a float tensor, draws the same mask), out = x * (keep / (1 - p)) computed as the CPU path
  computes it (`div_` then `mul`), mask bool; eval mode, p = 0, p = 1 or an empty input draw nothing and take no
  position (nor does the CPU path). `native_dropout_backward` is served as grad * (mask / (1 - p)), with 1 - p
  remembered from the forward (so the backward matches the CPU path's mul backward); for a scale it did not see,
  grad * mask * scale. Under exact numerics these divisions and products reach ExactMode as single-rounding ops.
- `rrelu_with_noise` in training: noise = U(lower, upper) where x <= 0, else 1; out = x * noise.

Routing in `RandomMode` (`route_random`), for each aten operator:
  1. served (`served_operators()`) -> the definition above; `.out` overloads through their functional twin.
  2. a CompositeImplicitAutograd random operator (dropout variants, RNNs, rrelu, SDPA; they reach a dispatch mode
     under inference_mode) -> its decomposition, run under this mode again, so its draws are served.
  3. a fused kernel with a dropout argument (flash/efficient/cuDNN attention, cuDNN/MIOpen RNN) -> run as is when
     its dropout is 0 or it is not training; otherwise refused (use the math attention backend).
  4. any other random operator (`torch.Tag.nondeterministic_seeded`, or the keyed `_philox_*` float ops) ->
     `UnsupportedOperator` naming it, in both numerics.
  5. everything else -> passed on unchanged (to ExactMode when it is entered below this mode).
torch's global generator is neither read nor advanced (`torch.get_rng_state`, `manual_seed` and `Generator` objects
are not aten operators and never reach a dispatch mode; nothing here calls them).

Stacking: enter RandomMode inside (after) `exact_mode()`. Random operators reach RandomMode first and never
ExactMode; what RandomMode then computes on tensors (the copy of the values, dropout's `div_` and `mul`) reaches
ExactMode as single-rounding operators. The draws themselves are made with every mode disabled.

Observing draws: when the dispatch mode directly below a RandomMode (the next one on torch's mode stack) has a
method `serve_random_draw(mode, func, args, kwargs)` (`DRAW_OBSERVER`), each operator the RandomMode serves itself
from one key (`is_served_draw`: a random operator with a handler, or its `.out` overload) is handed to that method,
which must return what `route_random(mode, func, args, kwargs)` returns (by calling it). pinpoint's operator
capture uses it to record a draw as one node, keyed by `mode.counters` and `mode.position`, that a referee
re-executes under a RandomMode of the same key. Without such a mode nothing changes.

Errors (from `pol.errors`): NumericsError -> UnsupportedOperator(op, why) for a random operator pol cannot serve or
a dtype it does not define. Invalid arguments (a negative probability, ...) raise torch's own RuntimeError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode

from pol import rng
from pol.errors import UnsupportedOperator

__all__ = [
    "RandomMode",
    "random_context",
    "init_context",
    "route_random",
    "served_operators",
    "refused_operators",
    "is_random_operator",
    "is_served_draw",
    "DRAW_OBSERVER",
    "compute_log",
    "compute_exp",
    "compute_uniform01",
    "compute_open_uniform",
    "compute_standard_normal",
    "compute_bounded_ints",
]

aten = torch.ops.aten
OpOverload = torch._ops.OpOverload
Key = tuple[int, str, tuple[int, ...]]
Handler = Callable[["RandomMode", OpOverload, dict[str, Any]], Any]

REFUSAL = "pol cannot serve this random operator reproducibly"
DRAW_OBSERVER = "serve_random_draw"  # the method of a mode below a RandomMode that is handed each served draw

# ----------------------------------------------------------------------------------------------------------------
# Draws: pure functions of (key, count), numpy float64 with fixed, correctly rounded operations.

_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_SQRT_HALF = 0.70710678118654752440
_LOG_SERIES = [1.0 / (2 * k + 1) for k in range(12)]
_EXP_SERIES = [1.0 / math.factorial(n) for n in range(14)]

# Wichura, AS241 (PPND16), Applied Statistics 37 (1988) 477-484; lowest degree first
_A = [3.3871328727963666080e0, 1.3314166789178437745e2, 1.9715909503065514427e3, 1.3731693765509461125e4,
      4.5921953931549871457e4, 6.7265770927008700853e4, 3.3430575583588128105e4, 2.5090809287301226727e3]  # fmt: skip
_B = [1.0, 4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3,
      2.1213794301586595867e4, 3.9307895800092710610e4, 2.8729085735721942674e4, 5.2264952788528545610e3]  # fmt: skip
_C = [1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0, 3.64784832476320460504e0,
      1.27045825245236838258e0, 2.41780725177450611770e-1, 2.27238449892691845833e-2, 7.74545014278341407640e-4]  # fmt: skip
_D = [1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
      1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4, 1.05075007164441684324e-9]  # fmt: skip
_E = [6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0, 2.96560571828504891230e-1,
      2.65321895265761230930e-2, 1.24266094738807843860e-3, 2.71155556874348757815e-5, 2.01033439929228813265e-7]  # fmt: skip
_F = [1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
      7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7, 2.04426310338993978564e-15]  # fmt: skip


def _raw(key: Key, n: int) -> np.ndarray:
    return rng.raw_bits(key[0], key[1], key[2], n)


def _horner(x: np.ndarray, coefficients: Sequence[float]) -> np.ndarray:
    """sum c_i x^i, lowest degree first, one multiply and one add per coefficient (never fused)."""
    acc = np.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc = np.add(np.multiply(acc, x), c)
    return acc


def compute_log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive float64 values from basic operations (see the module docstring)."""
    m, e = np.frexp(x)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    ef = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    return ef * _LN2_HI + (ef * _LN2_LO + (2.0 * s) * _horner(s * s, _LOG_SERIES))


def compute_exp(x: np.ndarray) -> np.ndarray:
    """exp of float64 values from basic operations and ldexp (see the module docstring)."""
    finite = np.isfinite(x)
    safe = np.clip(np.where(finite, x, 0.0), -1100.0, 1100.0)
    k = np.rint(safe * _INV_LN2)
    r = (safe - k * _LN2_HI) - k * _LN2_LO
    with np.errstate(over="ignore", under="ignore"):
        out = np.ldexp(_horner(r, _EXP_SERIES), k.astype(np.int32))
    return np.where(finite, out, np.where(np.isnan(x), x, np.where(x > 0, np.inf, 0.0)))


def compute_uniform01(raw: np.ndarray, bits: int) -> np.ndarray:
    """float64 on the grid k * 2^-bits, k the top `bits` bits of each raw draw."""
    return (raw >> np.uint64(64 - bits)).astype(np.float64) * float(2.0**-bits)


def compute_open_uniform(raw: np.ndarray) -> np.ndarray:
    """float64 (2k + 1) * 2^-53 with k the top 52 bits: in (0, 1), never 0 nor 1."""
    return ((raw >> np.uint64(12)).astype(np.float64) * 2.0 + 1.0) * float(2.0**-53)


def compute_standard_normal(v: np.ndarray) -> np.ndarray:
    """AS241 inverse normal CDF of open uniforms `v`, in float64."""
    q = v - 0.5
    central = np.abs(q) <= 0.425
    r = 0.180625 - q * q
    z_central = q * _horner(r, _A) / _horner(r, _B)
    tail = np.sqrt(-compute_log(np.where(q < 0, v, 1.0 - v)))
    t1, t2 = tail - 1.6, tail - 5.0
    z_tail = np.where(tail <= 5.0, _horner(t1, _C) / _horner(t1, _D), _horner(t2, _E) / _horner(t2, _F))
    return np.where(central, z_central, np.where(q < 0, -z_tail, z_tail))


def compute_bounded_ints(key: Key, n: int, span: int) -> np.ndarray:
    """`n` uint64 uniform on [0, span) by bitmask rejection over the key's stream (see the module docstring)."""
    assert 1 <= span <= 2**64, "span out of range"
    if span == 1 or n == 0:
        return np.zeros(n, dtype=np.uint64)
    bits = (span - 1).bit_length()
    count = n + n // 2 + 16
    while True:
        candidates = _raw(key, count) >> np.uint64(64 - bits)
        accepted = candidates if span == 2**64 else candidates[candidates < np.uint64(span)]
        if len(accepted) >= n:
            return accepted[:n]
        count *= 2


# ----------------------------------------------------------------------------------------------------------------
# From float64 / integer values to the operator's tensors.

_DIGITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def _float_tensor(op: OpOverload, values: np.ndarray, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """CPU tensor of `dtype` from float64 values: kept for float64, else rounded to float32 once, then to `dtype`."""
    if not dtype.is_floating_point:
        raise UnsupportedOperator(str(op), f"{REFUSAL}: pol defines it for floating dtypes, not {dtype}")
    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64 if dtype == torch.float64 else np.float32))
    with _disable_current_modes():
        return flat.reshape(tuple(shape)).to(dtype)


def _int_tensor(values: np.ndarray, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """CPU tensor of `dtype` from uint64 values that are two's-complement int64 (or exact small floats)."""
    with _disable_current_modes():
        as_int = torch.from_numpy(np.ascontiguousarray(values).view(np.int64)).reshape(tuple(shape))
        return as_int if dtype == torch.int64 else as_int.to(dtype)


def _uniform_values(key: Key, n: int, dtype: torch.dtype, low: float, high: float) -> np.ndarray:
    u = compute_uniform01(_raw(key, n), 53 if dtype == torch.float64 else 24)
    return low + (high - low) * u


def _normal_values(key: Key, n: int) -> np.ndarray:
    return compute_standard_normal(compute_open_uniform(_raw(key, n)))


def _as_f64(value: Any, shape: Sequence[int]) -> np.ndarray:
    """A float or a tensor (broadcast to `shape`) as a flat float64 array (exact: every float widens exactly)."""
    if isinstance(value, torch.Tensor):
        with _disable_current_modes():
            t = value.detach().to("cpu", torch.float64).broadcast_to(tuple(shape)).contiguous()
        return t.numpy().reshape(-1)
    return np.full(math.prod(shape), float(value), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# The mode.


class RandomMode(TorchDispatchMode):
    """Serves every random aten operator from `pol.rng` under the key (seed, "torch/" + purpose, [*counters,
    position]), or refuses it by name (see the module docstring). `position` counts the draws made so far."""

    def __init__(self, seed: int, purpose: str, counters: Sequence[int]) -> None:
        super().__init__()
        self.seed = int(seed)
        self.purpose = str(purpose)
        self.counters = tuple(int(c) for c in counters)
        self.position = 0
        self._keep_of_scale: dict[float, float] = {}  # native_dropout: 1/(1-p) -> 1-p, for its backward

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def get_next_key(self) -> Key:
        """The key of the next draw, and advance the position."""
        key = (self.seed, f"torch/{self.purpose}", (*self.counters, self.position))
        self.position += 1
        return key

    def __torch_dispatch__(self, func: OpOverload, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if is_served_draw(func):
            observer = getattr(_get_current_dispatch_mode(), DRAW_OBSERVER, None)
            if observer is not None:
                return observer(self, func, args, kwargs)
        return route_random(self, func, args, kwargs)


def random_context(seed: int, purpose: str, counters: Sequence[int]) -> RandomMode:
    """A RandomMode to enter with `with`: draws keyed by (seed, "torch/" + purpose, [*counters, position])."""
    return RandomMode(seed, purpose, counters)


def init_context(seed: int) -> RandomMode:
    """The context a model is built in: its own initialisation draws from pol, keyed by (seed, "torch/init", [n])."""
    return RandomMode(seed, "init", [])


def route_random(mode: RandomMode, func: OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Serve, decompose, pass on or refuse one operator (the module docstring's routing)."""
    handler = _HANDLERS.get(func)
    if handler is not None:
        return handler(mode, func, _bind(func, args, kwargs))
    if not is_random_operator(func):
        return func(*args, **kwargs)
    out_twin = _out_twin(func)
    if out_twin is not None:
        return _serve_out(mode, func, out_twin, args, kwargs)
    if _has_composite(func):
        with mode:
            return func.decompose(*args, **kwargs)
    if func in _NOT_RANDOM:
        return func(*args, **kwargs)
    bound = _bind(func, args, kwargs)
    dropout = next((bound[n] for n in ("dropout_p", "dropout") if n in bound), None)
    if dropout is not None:
        if float(dropout) == 0.0 or bound.get("train", True) is False:
            return func(*args, **kwargs)
        raise UnsupportedOperator(
            str(func), f"{REFUSAL} (dropout {dropout} inside a fused kernel; use the math attention backend)"
        )
    raise UnsupportedOperator(str(func), REFUSAL)


def _bind(func: OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The operator's arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        else:
            bound[a.name] = a.default_value if a.has_default_value() else None
    if isinstance(bound.get("dtype"), int):  # a schema default such as `ScalarType? dtype=long` is an enum number
        bound["dtype"] = _SCALAR_TYPES[bound["dtype"]]
    return bound


_SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 5: torch.float16,
                 6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16}  # fmt: skip


@cache
def _has_composite(func: OpOverload) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _out_names(func: OpOverload) -> list[str]:
    return [a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write and a.kwarg_only]


@cache
def _out_twin(func: OpOverload) -> OpOverload | None:
    """The served functional overload an `.out` overload computes (same non-out arguments), if any."""
    outs = _out_names(func)
    if not outs:
        return None
    names = [a.name for a in func._schema.arguments if a.name not in outs]
    packet_name = func._schema.name.split("::")[1]
    for packet in (packet_name, f"{packet_name}_functional"):
        pk = getattr(aten, packet, None)
        for overload in pk.overloads() if pk is not None else ():
            twin = getattr(pk, overload)
            if twin in _HANDLERS and [a.name for a in twin._schema.arguments if a.name not in _FACTORY] == names:
                return twin
    return None


_FACTORY = frozenset({"dtype", "layout", "device", "pin_memory"})


def _serve_out(mode: RandomMode, func: OpOverload, twin: OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    bound = _bind(func, args, kwargs)
    outs = [bound.pop(n) for n in _out_names(func)]
    if "size" in bound or "n" in bound:  # a factory: the out tensor gives dtype and device
        bound.update(dtype=outs[0].dtype, device=outs[0].device)
    result = _HANDLERS[twin](mode, twin, bound)
    results = result if isinstance(result, tuple) else (result,)
    for out, value in zip(outs, results, strict=True):
        if out.shape != value.shape:
            out.resize_(value.shape)
        out.copy_(value)
    return tuple(outs) if isinstance(result, tuple) else outs[0]


# ----------------------------------------------------------------------------------------------------------------
# Handlers: (mode, func, bound arguments) -> the operator's result. Values are made on the CPU with every mode
# disabled; only the final copy (and dropout's arithmetic) reaches the modes below.


def _place(values: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """A fresh tensor holding `values` (CPU) on `device` (default: like's, else the CPU), strided like `like`."""
    if like is not None:
        out = torch.empty_like(like, dtype=dtype, device=device)
        return out.copy_(values)
    return values.to(device if device is not None else "cpu")


def _fill_(target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    target.copy_(values)
    return target


def _float_dtype(dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else torch.get_default_dtype()


def _h_uniform(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    self = a["self"]
    key = mode.get_next_key()
    values = _float_tensor(
        func, _uniform_values(key, self.numel(), self.dtype, float(a["from"]), float(a["to"])), self.shape, self.dtype
    )
    return _fill_(self, values) if func is aten.uniform_.default else _place(values, self, self.dtype, None)


def _h_rand(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    like = a.get("self")
    shape = tuple(like.shape) if like is not None else tuple(a["size"])
    dtype = _float_dtype(a.get("dtype")) if like is None else (a.get("dtype") or like.dtype)
    key = mode.get_next_key()
    values = _float_tensor(func, _uniform_values(key, math.prod(shape), dtype, 0.0, 1.0), shape, dtype)
    return _place(values, like, dtype, a.get("device"))


def _h_randn(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    like = a.get("self")
    shape = tuple(like.shape) if like is not None else tuple(a["size"])
    dtype = _float_dtype(a.get("dtype")) if like is None else (a.get("dtype") or like.dtype)
    key = mode.get_next_key()
    values = _float_tensor(func, _normal_values(key, math.prod(shape)), shape, dtype)
    return _place(values, like, dtype, a.get("device"))


def _h_normal_(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    self = a["self"]
    key = mode.get_next_key()
    z = _normal_values(key, self.numel())
    values = _float_tensor(func, float(a["mean"]) + float(a["std"]) * z, self.shape, self.dtype)
    return _fill_(self, values) if func is aten.normal_.default else _place(values, self, self.dtype, None)


def _h_normal(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    """normal.Tensor_float / float_Tensor / Tensor_Tensor / float_float."""
    mean, std = a["mean"], a["std"]
    tensors = [t for t in (mean, std) if isinstance(t, torch.Tensor)]
    if tensors:
        shape = tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
        dtype = torch.result_type(*tensors) if len(tensors) == 2 else tensors[0].dtype
        device = tensors[0].device
    else:
        shape, dtype, device = tuple(a["size"]), _float_dtype(a.get("dtype")), a.get("device")
    key = mode.get_next_key()
    z = _normal_values(key, math.prod(shape))
    values = _float_tensor(func, _as_f64(mean, shape) + _as_f64(std, shape) * z, shape, dtype)
    return _place(values, None, dtype, device)


def _h_exponential(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    self = a["self"]
    lambd = float(a["lambd"])
    if not lambd > 0:
        raise RuntimeError(f"exponential_ expects lambda > 0.0, but found lambda={lambd}")
    key = mode.get_next_key()
    values = _float_tensor(func, -compute_log(compute_open_uniform(_raw(key, self.numel()))) / lambd, self.shape, self.dtype)
    return _fill_(self, values) if func is aten.exponential_.default else _place(values, self, self.dtype, None)


def _h_log_normal(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    self = a["self"]
    key = mode.get_next_key()
    z = _normal_values(key, self.numel())
    values = _float_tensor(func, compute_exp(float(a["mean"]) + float(a["std"]) * z), self.shape, self.dtype)
    return _fill_(self, values) if func is aten.log_normal_.default else _place(values, self, self.dtype, None)


def _h_cauchy(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    self = a["self"]
    key = mode.get_next_key()
    z = compute_standard_normal(compute_open_uniform(_raw(key, 2 * self.numel())))
    values = _float_tensor(func, float(a["median"]) + float(a["sigma"]) * (z[0::2] / z[1::2]), self.shape, self.dtype)
    return _fill_(self, values) if func is aten.cauchy_.default else _place(values, self, self.dtype, None)


def _h_geometric(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    self = a["self"]
    p = float(a["p"])
    if not 0 < p < 1:
        raise RuntimeError(f"geometric_ expects p to be in (0, 1), but got p={p}")
    key = mode.get_next_key()
    v = compute_open_uniform(_raw(key, self.numel()))
    trials = np.maximum(1.0, np.ceil(compute_log(v) / compute_log(np.array([1.0 - p]))))
    values = (_float_tensor(func, trials, self.shape, self.dtype) if self.dtype.is_floating_point
              else _int_tensor(trials.astype(np.int64).view(np.uint64), self.shape, self.dtype))  # fmt: skip
    return _fill_(self, values) if func is aten.geometric_.default else _place(values, self, self.dtype, None)


def _bernoulli_values(key: Key, p: Any, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    probs = _as_f64(p, shape)
    if np.any(~((probs >= 0) & (probs <= 1))):
        raise RuntimeError("bernoulli expects 0 <= p <= 1")
    k = (_raw(key, math.prod(shape)) >> np.uint64(11)).astype(np.float64)
    with _disable_current_modes():
        return torch.from_numpy(k < probs * float(2**53)).reshape(tuple(shape)).to(dtype)


def _h_bernoulli(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    """bernoulli_.float / bernoulli_.Tensor (in place) and bernoulli.default / .p / .Tensor (functional)."""
    self = a["self"]
    p = a.get("p", self)  # bernoulli.default: the probabilities are `self`
    key = mode.get_next_key()
    values = _bernoulli_values(key, p, self.shape, self.dtype)
    return (
        _fill_(self, values)
        if func in (aten.bernoulli_.float, aten.bernoulli_.Tensor)
        else _place(values, self, self.dtype, None)
    )


def _int_range(func: OpOverload, dtype: torch.dtype, low: int | None, high: int | None) -> tuple[int, int]:
    """[low, high) for random_ and friends; a missing bound is the dtype's (see the module docstring)."""
    if dtype.is_complex:
        raise UnsupportedOperator(str(func), f"{REFUSAL}: not defined for {dtype}")
    if high is None:
        if dtype == torch.bool:
            high = 2
        elif dtype.is_floating_point:
            high = 2 ** _DIGITS.get(dtype, 24) + 1
        else:
            high = int(torch.iinfo(dtype).max) + 1
    low = 0 if low is None else int(low)
    if not low < high:
        raise RuntimeError(f"random_ expects 'from' to be less than 'to', but got from={low} >= to={high}")
    return low, int(high)


def _ints(key: Key, shape: Sequence[int], low: int, high: int, dtype: torch.dtype) -> torch.Tensor:
    offsets = compute_bounded_ints(key, math.prod(shape), high - low)
    values = (offsets + np.uint64(low % 2**64)).astype(np.uint64)  # wraps mod 2^64: two's complement of low + k
    if dtype.is_floating_point:
        with _disable_current_modes():
            return torch.from_numpy(values.view(np.int64).astype(np.float64)).reshape(tuple(shape)).to(dtype)
    return _int_tensor(values, shape, dtype)


def _h_random_(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    """random_.default / .from / .to and their functional forms random.*."""
    self = a["self"]
    low, high = _int_range(func, self.dtype, a.get("from"), a.get("to"))
    values = _ints(mode.get_next_key(), self.shape, low, high, self.dtype)
    return _fill_(self, values) if func._schema.name == "aten::random_" else _place(values, self, self.dtype, None)


def _h_randint(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    """randint.* and randint_like.* (a tensor `high` is read as an integer)."""
    like = a.get("self")
    high = a["high"]
    high = int(high.item()) if isinstance(high, torch.Tensor) else int(high)
    low = int(a.get("low") or 0)
    shape = tuple(like.shape) if like is not None else tuple(a["size"])
    dtype = a.get("dtype") or (like.dtype if like is not None else torch.int64)
    if not low < high:
        raise RuntimeError(f"random_ expects 'from' to be less than 'to', but got from={low} >= to={high}")
    values = _ints(mode.get_next_key(), shape, low, high, dtype)
    return _place(values, like, dtype, a.get("device"))


def _h_randperm(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    n = int(a["n"])
    key = mode.get_next_key()
    order = np.argsort(_raw(key, n), kind="stable").astype(np.int64)
    dtype = a.get("dtype") or torch.int64
    with _disable_current_modes():
        values = torch.from_numpy(order).to(dtype)
    return _place(values, None, dtype, a.get("device"))


def _h_multinomial(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    probs, k, replacement = a["self"], int(a["num_samples"]), bool(a["replacement"])
    if probs.dim() not in (1, 2) or not probs.dtype.is_floating_point:
        raise RuntimeError("multinomial expects a 1-D or 2-D floating-point probability tensor")
    with _disable_current_modes():
        w = probs.detach().to("cpu", torch.float64).reshape(-1, probs.shape[-1]).numpy()
    rows, categories = w.shape
    if k <= 0 or (not replacement and k > categories):
        raise RuntimeError(f"multinomial cannot draw {k} samples from {categories} categories (replacement={replacement})")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w.sum(axis=1) <= 0):
        raise RuntimeError("invalid multinomial distribution (encountering probability entry < 0, inf, nan or sum <= 0)")
    if not replacement and np.any((w > 0).sum(axis=1) < k):
        raise RuntimeError(
            "invalid multinomial distribution (with replacement=False, not enough non-negative category to sample)"
        )
    key = mode.get_next_key()
    if replacement:
        cdf = np.add.accumulate(w, axis=1)
        u = compute_uniform01(_raw(key, rows * k), 53).reshape(rows, k)
        last = categories - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
        picks = np.stack([np.minimum(np.searchsorted(cdf[r], u[r] * cdf[r, -1], side="right"), last[r]) for r in range(rows)])
    else:
        keys = -compute_log(compute_open_uniform(_raw(key, rows * categories))).reshape(rows, categories)
        with np.errstate(divide="ignore"):
            keys = np.where(w > 0, keys / np.where(w > 0, w, 1.0), np.inf)
        picks = np.argsort(keys, axis=1, kind="stable")[:, :k]
    with _disable_current_modes():
        out = torch.from_numpy(np.ascontiguousarray(picks, dtype=np.int64)).reshape(*probs.shape[:-1], k)
    return _place(out, None, torch.int64, probs.device)


def _h_native_dropout(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    x, p, train = a["input"], float(a["p"]), a["train"]
    if train is False or x.numel() == 0 or p == 0.0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    if p == 1.0:
        mask = torch.zeros_like(x, dtype=torch.bool)
        return x.mul(mask.to(x.dtype)), mask
    keep = 1.0 - p
    mode._keep_of_scale[1.0 / keep] = keep
    mask = _place(_bernoulli_values(mode.get_next_key(), keep, x.shape, torch.bool), x, torch.bool, None)
    noise = mask.to(x.dtype).div_(keep)
    return x.mul(noise), mask


def _h_native_dropout_backward(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    grad, mask, scale = a["grad_output"], a["mask"], float(a["scale"])
    keep = mode._keep_of_scale.get(scale)
    if keep is None:
        return grad.mul(mask.to(grad.dtype)).mul(scale)
    return grad.mul(mask.to(grad.dtype).div_(keep))


def _rrelu_noise(mode: RandomMode, func: OpOverload, x: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    values = _float_tensor(func, _uniform_values(mode.get_next_key(), x.numel(), x.dtype, lower, upper), x.shape, x.dtype)
    draws = _place(values, x, x.dtype, None)
    return torch.where(x <= 0, draws, torch.ones_like(x))


def _h_rrelu(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> Any:
    """rrelu_with_noise (noise written in place), rrelu_with_noise_ and rrelu_with_noise_functional."""
    x, noise = a["self"], a["noise"]
    if not a["training"]:
        return func(x, noise, a["lower"], a["upper"], False)
    fresh = _rrelu_noise(mode, func, x, float(a["lower"]), float(a["upper"]))
    out = x.mul(fresh)
    if func is aten.rrelu_with_noise_functional.default:
        return out, fresh
    noise.copy_(fresh)
    return x.copy_(out) if func is aten.rrelu_with_noise_.default else out


def _h_rrelu_backward(mode: RandomMode, func: OpOverload, a: dict[str, Any]) -> torch.Tensor:
    if a["training"] and float(a["upper"]) - float(a["lower"]) > 1e-6:
        return a["grad_output"].mul(a["noise"])
    return func(*a.values())


def _handlers() -> dict[OpOverload, Handler]:
    table: dict[str, Handler] = {
        "uniform_.default": _h_uniform, "uniform.default": _h_uniform,
        "rand.default": _h_rand, "rand.generator": _h_rand, "rand_like.default": _h_rand, "rand_like.generator": _h_rand,
        "randn.default": _h_randn, "randn.generator": _h_randn, "randn_like.default": _h_randn,
        "randn_like.generator": _h_randn,
        "normal_.default": _h_normal_, "normal_functional.default": _h_normal_,
        "normal.Tensor_float": _h_normal, "normal.float_Tensor": _h_normal, "normal.Tensor_Tensor": _h_normal,
        "normal.float_float": _h_normal,
        "exponential_.default": _h_exponential, "exponential.default": _h_exponential,
        "log_normal_.default": _h_log_normal, "log_normal.default": _h_log_normal,
        "cauchy_.default": _h_cauchy, "cauchy.default": _h_cauchy,
        "geometric_.default": _h_geometric, "geometric.default": _h_geometric,
        "bernoulli_.float": _h_bernoulli, "bernoulli_.Tensor": _h_bernoulli, "bernoulli.default": _h_bernoulli,
        "bernoulli.p": _h_bernoulli, "bernoulli.Tensor": _h_bernoulli,
        "random_.default": _h_random_, "random_.from": _h_random_, "random_.to": _h_random_,
        "random.default": _h_random_, "random.from": _h_random_, "random.to": _h_random_,
        "randint.default": _h_randint, "randint.generator": _h_randint, "randint.low": _h_randint,
        "randint.low_generator": _h_randint, "randint_like.default": _h_randint, "randint_like.generator": _h_randint,
        "randint_like.Tensor": _h_randint, "randint_like.Tensor_generator": _h_randint,
        "randint_like.low_dtype": _h_randint, "randint_like.low_generator_dtype": _h_randint,
        "randperm.default": _h_randperm, "randperm.generator": _h_randperm,
        "multinomial.default": _h_multinomial,
        "native_dropout.default": _h_native_dropout,
        "native_dropout_backward.default": _h_native_dropout_backward,
        "rrelu_with_noise.default": _h_rrelu, "rrelu_with_noise_.default": _h_rrelu,
        "rrelu_with_noise_functional.default": _h_rrelu,
        "rrelu_with_noise_backward.default": _h_rrelu_backward,
    }  # fmt: skip
    out: dict[OpOverload, Handler] = {}
    for name, handler in table.items():
        packet, overload = name.split(".")
        out[getattr(getattr(aten, packet), overload)] = handler
    return out


_HANDLERS = _handlers()
_NOT_RANDOM = frozenset({aten._fused_sdp_choice.default})  # tagged, but only picks an attention backend
_KEYED_FLOAT_DRAWS = frozenset({"_philox_normal", "_philox_normal_", "_philox_uniform", "_philox_uniform_"})


@cache
def is_random_operator(func: OpOverload) -> bool:
    """Whether torch marks the operator as drawing from a generator (or it is a keyed float draw pol cannot vouch
    for): such operators are served or refused, never run as they are."""
    return torch.Tag.nondeterministic_seeded in func.tags or func._schema.name.split("::")[1] in _KEYED_FLOAT_DRAWS


def is_served_draw(func: OpOverload) -> bool:
    """Whether a RandomMode serves `func` itself from one key: a random operator with a handler, or an `.out`
    overload computed through one (not a decomposed composite, a refused operator or a backward it serves)."""
    return is_random_operator(func) and (func in _HANDLERS or _out_twin(func) is not None)


@cache
def _all_random_operators() -> tuple[OpOverload, ...]:
    found = set()
    for schema in torch._C._jit_get_all_schemas():
        if not schema.name.startswith("aten::"):
            continue
        try:
            op = getattr(getattr(aten, schema.name[6:]), schema.overload_name or "default")
        except (AttributeError, RuntimeError):
            continue
        if isinstance(op, OpOverload) and is_random_operator(op):
            found.add(op)
    return tuple(sorted(found, key=str))


def served_operators() -> list[str]:
    """The random operators pol serves (directly, through a functional twin or by decomposition), by name."""
    served = {str(op) for op in _HANDLERS if is_random_operator(op)}
    served |= {str(op) for op in _all_random_operators() if _out_twin(op) is not None or _has_composite(op)}
    return sorted(served)


def refused_operators() -> list[str]:
    """The random operators pol refuses (fused kernels with dropout: only when their dropout is non-zero)."""
    served = set(served_operators()) | {str(op) for op in _NOT_RANDOM}
    return sorted(str(op) for op in _all_random_operators() if str(op) not in served)
