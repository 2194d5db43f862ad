"""Capture one training step as an operator graph: a TorchDispatchMode that records every aten operator.

`capture_step(bundle, step)` (or `capture_step_from_state(spec, state)`) runs the step `t -> t+1` exactly as
`pol.engine.run_steps` does, with `CaptureMode` pushed *inside* the numerics context: in exact mode the capture sees
each operator as the program issued it (aten.addmm, aten._softmax, aten.add_...) and hands it on to
`pol.exact.exact_mode()`, so the recorded outputs are the exact ones and the referee can execute any single node
under `exact_mode()` and get the same bits. In native mode the operators run on torch's deterministic kernels.

Inputs are tracked by tensor identity and version counter: a tensor made by an earlier node (or mutated in place
by one) points at that node's output; a tensor the step only reads becomes a `pol.leaf` node named by where it
comes from (`param/...`, `buffer/...`, `optim/...` of the agreed start state, `batch/<name>` (x, y, ...),
`rng/dropout/<layer>/<call>/<row offset>` from pol.rng, `module/<buffer>` for model constants, `const/...` for a
small literal the program makes with `torch.tensor(...)`, its bytes in its name), which the referee can re-derive or
check against the agreed state digest.

A torch random operator (nn.Dropout's `bernoulli_`, `native_dropout`, `rand*`, `randn*`, `normal_`...) is served by
pol's RandomMode, entered by `pol.engine` around each micro-batch above the capture. It hands each draw to
`CaptureMode.serve_random_draw` (`pol.randomness.DRAW_OBSERVER`), which records it as one node: the operator with its
inputs and arguments as the program called it, plus `"draw": [micro-batch, position]`, the key training used
(seed, "torch/step", [step, micro-batch, position]) read from that RandomMode. The key is part of the agreed
structure (a solver claiming another is settled by tracing the step); the referee re-executes the node under a
RandomMode of that key, so a claimed mask or noise that is not pol.rng's is ruled wrong. What the RandomMode runs
to place the values (copies, dropout's scaling) is part of the draw's node; a draw's backward is recorded as the
ordinary operators it runs.

`run_captured_step` runs `pol.engine.one_step` itself, with the capture as a step hook;
a `Fault` makes the capture corrupt one element of one node's output, which is how faulty solvers are built.

Building a runtime follows the trust rule: `code` (a `pol.components.CodePolicy`, default pol's built-ins only)
says which user code the spec may import; anything else is CodeNotAllowed before anything is imported.

Raises CaptureError when a step reads a tensor the capture cannot name or that changed behind its back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from pol import engine
from pol.canonical import Digest, compute_hash
from pol.components import CodePolicy
from pol.digest import state_digest, tensor_digest
from pol.engine import Runtime, StepHooks, build_runtime, capture_state, restore_state
from pol.randomness import RandomMode, route_random
from pol.spec import JobSpec

from .errors import CaptureError
from .graph import LEAF_OP, STATE_OP, InputRef, Node, StepGraph, TensorMeta

__all__ = [
    "Fault",
    "CaptureMode",
    "capture_step",
    "capture_step_from_state",
    "run_captured_step",
    "CapturedStep",
    "compute_value_digest",
    "compute_scalar_digest",
    "compute_uninitialized_digest",
    "is_uninitialized_op",
    "encode_args",
    "decode_args",
    "get_aten_op",
    "compute_flops",
    "get_outputs",
    "get_fault_candidates",
    "is_view_node",
    "compute_constant_name",
    "compute_constant_value",
    "MAX_CONSTANT_BYTES",
]

_VIEW_FREE = 0  # FLOPs of data movement
_UNINITIALIZED = frozenset(("empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"))


@dataclass(frozen=True, slots=True)
class Fault:
    """Corrupt one element of the first floating output of node `node` at step `step` (x -> x + |x| + 1)."""

    step: int
    node: int
    element: int = 0  # taken modulo the output's number of elements


# --- digests and argument encoding -------------------------------------------------------------------------------


def compute_value_digest(t: torch.Tensor) -> Digest:
    """The digest of a tensor value inside a graph (dtype, shape and bytes; no name)."""
    with _disable_current_modes():
        return tensor_digest("", t.detach())


def compute_uninitialized_digest(meta: TensorMeta) -> Digest:
    """The digest standing for the output of an `empty` operator: its dtype and shape, never its (random) bytes."""
    return compute_hash("pinpoint/uninitialized/v1", meta.dtype.encode(), repr(meta.shape).encode()).hex()


def is_uninitialized_op(op: str) -> bool:
    """True for operators whose output holds whatever bytes the allocator had (empty, new_empty_strided...)."""
    return op.split(".")[1] in _UNINITIALIZED if op.count(".") >= 2 else False


def compute_scalar_digest(value: Any) -> Digest:
    """The digest of a host scalar output (`.item()`) or of a missing output (None): its kind and exact value."""
    if value is None:
        kind, text = "none", ""
    elif isinstance(value, bool):
        kind, text = "bool", str(value)
    elif isinstance(value, int):
        kind, text = "int", str(value)
    else:
        kind, text = "float", float(value).hex()
    return compute_hash("pinpoint/scalar/v1", kind.encode(), text.encode()).hex()


def encode_args(value: Any, tensors: list[torch.Tensor], scalars: list[str]) -> Any:
    """Canonical JSON form of an argument tree: tensors -> {"t": i}, floats -> {"f": i}. Raises CaptureError."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"t": len(tensors) - 1}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        scalars.append(value.hex())
        return {"f": len(scalars) - 1}
    if isinstance(value, str):
        return {"s": value}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": "step"}  # the step's own device: parties on CPU and on a GPU record the same structure
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [encode_args(v, tensors, scalars) for v in value]
    raise CaptureError(f"cannot record an argument of type {type(value).__name__}")


