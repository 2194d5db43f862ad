"""The referee: given one node whose inputs are agreed, decide whether the solver's claimed output is right.

The referee never replays a step. It executes the single disputed operator on the revealed input tensors (already
checked against the agreed digests by the protocol) and compares:

- **exact numerics**: the operator runs under `pol.exact.exact_mode()`, which gives the same bits on any machine, so
  the ruling is a digest comparison. No tolerance, no false alarms.
- **native numerics**: the operator runs on torch's deterministic kernels, whose last bits depend on the hardware.
  The solver's output (revealed, checked against its digest) is accepted when every element is within a TAO-style
  bound: |claimed - referee| <= 4 * L * eps32 * (|referee| + L * prod(max|input|)) + tiny, where L is the longest
  accumulation inside the operator (K of a matrix product, the reduced length of a sum or a softmax row, 1 for an
  elementwise operator) and the product runs over the (at most two) multiplied inputs. This is the classical
  gamma_L bound on a length-L dot product, widened by the magnitude of the terms; it is loose on purpose (honest
  hardware differences are a few ulps) and still far below the one-element corruption a fault makes.

A torch random operator (dropout, noise) is a node keyed by its agreed `draw` argument [micro-batch, position]: the
referee re-executes it under `pol.randomness.random_context(seed, "step", [step, micro-batch])` at that position,
as training drew it, from the job's seed and the disputed step (no model, data or user code), and rules on its
digest in both numerics (pol.rng's draws are the same bits on every machine). A random operator without a key, or
a key on an operator that draws nothing, is ruled wrong: the referee never calls torch's own generators.

Virtual nodes cost no floating-point work: a `pol.leaf` is re-derived (batch from the data, dropout mask from
pol.rng, model constant from the model's constructor, a literal `const/...` from its name) or checked against the agreed start state's per-tensor
digests; `pol.state` re-hashes the revealed end-state tensors.

`compute_ruling` is the referee's move in the protocol: it turns a dispute waiting in phase `ruling` into a Ruling.
What the referee builds follows the trust rule (DESIGN section 8): operator nodes (random draws included), state
leaves, literal `const/` leaves and the state node need nothing but the revealed tensors, the spec's seed and the
node; a leaf that must be re-derived (batch, dropout mask, model constant) and a
structure dispute (a traced step) build the spec's model and data, and only with code the `CodePolicy` allows
(pol's built-ins always): otherwise CodeNotAllowed, "cannot check", before anything is imported. The data it builds
must be the committed data (else DataDiffers).

`compute_verdict` returns the number of aten operators it executed (counted by a dispatch mode), so tests can
assert the referee's work is one operator.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pol.canonical import MAX_SAFE_INTEGER, Digest
from pol.components import CodePolicy
from pol.data import build_dataset, data_digest
from pol.digest import state_digest
from pol.engine import compute_user_draw, dropout_mask, parse_user_draw_name, step_batch, verify_code
from pol.errors import DataDiffers, StateMismatch
from pol.models import SeededDropout, build_model
from pol.numerics import numerics_context
from pol.randomness import is_random_operator, is_served_draw, random_context
from pol.spec import JobSpec

from .capture import (
    compute_constant_value,
    compute_scalar_digest,
    compute_uninitialized_digest,
    compute_value_digest,
    decode_args,
    get_aten_op,
    get_outputs,
    is_uninitialized_op,
)
from .errors import OutOfTurn
from .graph import LEAF_OP, POINTABLE, STATE_OP, STATE_PREFIXES, Node, is_pointable, is_state_leaf
from .messages import CHALLENGER, REFEREE, SOLVER, Reveal, Ruling, StateReveal
from .protocol import DisputeState, decode_tensors, verify_reveal

__all__ = [
    "Verdict",
    "compute_ruling",
    "compute_verdict",
    "compute_leaf_value",
    "compute_native_bound",
    "is_state_leaf",
    "is_pointable",
    "compute_referee_cost",
    "STATE_PREFIXES",
    "POINTABLE",
    "MAX_DERIVED_ELEMENTS",
]

MAX_DERIVED_ELEMENTS = 1 << 28  # elements of a leaf the referee re-derives from a claimed shape (a dropout mask)
_EPS32 = float(torch.finfo(torch.float32).eps)
MAX_OUTPUT_BYTES = 1 << 30  # the most one executed operator may allocate for its outputs (as a reveal may carry)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the solver's claim at the node holds, why, and what the referee spent deciding it."""

    solver_correct: bool
    reason: str
    executed: int  # aten operators the referee executed (1 for an operator node, 0 for leaves and the state node)
    flops: int
    seconds: float


