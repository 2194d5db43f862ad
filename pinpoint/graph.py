"""The operator graph of one training step: node records, their canonical encoding, prefix commitments, viewers.

A node is one aten operator as the training program executed it (forward, autograd backward, optimizer update;
a torch random operator pol serves carries its pol.rng key in `args["draw"]`), or one of two virtual operators:
`pol.leaf` (a tensor the step reads but does not compute: a state tensor, a batch tensor, a built-in model's
pol.rng dropout mask, a model constant) and `pol.state` (the last node: the digest of the state the step ends in). Node ids are execution positions 0..n-1; edges go from the node that produced an input (by its
position and output index) to the node that read it. Nothing depends on networkx's insertion or traversal order.

Each node has two halves:

- its *structure* (`compute_structure`): operator, arguments (with the host floats it was called with: learning
  rate, bias corrections), input sources, shapes and dtypes. Both parties derive the same structure from the same
  program and agreed start state; the dispute agrees on it first (one Merkle root), and a disputed structure is
  settled by the referee tracing the step (costly, paid by the loser; it never happens between honest parties).
  Host floats belong here because the referee cannot check a Python computation: a value that reaches the step's
  arithmetic through `.item()` is bound by agreement, never taken on the solver's word.
- its *value* (`compute_value_leaf`): output digests. Values are what the parties may disagree on.

The prefix commitment `compute_prefix_root(base, leaves[:L])` binds the values of the first L nodes under a pol
Merkle root (so a disputed node's inputs can be proven against an agreed prefix with log n hashes): once two value
sequences differ at position i, every prefix root of length > i differs, which lets bisection find the first
differing node.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from pol.canonical import MAX_SAFE_INTEGER, Digest, canonical_bytes, compute_hash
from pol.merkle import InclusionProof, get_proof, leaf_hash, merkle_root, node_hash, verify_proof

from .errors import GraphError, InvalidClaim

__all__ = [
    "Position",
    "TensorMeta",
    "InputRef",
    "Node",
    "StepGraph",
    "EMPTY_ROOT",
    "LEAF_OP",
    "STATE_OP",
    "STATE_PREFIXES",
    "POINTABLE",
    "MAX_DIMS",
    "is_state_leaf",
    "is_pointable",
    "compute_structure",
    "compute_structure_hash",
    "compute_structure_leaves",
    "node_from_dict",
    "compute_value_leaf",
    "compute_base",
    "compute_prefix_root",
    "compute_prefix_commitment",
    "compute_prefix_commit",
    "get_prefix_proof",
    "verify_prefix_proof",
    "get_frontier",
    "compute_frontier_root",
    "compute_append_root",
    "to_networkx",
    "summarize",
    "graph_to_dict",
    "graph_from_dict",
    "write_graph",
]

Position = int  # a node id: its execution position in the step, 0..n-1
LEAF_OP = "pol.leaf"
STATE_OP = "pol.state"
EMPTY_ROOT = "0" * 64  # the Merkle root of an empty prefix
STATE_PREFIXES = ("param/", "buffer/", "optim/")  # leaves that are tensors of the agreed start state
POINTABLE = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default")  # products ruled one element at a time
MAX_DIMS = 64  # dimensions of a recorded shape (torch's own limit)


def is_state_leaf(name: str) -> bool:
    """True for a leaf that is a tensor of the agreed start state."""
    return name.startswith(STATE_PREFIXES)


def is_pointable(op: str) -> bool:
    """True for the matrix products, where the referee checks one pointed-at output element instead of all of them.

    Exact products split operands under per-row and per-column scales (pol.exact.matmul), so element (i, j) is a
    function of row i and column j alone: computing it from the 1 x K and K x 1 slices gives the same bits.
    """
    return op in POINTABLE


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What an output is: a tensor (dtype, shape), a host scalar (`kind` "float"/"int"/"bool") or `kind` "none"."""

    kind: str  # "tensor", "float", "int", "bool", "none", "digest" (the state node's output)
    dtype: str = ""
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class InputRef:
    """A tensor input: output `output` of the earlier node `node`."""

    node: Position
    output: int

    def to_dict(self) -> list[int]:
        return [self.node, self.output]


