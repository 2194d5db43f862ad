"""The referee executes one operator a transcript names: what it would allocate is found on meta tensors first, and
an operator claiming a gigantic output is ruled wrong without allocating it."""

from __future__ import annotations

import tracemalloc

import torch

from pinpoint.graph import InputRef, Node, TensorMeta
from pinpoint.referee import MAX_OUTPUT_BYTES, compute_verdict

from ..conftest import tiny_spec


def _node(op: str, args, outputs, inputs=()) -> Node:
    return Node(index=1, op=op, args={"args": args, "kwargs": {}}, inputs=tuple(inputs), outputs=tuple(outputs),
                digests=("00" * 32,) * len(outputs), scalars=(), flops=0, reduction=0)


def test_a_gigantic_factory_output_is_refused_without_allocating():
    spec = tiny_spec("mlp").replace(data_digest="11" * 32)
    huge = [1 << 20, 1 << 20]  # 4 TiB of float32
    node = _node("aten.ones.default", [huge], [TensorMeta("tensor", "float32", tuple(huge))])
    tracemalloc.start()
    verdict = compute_verdict(spec, 0, node, {}, "00" * 32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not verdict.solver_correct and "would allocate" in verdict.reason and verdict.executed == 0
    assert peak < 16 << 20


def test_a_broadcast_beyond_the_bound_is_refused_but_small_ones_run():
    spec = tiny_spec("mlp").replace(data_digest="11" * 32)
    x = torch.ones(1, 4)
    big = [MAX_OUTPUT_BYTES // 4 + 1, 4]
    node = _node("aten.expand_copy.default", [{"t": 0}, big], [TensorMeta("tensor", "float32", tuple(big))], [InputRef(0, 0)])
    verdict = compute_verdict(spec, 0, node, {"input/0": x}, "00" * 32)
    assert not verdict.solver_correct and "would allocate" in verdict.reason
    small = _node("aten.expand_copy.default", [{"t": 0}, [3, 4]], [TensorMeta("tensor", "float32", (3, 4))], [InputRef(0, 0)])
    verdict = compute_verdict(spec, 0, small, {"input/0": x}, "00" * 32)
    assert verdict.executed == 1 and "would allocate" not in verdict.reason