class _CountingMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _slice_for_element(op: str, args: list[Any], shape: tuple[int, ...], element: int) -> list[Any]:
    """The operands of a 1 x 1 product giving output element `element` of a product of output shape `shape`."""
    if op == "aten.bmm.default":
        batch, rest = divmod(element, shape[1] * shape[2])
        i, j = divmod(rest, shape[2])
        return [args[0][batch : batch + 1, i : i + 1], args[1][batch : batch + 1, :, j : j + 1]]
    i, j = divmod(element, shape[1])
    if op == "aten.mm.default":
        return [args[0][i : i + 1], args[1][:, j : j + 1]]
    bias = args[0]
    if isinstance(bias, torch.Tensor) and bias.dim() == 1:
        bias = bias[j : j + 1] if bias.shape[0] > 1 else bias
    elif isinstance(bias, torch.Tensor) and bias.dim() == 2:
        r, c = (i if bias.shape[0] > 1 else 0), (j if bias.shape[1] > 1 else 0)
        bias = bias[r : r + 1, c : c + 1]
    return [bias, args[1][i : i + 1], args[2][:, j : j + 1], *args[3:]]


def compute_referee_cost(node: Node) -> int:
    """FLOPs the referee spends if the dispute ends on `node`: one dot product for a matrix product (pointed),
    the operator's FLOPs otherwise, nothing for leaves and the state node (hashing only)."""
    if node.op in (LEAF_OP, STATE_OP):
        return 0
    if is_pointable(node.op):
        return 2 * node.reduction - (1 if node.op == "aten.addmm.default" else 0)
    return node.flops


def compute_leaf_value(spec: JobSpec, step: int, name: str, shape: tuple[int, ...], *, data_dir: str | None = None,
                       code: CodePolicy = CodePolicy()) -> torch.Tensor:
    """Re-derive a non-state leaf of step `step` from the spec alone, building the spec's data or model with the
    code `code` allows. Raises ValueError for an unknown leaf name or a shape beyond MAX_DERIVED_ELEMENTS,
    CodeNotAllowed and CodeDiffers (before importing anything), DataDiffers (the data here is not the committed
    data), and what building the data or model raises."""
    if name.startswith("batch/"):
        verify_code(spec, code)
        dataset = build_dataset(spec.data.name, spec.data.kwargs, data_dir=data_dir, code=code)
        if spec.data_digest is not None and data_digest(dataset) != spec.data_digest:
            raise DataDiffers(spec.data_digest, data_digest(dataset))
        if name.removeprefix("batch/") not in dataset.tensors:
            raise ValueError(f"the data holds no tensor {name.removeprefix('batch/')!r}")
        return step_batch(spec, dataset, step)[1][name.removeprefix("batch/")]
    if name.startswith("rng/dropout/"):
        layer, call, offset = (int(p) for p in name.removeprefix("rng/dropout/").split("/"))
        mask_shape = (spec.batch_size, *shape[1:])
        if not shape or math.prod(mask_shape) > MAX_DERIVED_ELEMENTS:
            raise ValueError(f"a dropout mask of shape {mask_shape} is beyond the {MAX_DERIVED_ELEMENTS} elements a referee derives")
        verify_code(spec, code)
        dropouts = [m for m in build_model(spec.model, code).modules() if isinstance(m, SeededDropout)]
        full = dropout_mask(spec, step, layer, call, mask_shape, dropouts[layer].p)
        return full[offset : offset + shape[0]]
    if name.startswith("rng/user/"):  # a user step's draw from pol's streams: keyed by (seed, purpose, step, micro-batch)
        microbatch, kind, params, purpose = parse_user_draw_name(name)
        if math.prod(shape) > MAX_DERIVED_ELEMENTS:
            raise ValueError(f"a user-stream draw of shape {shape} is beyond the {MAX_DERIVED_ELEMENTS} elements a referee derives")
        return compute_user_draw(spec.seed, step, microbatch, kind, purpose, params, tuple(shape))
    if name.startswith("const/"):  # a literal the program makes (torch.tensor([...])): its bytes are in its name
        return compute_constant_value(name)
    if name.startswith("module/"):
        verify_code(spec, code)
        # built as the solver built it: under pol's generator when the model initialises itself (a buffer may be random)
        model = build_model(spec.model, code, init_seed=spec.seed if spec.init == "model" else None)
        return dict(model.named_buffers())[name.removeprefix("module/")]
    raise ValueError(f"unknown leaf {name!r}")