@dataclass(frozen=True, slots=True)
class Node:
    """One executed operator. `args` is the canonical argument tree (tensors as {"t": i}, floats as {"f": i})."""

    index: Position
    op: str
    args: Any
    inputs: tuple[InputRef, ...]
    outputs: tuple[TensorMeta, ...]
    digests: tuple[Digest, ...]  # one per output: value digest of a tensor or scalar, state digest for pol.state
    scalars: tuple[str, ...]  # host floats in argument order, as float.hex()
    flops: int
    reduction: int  # longest accumulation inside the operator (for native-mode tolerances)

    @property
    def name(self) -> str:
        """The leaf's name for a `pol.leaf` node, else the operator."""
        return str(self.args["name"]) if self.op == LEAF_OP else self.op


@dataclass(frozen=True, slots=True)
class StepGraph:
    """The captured operator graph of the step `step -> step + 1` of a job."""

    job_id: Digest
    step: int
    numerics: str
    start_state: Digest  # agreed state digest S_t
    nodes: tuple[Node, ...]

    @property
    def n(self) -> int:
        return len(self.nodes)

    @property
    def end_state(self) -> Digest:
        return self.nodes[-1].digests[0]

    @property
    def base(self) -> Digest:
        return compute_base(self.job_id, self.step, self.start_state)

    @property
    def value_leaves(self) -> list[bytes]:
        return [compute_value_leaf(node) for node in self.nodes]

    @property
    def structure_hash(self) -> Digest:
        return compute_structure_hash(self.nodes)

    def prefix_commitment(self, length: int) -> Digest:
        return compute_prefix_commitment(self.base, self.value_leaves[:length])


# --- canonical halves of a node -------------------------------------------------------------------------------


def compute_structure(node: Node) -> dict[str, Any]:
    """The structural half of a node: what both parties derive from the program alone."""
    return {
        "index": node.index,
        "op": node.op,
        "args": node.args,
        "inputs": [i.to_dict() for i in node.inputs],
        "outputs": [o.to_dict() for o in node.outputs],
        "scalars": list(node.scalars),
        "flops": node.flops,
        "reduction": node.reduction,
    }


def compute_structure_leaves(nodes: Sequence[Node]) -> list[bytes]:
    """The canonical structure of each node, in position order: the leaves of the structure root."""
    return [canonical_bytes(compute_structure(n)) for n in nodes]


def compute_structure_hash(nodes: Sequence[Node]) -> Digest:
    """The Merkle root over the structure of every node (so one node's structure can be proven against it)."""
    return merkle_root(compute_structure_leaves(nodes)).hex()


def compute_value_leaf(node: Node) -> bytes:
    """The value half of a node as Merkle leaf bytes: its position, output digests and host floats."""
    return canonical_bytes({"index": node.index, "digests": list(node.digests)})


def compute_base(job_id: Digest, step: int, start_state: Digest) -> Digest:
    """What both parties agree on before the graph: the job, the step and the state it starts from."""
    return compute_hash("pinpoint/base/v1", bytes.fromhex(job_id), step.to_bytes(8, "little"), bytes.fromhex(start_state)).hex()


def compute_prefix_root(leaves: Sequence[bytes]) -> Digest:
    """The pol Merkle root over value leaves (EMPTY_ROOT for none)."""
    return merkle_root(leaves).hex() if leaves else EMPTY_ROOT


def compute_prefix_commitment(base: Digest, leaves: Sequence[bytes]) -> Digest:
    """P_L: the commitment to the values of the first L nodes, bound to the base and to L."""
    return compute_prefix_commit(base, compute_prefix_root(leaves), len(leaves))