def decode_args(value: Any, tensors: list[torch.Tensor], scalars: list[float], device: str = "cpu") -> Any:
    """Inverse of `encode_args`, given the input tensors, the host floats and the device to run on.

    Raises ValueError, KeyError, IndexError.
    """
    if isinstance(value, list):
        return [decode_args(v, tensors, scalars, device) for v in value]
    if not isinstance(value, dict):
        return value
    ((key, item),) = value.items()
    if key == "t":
        return tensors[item]
    if key == "f":
        return scalars[item]
    if key == "s":
        return str(item)
    if key == "device":
        if item != "step":
            raise ValueError(f"unknown device placeholder {item!r}")
        return torch.device(device)
    if key in ("dtype", "layout", "memory_format"):
        got = getattr(torch, str(item))
        expected = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[key]
        if not isinstance(got, expected):
            raise ValueError(f"{item!r} is not a torch {key}")
        return got
    raise ValueError(f"unknown argument tag {key!r}")


def get_aten_op(name: str) -> torch._ops.OpOverload:
    """`aten.addmm.default` -> the operator. Only the aten namespace. Raises ValueError."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        raise ValueError(f"{name!r} is not an aten operator name")
    packet = getattr(torch.ops.aten, parts[1], None)
    op = getattr(packet, parts[2], None) if packet is not None else None
    if not isinstance(op, torch._ops.OpOverload):
        raise ValueError(f"no aten operator {name!r}")
    return op


MAX_CONSTANT_BYTES = 1024  # the largest torch.tensor(literal) a step may read: its bytes are in the leaf's name
_LIFT_FRESH = frozenset(("aten.lift_fresh.default", "aten.lift_fresh_copy.default"))
_CONSTANT_DTYPES = frozenset(("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"))


def compute_constant_name(t: torch.Tensor) -> str:
    """The leaf name of a literal tensor a step makes (`torch.tensor([...])` in the model's code):
    `const/<dtype>/<shape, x-separated>/<bytes as hex>`, so the value is part of the agreed structure and the referee
    re-derives it from the name alone (`compute_constant_value`). Raises CaptureError beyond MAX_CONSTANT_BYTES."""
    dtype = str(t.dtype).removeprefix("torch.")
    with _disable_current_modes():
        size = t.numel() * t.element_size()
        if dtype not in _CONSTANT_DTYPES or size > MAX_CONSTANT_BYTES:
            raise CaptureError(f"the step makes a {tuple(t.shape)} {dtype} literal tensor: only literals of at most "
                               f"{MAX_CONSTANT_BYTES} bytes of a real dtype can be named (their bytes go in the structure)")
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if size else b""
    return f"const/{dtype}/{'x'.join(str(d) for d in t.shape)}/{raw.hex()}"


def compute_constant_value(name: str) -> torch.Tensor:
    """The tensor a `const/...` leaf name spells (little-endian bytes). Raises ValueError."""
    kind, dtype, dims, payload = name.split("/")
    if kind != "const" or dtype not in _CONSTANT_DTYPES:
        raise ValueError(f"{name[:80]!r} is not a constant leaf name")
    shape = tuple(int(d) for d in dims.split("x")) if dims else ()
    raw = bytes.fromhex(payload)
    if len(raw) > MAX_CONSTANT_BYTES or any(d < 0 for d in shape) or dims != "x".join(str(d) for d in shape):
        raise ValueError(f"constant leaf {name[:80]!r}: malformed shape or more than {MAX_CONSTANT_BYTES} bytes")
    with _disable_current_modes():
        out = torch.empty(shape, dtype=getattr(torch, dtype))
        if out.numel() * out.element_size() != len(raw):
            raise ValueError(f"constant leaf {name[:80]!r}: {len(raw)} bytes for a {shape} {dtype} tensor")
        if raw:
            out.reshape(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return out


# --- FLOP estimate and reduction length -------------------------------------------------------------------------

_DATA_MOVEMENT = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "clone", "copy_", "slice", "select",
    "cat", "stack", "split", "split_with_sizes", "unbind", "unsqueeze", "squeeze", "alias", "detach", "_to_copy",
    "lift_fresh", "zeros_like", "ones_like", "empty_like", "full_like", "zeros", "ones", "full", "empty",
    "new_zeros", "new_empty", "new_empty_strided", "empty_strided", "arange", "_local_scalar_dense", "as_strided",
    "embedding", "index_select", "gather", "_reshape_alias", "expand_as", "view_as", "contiguous", "fill_", "zero_",
}


_REDUCTIONS = frozenset(("sum", "mean", "amax", "amin", "max", "min", "var", "std", "linalg_vector_norm", "embedding_dense_backward",
                         "max_pool2d_with_indices_backward"))
_ROW_OPS = {
    "_softmax": 5, "_log_softmax": 5, "_softmax_backward_data": 4, "_log_softmax_backward_data": 4,
    "native_layer_norm": 8, "native_layer_norm_backward": 12, "nll_loss_forward": 2, "nll_loss_backward": 2,
    "mse_loss": 3, "mse_loss_backward": 3, "var_mean": 4, "max_pool2d_with_indices": 1,
}


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def compute_flops(op: str, ins: list[tuple[int, ...]], outs: list[tuple[int, ...]]) -> tuple[int, int]:
    """(FLOP estimate, longest accumulation) of an operator from its input and output shapes.

    Matrix products count 2*M*N*K; convolutions 2 * output elements * (input channels x kernel); their backward
    twice that; reductions one FLOP per input element; softmax, layer norm and losses a few per element (_ROW_OPS);
    data movement none; other operators one per output element.
    """
    packet = op.split(".")[1] if op.count(".") >= 2 else op
    out_n = sum(_numel(s) for s in outs)
    if packet in ("mm", "bmm", "addmm", "baddbmm", "matmul"):
        a, b = (ins[1], ins[2]) if packet in ("addmm", "baddbmm") else (ins[0], ins[1])
        k = a[-1] if a else 1
        return 2 * _numel(outs[0]) * k, k + (1 if packet in ("addmm", "baddbmm") else 0)
    if packet == "convolution" and len(ins) >= 2:
        w = ins[1]
        k = _numel(w[1:])
        return 2 * _numel(outs[0]) * k, k + 1
    if packet == "convolution_backward" and len(ins) >= 3:
        w = ins[2]
        k = _numel(w[1:])
        return 4 * _numel(ins[0]) * k, max(k, _numel(ins[0]) // max(w[0], 1))
    if packet in _DATA_MOVEMENT or packet.rstrip("_") in _DATA_MOVEMENT:
        return _VIEW_FREE, 1
    in_n = max((_numel(s) for s in ins), default=0)
    if packet in _REDUCTIONS:
        return in_n, max(in_n // max(out_n, 1), 1)
    if packet in _ROW_OPS:  # softmax, layer norm, losses and their backward: a few FLOPs per element, rows of the last dim
        per, length = _ROW_OPS[packet], (ins[0][-1] if ins and ins[0] else 1)
        return per * max(in_n, out_n), length
    return max(in_n, out_n), 1


# --- the capture mode --------------------------------------------------------------------------------------------


def _flatten_outputs(out: Any) -> list[Any]:
    if isinstance(out, (tuple, list)):
        return [x for item in out for x in _flatten_outputs(item)]
    return [out]


def _meta(value: Any) -> TensorMeta:
    if isinstance(value, torch.Tensor):
        return TensorMeta("tensor", str(value.dtype).removeprefix("torch."), tuple(value.shape))
    if value is None:
        return TensorMeta("none")
    if isinstance(value, bool):
        return TensorMeta("bool")
    if isinstance(value, int):
        return TensorMeta("int")
    if isinstance(value, float):
        return TensorMeta("float")
    raise CaptureError(f"cannot record an output of type {type(value).__name__}")


def _mutated_args(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    mutated = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, torch.Tensor):
                mutated.append(value)
    return mutated


def get_outputs(func: torch._ops.OpOverload, args: Any, kwargs: Mapping[str, Any], out: Any) -> list[Any]:
    """An operator's outputs as recorded: its returns, flattened, then any argument it wrote that it did not return."""
    outputs = _flatten_outputs(out)
    returned = {id(o) for o in outputs if isinstance(o, torch.Tensor)}
    return outputs + [t for t in _mutated_args(func, tuple(args), kwargs) if id(t) not in returned]


def _is_view_op(func: torch._ops.OpOverload) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _perturb(t: torch.Tensor, element: int) -> None:
    with _disable_current_modes(), torch.no_grad():
        index = element % t.numel()
        coords = []
        for size in reversed(t.shape):
            coords.append(index % size)
            index //= size
        where = tuple(reversed(coords))
        value = t[where].item()
        t[where] = value + abs(value) + 1.0


class CaptureMode(TorchDispatchMode):
    """Records every aten operator dispatched while active, as `Node`s in execution order.

    `leaves` names the tensors the step may read without computing them. `fault` corrupts one node's output.
    `views` collects the positions of operators whose output aliases an input (never a fault target).
    """

    def __init__(self, leaves: Mapping[str, torch.Tensor], fault: Fault | None = None, watch: int | None = None,
                 step: int | None = None) -> None:
        super().__init__()
        self.step = step  # the step captured: its random draws must be keyed by it
        self._inside_draw = 0  # > 0 while pol's RandomMode serves a recorded draw
        self.nodes: list[Node] = []
        self.watch = watch  # copy this node's input and output tensors into `watched` (for a Reveal)
        self.watched: dict[str, torch.Tensor] = {}
        self.views: set[int] = set()
        self.fault = fault
        self.faulted = False
        self._producer: dict[int, tuple[int, int, int]] = {}  # id(tensor) -> (node, output, version)
        self._pending: list[tuple[torch.Tensor, int, int]] = []  # outputs whose version is read at the next op
        self._keep: list[torch.Tensor] = []  # strong references: no id is reused while capturing
        self._leaf_names: dict[int, str] = {}
        for name, t in leaves.items():
            self.add_leaf(name, t)

    def add_leaf(self, name: str, t: torch.Tensor) -> None:
        """Name a tensor the step reads without computing it (it becomes a pol.leaf node when first read)."""
        self._keep.append(t)
        self._leaf_names.setdefault(id(t), name)

    def _emit(self, node: Node) -> None:
        assert node.index == len(self.nodes), "nodes are appended in position order"
        self.nodes.append(node)

    def _register(self, t: torch.Tensor, node: int, output: int) -> None:
        # autograd sets up view version counters and bumps in-place versions after the Python dispatch returns,
        # so the version is read when the next operator (or the state node) arrives
        self._keep.append(t)
        self._pending.append((t, node, output))

    def _settle(self) -> None:
        for t, node, output in self._pending:
            self._producer[id(t)] = (node, output, t._version)
        self._pending.clear()

    def source(self, t: torch.Tensor) -> InputRef:
        """Where an input tensor comes from; a first read of a named leaf emits its pol.leaf node."""
        self._settle()
        known = self._producer.get(id(t))
        if known is not None:
            node, output, version = known
            if version != t._version:
                raise CaptureError(
                    f"a tensor produced by node {node} ({self.nodes[node].op}) was changed in place outside the "
                    "capture's view (through an alias); it cannot be bound to a node output"
                )
            return InputRef(node, output)
        name = self._leaf_names.get(id(t))
        if name is None:
            raise CaptureError(
                f"the step read a {tuple(t.shape)} {t.dtype} tensor that is neither computed in the step nor a named "
                "leaf (state, batch, pol.rng draw or model constant)"
            )
        index = len(self.nodes)
        meta = _meta(t)
        self._emit(Node(index, LEAF_OP, {"name": name}, (), (meta,), (compute_value_digest(t),), (), 0, 1))
        self._keep.append(t)
        self._producer[id(t)] = (index, 0, t._version)
        return InputRef(index, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._inside_draw:  # an operator pol's RandomMode issues while serving a draw: part of the draw's node
            return func(*args, **kwargs)
        if func.namespace == "profiler":  # profiler marks (torch.optim's steps record one) compute nothing: not nodes
            return func(*args, **kwargs)
        return self._record(func, args, kwargs, lambda: func(*args, **kwargs), None)

    def serve_random_draw(self, mode: RandomMode, func: Any, args: Any, kwargs: Mapping[str, Any]) -> Any:
        """Record one torch random operator that pol's RandomMode (the mode above this one) serves as one node.

        The node is the operator with its arguments and inputs as the program called it, plus `"draw":
        [micro-batch, position]`: the key the draw takes, (seed, "torch/step", [step, micro-batch, position]), read
        from the RandomMode that serves it, so it is the key training used. The operators the RandomMode issues to
        place the values (copies, dropout's scaling) run below unrecorded: the referee re-executes the whole draw
        under a RandomMode of that key (`pol.randomness.DRAW_OBSERVER`). Raises CaptureError for a RandomMode that
        is not a step's.
        """
        if mode.purpose != "step" or len(mode.counters) != 2 or (self.step is not None and mode.counters[0] != self.step):
            raise CaptureError(f"a random draw keyed ({mode.purpose!r}, {list(mode.counters)}) inside the capture of "
                               f"step {self.step}: only a step's own draws can be recorded")
        draw = [mode.counters[1], mode.position]

        def serve() -> Any:
            self._inside_draw += 1
            try:
                return route_random(mode, func, args, dict(kwargs))
            finally:
                self._inside_draw -= 1

        return self._record(func, args, dict(kwargs), serve, draw)

    def _record(self, func: Any, args: Any, kwargs: dict[str, Any], run: Callable[[], Any], draw: list[int] | None) -> Any:
        self._settle()
        tensors: list[torch.Tensor] = []
        scalars: list[str] = []
        encoded: dict[str, Any] = {
            "args": [encode_args(a, tensors, scalars) for a in args],
            "kwargs": {k: encode_args(kwargs[k], tensors, scalars) for k in sorted(kwargs)},
        }
        if draw is not None:
            encoded["draw"] = draw
        if str(func) in _LIFT_FRESH:  # torch.tensor(literal): the literal, made outside any mode, is a constant leaf
            self._settle()
            for t in tensors:
                if id(t) not in self._producer and id(t) not in self._leaf_names:
                    self.add_leaf(compute_constant_name(t), t)
        inputs = tuple(self.source(t) for t in tensors)
        in_shapes = [tuple(t.shape) for t in tensors]
        if self.watch == len(self.nodes):
            self._copy("input", tensors)
        out = run()
        index = len(self.nodes)
        outputs = get_outputs(func, args, kwargs, out)
        if _is_view_op(func):
            self.views.add(index)
        if self.fault is not None and self.fault.node == index:
            target = next((o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel()), None)
            if target is None or index in self.views:
                raise CaptureError(f"node {index} ({func}) has no floating, non-view output to corrupt")
            _perturb(target, self.fault.element)
            self.faulted = True
        metas = tuple(_meta(o) for o in outputs)
        if is_uninitialized_op(str(func)):
            digests = tuple(compute_uninitialized_digest(m) if m.kind == "tensor" else compute_scalar_digest(o)
                            for o, m in zip(outputs, metas, strict=True))
        else:
            digests = tuple(compute_value_digest(o) if isinstance(o, torch.Tensor) else compute_scalar_digest(o) for o in outputs)
        flops, reduction = compute_flops(str(func), in_shapes, [m.shape for m in metas if m.kind == "tensor"])
        if self.watch == index:
            self._copy("output", outputs)
        self._emit(Node(index, str(func), encoded, inputs, metas, digests, tuple(scalars), flops, reduction))
        for k, o in enumerate(outputs):
            if isinstance(o, torch.Tensor):
                self._register(o, index, k)
        return out

    def _copy(self, prefix: str, values: list[Any]) -> None:
        with _disable_current_modes():
            for k, v in enumerate(values):
                if isinstance(v, torch.Tensor):
                    self.watched[f"{prefix}/{k}"] = v.detach().clone()

    def finish(self, named: Mapping[str, torch.Tensor], step: int, digest: Digest) -> None:
        """Append the pol.state node: the state the step ends in (inputs by sorted name) and its digest."""
        names = sorted(named)
        inputs = tuple(self.source(named[n]) for n in names)
        index = len(self.nodes)
        if self.watch == index:
            self._copy("input", [named[n] for n in names])
        self._emit(Node(index, STATE_OP, {"names": names, "step": step}, inputs, (TensorMeta("digest"),), (digest,), (), 0, 1))


# --- running a step under the capture ---------------------------------------------------------------------------


def _state_tensors(rt: Runtime) -> dict[str, torch.Tensor]:
    """The live tensors of the runtime under their state names (meta/step excluded: it is a host integer)."""
    named = {f"param/{n}": p for n, p in rt.params.items()}
    named.update({f"buffer/{n}": b for n, b in rt.buffers.items()})
    named.update(rt.opt_state)
    return named


def _module_constants(rt: Runtime) -> dict[str, torch.Tensor]:
    persistent = {f"buffer/{n}" for n in rt.buffers}
    return {f"module/{n}": b for n, b in rt.model.named_buffers() if f"buffer/{n}" not in persistent}


@contextlib.contextmanager
def _named_masks(rt: Runtime, mode: CaptureMode, offset: int) -> Iterator[None]:
    """Wrap each dropout layer's mask source so that its draws become named leaves (made with the capture paused),
    and name a user step's draws from pol's streams (`rng/user/...`, see pol.engine.user_draw_name) likewise."""
    originals = [m.mask_source for m in rt.dropouts]
    rt.on_user_draw = mode.add_leaf
    for layer, module in enumerate(rt.dropouts):
        source = module.mask_source
        calls = [0]

        def named(shape: tuple[int, ...], layer: int = layer, source: Callable[..., torch.Tensor] | None = source,
                  calls: list[int] = calls) -> torch.Tensor:
            assert source is not None
            with _disable_current_modes():
                mask = source(shape)
            mode.add_leaf(f"rng/dropout/{layer}/{calls[0]}/{offset}", mask)
            calls[0] += 1
            return mask

        module.mask_source = named
    try:
        yield
    finally:
        rt.on_user_draw = None
        for module, original in zip(rt.dropouts, originals, strict=True):
            module.mask_source = original


@dataclass(frozen=True, slots=True)
class CapturedStep:
    """What one captured step produced: its nodes, the positions of view operators, its loss and data digest part."""

    nodes: tuple[Node, ...]
    views: frozenset[int]
    loss: float
    data_part: bytes  # the step's contribution to pol.engine's segment data digest
    watched: Mapping[str, torch.Tensor]  # input/<slot> and output/<k> tensors of the watched node


def capture_hooks(rt: Runtime, fault: Fault | None = None, watch: int | None = None) -> tuple[StepHooks, list[CaptureMode]]:
    """Hooks that run the next step of `rt` under a CaptureMode (see `pol.engine.one_step`), and a list that holds
    the mode once the step has started. Leaves are the state as it is when the step starts."""
    s = rt.step
    modes: list[CaptureMode] = []

    def capture(batch: Mapping[str, torch.Tensor]) -> CaptureMode:
        leaves = {**_state_tensors(rt), **_module_constants(rt), **{f"batch/{name}": t for name, t in batch.items()}}
        modes.append(CaptureMode(leaves, fault if fault is not None and fault.step == s else None, watch, step=s))
        return modes[-1]

    return StepHooks(capture, lambda offset: _named_masks(rt, modes[-1], offset)), modes


def verify_fault_applied(mode: CaptureMode, step: int) -> None:
    """Raises CaptureError if the mode's fault named no operator of the step."""
    if mode.fault is not None and not mode.faulted:
        raise CaptureError(f"fault at node {mode.fault.node} of step {step}: the step has only {len(mode.nodes)} operators")


def run_captured_step(rt: Runtime, fault: Fault | None = None, *, microbatch: int | None = None,
                      watch: int | None = None) -> CapturedStep:
    """Run the step `rt.step -> rt.step + 1` through `pol.engine.one_step` under a CaptureMode.

    Raises CaptureError, TrainingError.
    """
    s = rt.step
    hooks, modes = capture_hooks(rt, fault, watch)
    outcome = engine.one_step(rt, microbatch, mode=hooks.mode, around_microbatch=hooks.around_microbatch)
    mode = modes[0]
    verify_fault_applied(mode, s)
    mode.finish(_state_tensors(rt), rt.step, state_digest(capture_state(rt)))
    return CapturedStep(tuple(mode.nodes), frozenset(mode.views), outcome.loss, outcome.data_part, dict(mode.watched))


def is_view_node(node: Node) -> bool:
    """True when the node's operator returns an alias of an input (a view): corrupting it would corrupt its base."""
    if node.op in (LEAF_OP, STATE_OP):
        return False
    return _is_view_op(get_aten_op(node.op))


def get_fault_candidates(graph: StepGraph) -> list[int]:
    """Positions whose corruption is a clean one-operator fault: an aten operator with a float32, initialized,
    non-view tensor output, from which the end state is reachable (so the corruption can change the commitment).

    Float64 outputs (the optimizer's running beta powers) are left out: they reach the arithmetic through `.item()`
    as host floats, which are part of the agreed structure, so corrupting them is settled by a structure dispute.
    """
    import networkx as nx

    from .graph import to_networkx

    feeds_state = nx.ancestors(to_networkx(graph), graph.n - 1)
    return [
        node.index
        for node in graph.nodes
        if node.index in feeds_state and node.op not in (LEAF_OP, STATE_OP) and not is_uninitialized_op(node.op)
        and not is_view_node(node) and node.outputs[0].kind == "tensor" and node.outputs[0].dtype == "float32"
        and _numel(node.outputs[0].shape) > 0
    ]


def capture_step_from_state(spec: JobSpec, state: Mapping[str, torch.Tensor], *, fault: Fault | None = None,
                            device: str = "cpu", runtime: Runtime | None = None, data_dir: str | None = None,
                            code: CodePolicy = CodePolicy()) -> StepGraph:
    """Capture the step that starts from `state` (its `meta/step` says which) of a resolved spec. Without a
    `runtime`, one is built with the user code `code` allows.

    Raises CodeNotAllowed, CodeDiffers (before importing anything), CaptureError, StateMismatch, DataDiffers,
    NumericsUnavailable, TrainingError.
    """
    rt = runtime if runtime is not None else build_runtime(spec, device=device, data_dir=data_dir, code=code)
    restore_state(rt, state)
    step = rt.step
    if step >= spec.steps:
        raise CaptureError(f"step {step} is the last state of the job: there is no step {step} -> {step + 1}")
    start = state_digest(state)
    captured = run_captured_step(rt, fault)
    return StepGraph(spec.job_id, step, spec.numerics, start, captured.nodes)


def capture_step(bundle: Any, step: int, *, fault: Fault | None = None, device: str = "cpu", data_dir: str | None = None,
                 code: CodePolicy = CodePolicy()) -> StepGraph:
    """Capture the operator graph of step `step -> step + 1` of an opened bundle (`pol.bundle.Bundle`), building its
    model and data with the user code `code` allows.

    The state at `step` is the bundle's checkpoint at or before it, replayed forward to `step` if needed.
    Raises CodeNotAllowed, CodeDiffers (before importing anything), CaptureError, BundleError, DigestMismatch and
    what `capture_step_from_state` raises.
    """
    spec = bundle.spec
    if not 0 <= step < spec.steps:
        raise CaptureError(f"step {step} is outside the job's steps 0..{spec.steps - 1}")
    start = max(r.step for r in bundle.records if r.step <= step)
    rt = build_runtime(spec, device=device, data_dir=data_dir, code=code)
    restore_state(rt, bundle.load_state(start))
    engine.run_steps(rt, step)
    return capture_step_from_state(spec, capture_state(rt), fault=fault, runtime=rt)