def compute_native_bound(node: Node, inputs: list[torch.Tensor], reference: torch.Tensor) -> torch.Tensor:
    """The per-element tolerance for a native-mode output (see the module docstring)."""
    length = max(node.reduction, 1)
    floats = [t for t in inputs if t.is_floating_point() and t.numel()]
    terms = 0.0
    if length > 1 and floats:
        terms = float(length) * math.prod(float(t.abs().max()) for t in floats[:2])
    ref = reference.detach().to(torch.float64).abs()
    return 4.0 * length * _EPS32 * (ref + terms) + 1e-30


def _outputs_match(node: Node, outputs: list[Any], inputs: list[torch.Tensor], claimed: Mapping[str, torch.Tensor],
                   numerics: str) -> tuple[bool, str]:
    if len(outputs) != len(node.outputs):
        return False, f"the operator gives {len(outputs)} outputs, the claim has {len(node.outputs)}"
    uninitialized = is_uninitialized_op(node.op)
    for k, (value, meta, digest) in enumerate(zip(outputs, node.outputs, node.digests, strict=True)):
        if isinstance(value, torch.Tensor):
            if meta.kind != "tensor" or (meta.dtype, meta.shape) != (str(value.dtype).removeprefix("torch."), tuple(value.shape)):
                return False, f"output {k}: claimed {meta.kind} {meta.dtype} {meta.shape}, got {value.dtype} {tuple(value.shape)}"
            if uninitialized:
                if digest != compute_uninitialized_digest(meta):
                    return False, f"output {k}: an uninitialized output has no value digest to claim"
                continue
            if compute_value_digest(value) == digest:
                continue
            if numerics == "exact":
                return False, f"output {k} differs from the exact result (digest {digest[:16]} != {compute_value_digest(value)[:16]})"
            mine = claimed.get(f"output/{k}")
            if mine is None or not mine.is_floating_point():
                return False, f"output {k} differs and no floating-point claimed output was revealed to compare within tolerance"
            diff = (mine.to(torch.float64) - value.to(torch.float64)).abs()
            bound = compute_native_bound(node, inputs, value)
            if not bool(torch.all(diff <= bound)):
                worst = int(torch.argmax(diff - bound))
                return False, f"output {k} element {worst} is off by {float(diff.flatten()[worst]):.3g}, beyond the native tolerance {float(bound.flatten()[worst]):.3g}"
        elif compute_scalar_digest(value) != digest:
            return False, f"output {k}: the host scalar differs ({value!r})"
    return True, "the claimed output is what the operator computes"


def _verdict_leaf(spec: JobSpec, step: int, node: Node, tensors: Mapping[str, torch.Tensor], data_dir: str | None,
                  code: CodePolicy) -> tuple[bool, str]:
    name = str(node.args["name"])
    meta = node.outputs[0]
    if is_state_leaf(name):
        value = tensors["leaf"]  # bound to the agreed start state by the protocol before the referee is asked
    else:
        try:
            value = compute_leaf_value(spec, step, name, meta.shape, data_dir=data_dir, code=code)
        except (ValueError, IndexError, KeyError) as exc:
            return False, f"leaf {name!r} cannot be derived from the spec: {exc}"
    if compute_value_digest(value) != node.digests[0]:
        return False, f"leaf {name!r} is not the tensor the step reads (digest {node.digests[0][:16]} != {compute_value_digest(value)[:16]})"
    return True, f"leaf {name!r} is the tensor the step reads"