def compute_prefix_commit(base: Digest, root: Digest, length: int) -> Digest:
    """P_L from the Merkle root of the first L values."""
    return compute_hash("pinpoint/prefix/v1", bytes.fromhex(base), bytes.fromhex(root), length.to_bytes(8, "little")).hex()


def get_prefix_proof(leaves: Sequence[bytes], index: int, length: int) -> InclusionProof:
    """Inclusion proof of leaf `index` in the prefix of `length` leaves."""
    return get_proof(list(leaves[:length]), index)


def verify_prefix_proof(root: Digest, leaf: bytes, proof: InclusionProof, length: int) -> None:
    """Check a value leaf against a prefix root. Raises InvalidClaim."""
    from pol.errors import CommitmentError

    try:
        verify_proof(bytes.fromhex(root), leaf, proof, length)
    except (CommitmentError, ValueError) as exc:
        raise InvalidClaim(f"value of node {proof.index} does not belong to the agreed prefix: {exc}") from None


def get_frontier(leaves: Sequence[bytes]) -> tuple[Digest, ...]:
    """The peaks of the pol Merkle tree over `leaves`, smallest first: the siblings of an appended leaf."""
    if not leaves:
        return ()
    return tuple(get_proof([*leaves, b""], len(leaves)).siblings)


def compute_frontier_root(frontier: Sequence[Digest]) -> Digest:
    """The root of a tree from its peaks (smallest first). Odd nodes are carried up, so the root folds the peaks."""
    if not frontier:
        return EMPTY_ROOT
    acc = bytes.fromhex(frontier[0])
    for peak in frontier[1:]:
        acc = node_hash(bytes.fromhex(peak), acc)
    return acc.hex()


def compute_append_root(frontier: Sequence[Digest], leaf: bytes) -> Digest:
    """The root after appending `leaf` to the tree whose peaks are `frontier`."""
    acc = leaf_hash(leaf)
    for peak in frontier:
        acc = node_hash(bytes.fromhex(peak), acc)
    return acc.hex()


# --- viewers and summaries ------------------------------------------------------------------------------------


