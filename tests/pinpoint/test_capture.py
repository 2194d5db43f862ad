"""Operator-graph capture: canonical, reproducible, faithful to pol.engine, and honest about what it cannot bind."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest
import torch

from pinpoint.capture import (
    CaptureMode,
    Fault,
    capture_step,
    capture_step_from_state,
    compute_flops,
    decode_args,
    encode_args,
    get_aten_op,
    get_fault_candidates,
    run_captured_step,
)
from pinpoint.errors import CaptureError, GraphError
from pinpoint.graph import (
    LEAF_OP,
    STATE_OP,
    compute_append_root,
    compute_frontier_root,
    compute_prefix_commitment,
    compute_prefix_root,
    get_frontier,
    graph_from_dict,
    graph_to_dict,
    summarize,
    to_networkx,
    write_graph,
)
from pol.bundle import open_bundle
from pol.digest import state_digest
from pol.engine import build_runtime, capture_state, restore_state, run_steps

from .conftest import MODELS


@pytest.mark.parametrize("model", MODELS)
def test_capture_matches_engine_and_is_canonical(model: str, honest_bundles: dict[str, Path]) -> None:
    with open_bundle(honest_bundles[model]) as b:
        graph = capture_step(b, 5)
        again = capture_step(b, 5)
        rt = build_runtime(b.spec)
        restore_state(rt, b.load_state(4))
        run_steps(rt, 6)
        assert graph.end_state == state_digest(capture_state(rt)), "the captured step is the engine's step"
        run_steps(rt, 8)
        assert state_digest(capture_state(rt)) == b.records[2].state
    assert graph_to_dict(graph) == graph_to_dict(again), "both parties capture the same graph"
    assert [n.index for n in graph.nodes] == list(range(graph.n))
    assert graph.nodes[-1].op == STATE_OP and all(n.op != STATE_OP for n in graph.nodes[:-1])
    assert all(ref.node < n.index for n in graph.nodes for ref in n.inputs), "edges only from earlier positions"
    g = to_networkx(graph)
    assert sorted(g.nodes) == list(range(graph.n)) and nx.is_directed_acyclic_graph(g)
    names = {n.name for n in graph.nodes if n.op == LEAF_OP}
    assert {"batch/x", "batch/y"} <= names and any(x.startswith("param/") for x in names)
    if model == "transformer":
        assert any(x.startswith("rng/dropout/") for x in names) and any(x.startswith("module/") for x in names)
    summary = summarize(graph)
    assert summary["nodes"] == graph.n and summary["flops"] == sum(summary["flops_by_op"].values()) > 0
    assert summary["largest_op"]["flops"] == max(n.flops for n in graph.nodes)


def test_exact_capture_matches_engine(exact_bundle: Path) -> None:
    with open_bundle(exact_bundle) as b:
        graph = capture_step(b, 4)
        assert graph.numerics == "exact"
        rt = build_runtime(b.spec)
        restore_state(rt, b.load_state(4))
        run_steps(rt, 5)
        assert graph.end_state == state_digest(capture_state(rt))


def test_graph_files_round_trip(honest_bundles: dict[str, Path], tmp_path: Path) -> None:
    with open_bundle(honest_bundles["mlp"]) as b:
        graph = capture_step(b, 0)
    paths = write_graph(graph, tmp_path / "g.json")
    body = json.loads(paths["json"].read_text())
    assert body["summary"]["nodes"] == graph.n
    assert graph_from_dict(body) == graph
    assert nx.read_graphml(paths["graphml"]).number_of_nodes() == graph.n
    assert paths["dot"].read_text().startswith('digraph "step_0"')
    broken = dict(body, nodes=[dict(body["nodes"][0], index=3)] + body["nodes"][1:])
    with pytest.raises(GraphError):
        graph_from_dict(broken)
    with pytest.raises(GraphError):
        graph_from_dict({"format": "other"})
    with pytest.raises(GraphError):
        graph_from_dict(dict(body, nodes=[{"index": 0}]))
    first = body["nodes"][0]
    for shape in ([1] * 65, [-1], [2**53]):  # bounded before anything is sized from it
        bad_output = dict(first["outputs"][0], shape=shape)
        with pytest.raises(GraphError):
            graph_from_dict(dict(body, nodes=[dict(first, outputs=[bad_output])] + body["nodes"][1:]))


def test_prefix_commitments_are_monotone_and_frontiers_fold() -> None:
    leaves = [bytes([i]) * 3 for i in range(37)]
    for length in range(37):
        frontier = get_frontier(leaves[:length])
        assert compute_frontier_root(frontier) == compute_prefix_root(leaves[:length])
        assert compute_append_root(frontier, leaves[length]) == compute_prefix_root(leaves[: length + 1])
    changed = leaves[:11] + [b"x"] + leaves[12:]
    base = "ab" * 32
    for length in range(38):
        same = compute_prefix_commitment(base, leaves[:length]) == compute_prefix_commitment(base, changed[:length])
        assert same == (length <= 11), "once the values differ, every longer prefix differs"


def test_fault_changes_exactly_one_node(honest_bundles: dict[str, Path]) -> None:
    with open_bundle(honest_bundles["mlp"]) as b:
        honest = capture_step(b, 2)
        j = get_fault_candidates(honest)[3]
        faulty = capture_step(b, 2, fault=Fault(2, j, 5))
    assert honest.nodes[:j] == faulty.nodes[:j]
    assert honest.nodes[j].digests != faulty.nodes[j].digests
    assert honest.structure_hash == faulty.structure_hash, "a corrupted value never changes the structure"


def test_fault_on_a_view_or_past_the_end_is_refused(honest_bundles: dict[str, Path]) -> None:
    with open_bundle(honest_bundles["mlp"]) as b:
        graph = capture_step(b, 0)
        view = next(n.index for n in graph.nodes if n.op == "aten.t.default")
        with pytest.raises(CaptureError, match="non-view"):
            capture_step(b, 0, fault=Fault(0, view))
        with pytest.raises(CaptureError, match="only"):
            capture_step(b, 0, fault=Fault(0, 10**6))
        with pytest.raises(CaptureError, match="outside"):
            capture_step(b, b.spec.steps)
        with pytest.raises(CaptureError, match="last state"):
            capture_step_from_state(b.spec, b.load_state(b.spec.steps))


def test_unnamed_and_aliased_tensors_are_refused() -> None:
    stranger = torch.ones(3)
    with pytest.raises(CaptureError, match="neither computed"), CaptureMode({}):
        _ = stranger * 2.0
    base = torch.zeros(4)
    mode = CaptureMode({"base": base})
    with mode:
        view = base.view(2, 2)
        _ = base * 1.0  # the capture reads versions when the next operator arrives
    base.add_(1.0)  # outside the capture: the view's contents change behind its back
    with pytest.raises(CaptureError, match="alias"), mode:
        _ = view * 2.0


def test_arguments_round_trip_and_operator_names() -> None:
    t = torch.ones(2)
    tensors: list[torch.Tensor] = []
    scalars: list[str] = []
    value = [t, 1.5, 3, True, None, torch.float32, torch.device("cpu"), torch.strided, torch.contiguous_format, "mean", (2, 3)]
    encoded = encode_args(value, tensors, scalars)
    assert json.loads(json.dumps(encoded)) == encoded
    decoded = decode_args(json.loads(json.dumps(encoded)), tensors, [float.fromhex(s) for s in scalars])
    assert decoded[0] is t and decoded[1:] == [1.5, 3, True, None, torch.float32, torch.device("cpu"), torch.strided,
                                               torch.contiguous_format, "mean", [2, 3]]
    with pytest.raises(CaptureError):
        encode_args(object(), tensors, scalars)
    with pytest.raises(ValueError):
        decode_args({"dtype": "strided"}, [], [])
    with pytest.raises(ValueError):
        decode_args({"bogus": 1}, [], [])
    with pytest.raises(ValueError):
        decode_args({"device": "cuda:0"}, [], [])
    assert get_aten_op("aten.mm.default") is torch.ops.aten.mm.default
    for bad in ("os.system.default", "aten.mm", "aten.nosuchop.default"):
        with pytest.raises(ValueError):
            get_aten_op(bad)
    assert compute_flops("aten.mm.default", [(4, 8), (8, 3)], [(4, 3)]) == (2 * 4 * 3 * 8, 8)
    assert compute_flops("aten.view.default", [(4, 8)], [(32,)])[0] == 0


def test_run_captured_step_watches_one_node(honest_bundles: dict[str, Path]) -> None:
    with open_bundle(honest_bundles["mlp"]) as b:
        rt = build_runtime(b.spec)
        restore_state(rt, b.load_state(0))
        graph = capture_step(b, 0)
        j = next(n.index for n in graph.nodes if n.op == "aten.addmm.default")
        watched = run_captured_step(rt, watch=j).watched
    assert set(watched) == {"input/0", "input/1", "input/2", "output/0"}
    assert torch.allclose(watched["output/0"], torch.addmm(watched["input/0"], watched["input/1"], watched["input/2"]))