def _verdict_state(node: Node, tensors: Mapping[str, torch.Tensor], claimed_end: Digest) -> tuple[bool, str]:
    names = list(node.args["names"])
    state = {name: tensors[f"input/{slot}"] for slot, name in enumerate(names)}
    state["meta/step"] = torch.tensor(int(node.args["step"]), dtype=torch.int64)
    got = state_digest(state)
    if got != node.digests[0]:
        return False, f"the end-state tensors hash to {got[:16]}, not the claimed {node.digests[0][:16]}"
    if got != claimed_end:
        return False, f"the step's end state hashes to {got[:16]}, but the solver claimed S_t+1 = {claimed_end[:16]}"
    return True, "the end state is the digest of the step's final tensors"


def _verdict_element(spec: JobSpec, node: Node, tensors: Mapping[str, torch.Tensor], element: int) -> tuple[bool, str, int, int]:
    """Compute one output element of a matrix product and compare it with the solver's revealed output there."""
    try:
        func = get_aten_op(node.op)
        inputs = [tensors[f"input/{slot}"] for slot in range(len(node.inputs))]
        scalars = [float.fromhex(h) for h in node.scalars]
        args = decode_args(node.args["args"], inputs, scalars)
        kwargs = {k: decode_args(v, inputs, scalars) for k, v in node.args["kwargs"].items()}
        sliced = _slice_for_element(node.op, list(args), node.outputs[0].shape, element)
        claimed = tensors["output/0"].reshape(-1)[element]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return False, f"the node's operator or arguments cannot be decoded: {exc}", 0, 0
    a, b = (sliced[0], sliced[1]) if node.op != "aten.addmm.default" else (sliced[1], sliced[2])
    length = int(a.shape[-1])
    counter = _CountingMode()
    try:
        with numerics_context(spec.numerics), counter:
            result = func(*sliced, **kwargs)
        value = result.reshape(-1)[0]
    except Exception as exc:  # the solver's claimed call itself fails: its claim cannot be right
        return False, f"{node.op} fails on the revealed inputs: {type(exc).__name__}: {str(exc)[:200]}", counter.count, 0
    flops = 2 * length + (1 if node.op == "aten.addmm.default" else 0)
    where = f"output element {element} (one {length}-long dot product)"
    if spec.numerics == "exact" or not value.is_floating_point():
        same = bool(torch.equal(value.reshape(1).view(torch.int32), claimed.reshape(1).view(torch.int32))) if value.dtype == torch.float32 else bool(torch.equal(value, claimed))
        return same, f"{where}: claimed {float(claimed)!r}, exact {float(value)!r}", counter.count, flops
    terms = float((a.reshape(-1).to(torch.float64).abs() * b.reshape(-1).to(torch.float64).abs()).sum())
    bound = 4.0 * (length + 1) * _EPS32 * (terms + abs(float(value))) + 1e-30
    diff = abs(float(claimed) - float(value))
    return diff <= bound, f"{where}: claimed {float(claimed):.9g}, referee {float(value):.9g}, off by {diff:.3g} (tolerance {bound:.3g})", counter.count, flops


def _output_bytes(func: Any, node: Node, tensors: Mapping[str, torch.Tensor], scalars: list[float]) -> int:
    """What executing the node would allocate for its outputs, found without allocating: the operator run on meta
    tensors (shapes only); where the meta kernel cannot say (a data-dependent shape), the sizes the node claims."""
    try:
        metas = [tensors[f"input/{slot}"].to("meta") for slot in range(len(node.inputs))]
        args = decode_args(node.args["args"], metas, scalars, device="meta")
        kwargs = {k: decode_args(v, metas, scalars, device="meta") for k, v in node.args["kwargs"].items()}
        with torch.device("meta"):  # factories without a device argument allocate nothing either
            out = func(*args, **kwargs)
        flat = out if isinstance(out, (tuple, list)) else [out]
        return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
    except Exception:  # no meta kernel, or a shape that depends on values
        return sum(math.prod(m.shape) * 8 for m in node.outputs if m.kind == "tensor")