def to_networkx(graph: StepGraph) -> nx.DiGraph:
    """A networkx DiGraph with node ids 0..n-1 (positions) and one edge per (producer, consumer, input slot)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.index, op=node.op, label=node.name, flops=node.flops, digest=",".join(d[:16] for d in node.digests))
    for node in graph.nodes:
        for slot, ref in enumerate(node.inputs):
            if g.has_edge(ref.node, node.index):
                g.edges[ref.node, node.index]["slots"] += f",{slot}"
            else:
                g.add_edge(ref.node, node.index, output=ref.output, slots=str(slot))
    return g


def summarize(graph: StepGraph) -> dict[str, Any]:
    """Nodes, edges, total FLOPs, FLOPs and counts by operator type, the largest operator."""
    flops: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        flops[node.op] += node.flops
        counts[node.op] += 1
    largest = max(graph.nodes, key=lambda n: (n.flops, -n.index))
    return {
        "job_id": graph.job_id,
        "step": graph.step,
        "numerics": graph.numerics,
        "nodes": graph.n,
        "edges": sum(len(n.inputs) for n in graph.nodes),
        "leaves": counts[LEAF_OP],
        "flops": sum(flops.values()),
        "largest_op": {"index": largest.index, "op": largest.op, "flops": largest.flops},
        "flops_by_op": dict(sorted(flops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "count_by_op": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "structure_hash": graph.structure_hash,
        "end_state": graph.end_state,
    }


def _node_to_dict(node: Node) -> dict[str, Any]:
    return {**compute_structure(node), "digests": list(node.digests)}


def graph_to_dict(graph: StepGraph) -> dict[str, Any]:
    """The canonical JSON form of a graph (what `write_graph` writes and `graph_from_dict` reads)."""
    return {
        "format": "pinpoint-graph",
        "version": 1,
        "job_id": graph.job_id,
        "step": graph.step,
        "numerics": graph.numerics,
        "start_state": graph.start_state,
        "nodes": [_node_to_dict(n) for n in graph.nodes],
    }


def node_from_dict(value: Any, index: int) -> Node:
    """Parse one node (structure and value halves) at position `index`. Raises GraphError."""
    try:
        if not isinstance(value, Mapping) or value["index"] != index:
            raise GraphError(f"node {index}: not a node record at its position")
        inputs = tuple(InputRef(_int(a), _int(b)) for a, b in value["inputs"])
        if any(not 0 <= ref.node < index for ref in inputs):
            raise GraphError(f"node {index}: an input comes from a node that is not earlier")
        outputs = tuple(TensorMeta(str(o["kind"]), str(o["dtype"]), _shape(o["shape"])) for o in value["outputs"])
        node = Node(index, str(value["op"]), value["args"], inputs, outputs, tuple(str(d) for d in value["digests"]),
                    tuple(str(s) for s in value["scalars"]), _int(value["flops"]), _int(value["reduction"]))
        if len(node.digests) != len(node.outputs):
            raise GraphError(f"node {index}: {len(node.digests)} digests for {len(node.outputs)} outputs")
    except (KeyError, TypeError, ValueError) as exc:
        raise GraphError(f"node {index} is malformed: {exc!r}") from None
    return node


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_SAFE_INTEGER:
        raise ValueError(f"integer {value} is outside [0, 2**53 - 1]")
    return value


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DIMS:
        raise TypeError(f"expected a shape: a list of at most {MAX_DIMS} sizes")
    return tuple(_int(s) for s in value)


def graph_from_dict(value: Any) -> StepGraph:
    """Parse a graph written by `graph_to_dict`. Raises GraphError."""
    if not isinstance(value, Mapping) or value.get("format") != "pinpoint-graph" or value.get("version") != 1:
        raise GraphError("not a pinpoint graph (format 'pinpoint-graph', version 1)")
    nodes = value.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise GraphError("a graph needs a non-empty list of nodes")
    try:
        return StepGraph(str(value["job_id"]), int(value["step"]), str(value["numerics"]), str(value["start_state"]),
                         tuple(node_from_dict(v, i) for i, v in enumerate(nodes)))
    except KeyError as exc:
        raise GraphError(f"graph field {exc} is missing") from None


def write_graph(graph: StepGraph, out: str | Path) -> dict[str, Path]:
    """Write `out` as JSON (the canonical graph plus its summary) and, beside it, GraphML and DOT for viewers.

    `out` ending in .graphml or .dot selects the viewer file; the JSON is always written with suffix .json.
    Returns the paths written, keyed "json", "graphml", "dot".
    """
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".graphml", ".dot") else out
    paths = {"json": stem.with_suffix(".json"), "graphml": stem.with_suffix(".graphml"), "dot": stem.with_suffix(".dot")}
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    body = {**graph_to_dict(graph), "summary": summarize(graph)}
    paths["json"].write_text(json.dumps(body, sort_keys=True, indent=1) + "\n", encoding="ascii")
    g = to_networkx(graph)
    nx.write_graphml(g, paths["graphml"])
    paths["dot"].write_text(_to_dot(graph), encoding="ascii")
    return paths


def _to_dot(graph: StepGraph) -> str:
    lines = [f'digraph "step_{graph.step}" {{', "  rankdir=TB;", "  node [shape=box, fontsize=9];"]
    for node in graph.nodes:
        shape = "ellipse" if node.op == LEAF_OP else "doubleoctagon" if node.op == STATE_OP else "box"
        label = f"{node.index}: {node.name}\\n{node.flops} flops".replace('"', "'")
        lines.append(f'  n{node.index} [label="{label}", shape={shape}];')
    for node in graph.nodes:
        for ref in node.inputs:
            lines.append(f"  n{ref.node} -> n{node.index};")
    lines.append("}")
    return "\n".join(lines) + "\n"