def _draw_key(node: Node, func: Any) -> tuple[int, int] | None:
    """The (micro-batch, position) a random operator's node is keyed by (its agreed `draw` argument), None for an
    operator that draws nothing. Raises ValueError for a random operator without a well-formed key, or a key on an
    operator pol does not serve as a draw: the referee never calls torch's own generators."""
    draw = node.args.get("draw") if isinstance(node.args, Mapping) else None
    if not is_served_draw(func):
        if draw is not None or is_random_operator(func):
            raise ValueError(f"{node.op} is not a draw pol serves from a key")
        return None
    if (not isinstance(draw, list) or len(draw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in draw)
            or not all(0 <= v <= MAX_SAFE_INTEGER for v in draw)):
        raise ValueError(f"the random operator {node.op} carries no [micro-batch, position] draw key")
    return int(draw[0]), int(draw[1])


def _draw_context(spec: JobSpec, step: int, key: tuple[int, int] | None) -> contextlib.AbstractContextManager[Any]:
    """The RandomMode a draw ran under in training: seed, step, micro-batch, and its position within them."""
    if key is None:
        return contextlib.nullcontext()
    mode = random_context(spec.seed, "step", [step, key[0]])
    mode.position = key[1]
    return mode


def _verdict_op(spec: JobSpec, step: int, node: Node, tensors: Mapping[str, torch.Tensor]) -> tuple[bool, str, int]:
    try:
        func = get_aten_op(node.op)
        key = _draw_key(node, func)
        scalars = [float.fromhex(h) for h in node.scalars]
        size = _output_bytes(func, node, tensors, scalars)
        if size > MAX_OUTPUT_BYTES:  # bounded before memory is spent: no honest step makes such an operator output
            return False, f"{node.op} on these inputs would allocate {size:,} bytes of output, beyond the referee's {MAX_OUTPUT_BYTES:,}", 0
        inputs = [tensors[f"input/{slot}"].clone() for slot in range(len(node.inputs))]
        args = decode_args(node.args["args"], inputs, scalars)
        kwargs = {k: decode_args(v, inputs, scalars) for k, v in node.args["kwargs"].items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return False, f"the node's operator or arguments cannot be decoded: {exc}", 0
    counter = _CountingMode()
    try:  # a draw: served by pol.rng under its key, as in training (the counter above sees the one operator)
        with numerics_context(spec.numerics), _draw_context(spec, step, key), counter:
            out = func(*args, **kwargs)
    except Exception as exc:  # the solver's claimed call itself fails: its claim cannot be right
        return False, f"{node.op} fails on the revealed inputs: {type(exc).__name__}: {str(exc)[:200]}", counter.count
    originals = [tensors[f"input/{slot}"] for slot in range(len(node.inputs))]
    # pol's draws are the same bits on every machine: a draw is ruled by its digest in native numerics too
    ok, why = _outputs_match(node, get_outputs(func, args, kwargs, out), originals, tensors,
                             "exact" if key is not None else spec.numerics)
    if key is not None:
        why = f"{why} (draw keyed by step {step}, micro-batch {key[0]}, position {key[1]})"
    return ok, why, counter.count


def compute_verdict(
    spec: JobSpec,
    step: int,
    node: Node,
    tensors: Mapping[str, torch.Tensor],
    claimed_end: Digest,
    *,
    data_dir: str | None = None,
    element: int | None = None,
    code: CodePolicy = CodePolicy(),
) -> Verdict:
    """Rule on the solver's claim at `node` of step `step`, its inputs in `tensors` (`input/<slot>`, `leaf`,
    `output/<k>`) already bound to agreed digests by the protocol. Never raises on a bad claim: a claim that cannot
    be checked is ruled wrong. `element` (a matrix product's pointed-at output element) limits the work to that
    element. Only a leaf to re-derive builds anything, with the code `code` allows.

    Raises NumericsUnavailable if exact numerics is not available here; CodeNotAllowed, CodeDiffers, DataDiffers
    and what building the spec's data or model raises, when the referee cannot re-derive a leaf here."""
    started = time.perf_counter()
    executed = 0
    if node.op == LEAF_OP:
        ok, why = _verdict_leaf(spec, step, node, tensors, data_dir, code)
    elif node.op == STATE_OP:
        ok, why = _verdict_state(node, tensors, claimed_end)
    elif element is not None and is_pointable(node.op):
        ok, why, executed, flops = _verdict_element(spec, node, tensors, element)
        return Verdict(ok, why, executed, flops, time.perf_counter() - started)
    else:
        ok, why, executed = _verdict_op(spec, step, node, tensors)
    return Verdict(ok, why, executed, node.flops if executed else 0, time.perf_counter() - started)


# --- the referee's move --------------------------------------------------------------------------------------


def compute_ruling(state: DisputeState, *, data_dir: str | None = None, code: CodePolicy = CodePolicy()) -> tuple[Ruling, Verdict]:
    """The referee's Ruling for a dispute in phase `ruling`, and what deciding it cost.

    A Reveal costs one operator; a StateReveal (structure disputed) costs the referee a traced step. Only a leaf to
    re-derive and a traced step build the spec's model and data, with the code `code` allows.
    Raises OutOfTurn if the dispute is not waiting for a ruling; CodeNotAllowed, CodeDiffers, DataDiffers (the
    referee cannot rule here) and what `compute_verdict` raises.
    """
    if state.phase != "ruling" or state.spec is None or state.reveal is None:
        raise OutOfTurn(REFEREE, state.turn or "nobody")
    spec = state.spec
    if isinstance(state.reveal, StateReveal):
        verdict, node, op = _rule_structure(state, state.reveal, data_dir, code)
    else:
        assert isinstance(state.reveal, Reveal)
        node_obj, tensors = verify_reveal(state, state.reveal)
        element = state.point if state.point >= 0 else None
        verdict = compute_verdict(spec, state.lo_step, node_obj, tensors, state.hi_digest, data_dir=data_dir,
                                  element=element, code=code)
        node, op = node_obj.index, node_obj.op
    loser = CHALLENGER if verdict.solver_correct else SOLVER
    ruling = Ruling(seq=state.seq, prev=state.head, loser=loser, reason=verdict.reason[:1000], node=node, op=op,
                    executed=verdict.executed, flops=verdict.flops)
    return ruling, verdict


def _rule_structure(state: DisputeState, m: StateReveal, data_dir: str | None, code: CodePolicy) -> tuple[Verdict, int, str]:
    """Trace the step from the revealed (agreed) start state and compare its structure with the solver's."""
    from .capture import capture_step_from_state

    assert state.spec is not None
    started = time.perf_counter()
    verify_code(state.spec, code)
    try:
        graph = capture_step_from_state(state.spec, decode_tensors(state, m.tensors), data_dir=data_dir, code=code)
    except StateMismatch as exc:  # the solver's revealed start state does not fit the job: its claim cannot stand
        verdict = Verdict(False, f"the revealed start state cannot be traced: {str(exc)[:300]}", 0, 0, time.perf_counter() - started)
        return verdict, state.n_nodes - 1, "pol.trace"
    ok = graph.structure_hash == state.structure_root and graph.n == state.n_nodes
    reason = "the solver's graph structure is the traced one" if ok else "the solver's graph structure is not the traced one"
    flops = sum(n.flops for n in graph.nodes)
    executed = sum(1 for n in graph.nodes if n.op not in (LEAF_OP, STATE_OP))
    return Verdict(ok, reason, executed, flops, time.perf_counter() - started), graph.n - 1, "pol.trace"
