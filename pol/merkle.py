"""A domain-separated blake3 Merkle tree over trace records, with inclusion proofs.

Leaves and inner nodes are hashed under different domain tags, so a node can never pass for a leaf. An odd node at
the end of a level is carried up unchanged (never duplicated, which would let two different leaf lists share a
root). The number of leaves is bound into the commitment together with the job id. A proof's sibling sides are
derived from the leaf index and count, never taken from the prover.

`leaf_hash`, `node_hash` and `_levels` are the reference; `merkle_root` computes the same root with each hash's
input built as one byte string (the domain tag and length prefixes are constants for 32-byte nodes), equal to the
reference for every tree shape (tests/test_canonical_fast.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from .canonical import Digest, compute_hash
from .errors import CommitmentError

__all__ = ["leaf_hash", "node_hash", "merkle_root", "InclusionProof", "get_proof", "verify_proof", "compute_commitment"]


def leaf_hash(data: bytes) -> bytes:
    return compute_hash("pol/merkle-leaf/v1", data)


def node_hash(left: bytes, right: bytes) -> bytes:
    return compute_hash("pol/merkle-node/v1", left, right)


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    assert leaves, "a Merkle tree needs at least one leaf"
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        level = [node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)]
        if len(prev) % 2:
            level.append(prev[-1])
        levels.append(level)
    return levels


_LEAF_TAG = b"pol/merkle-leaf/v1\x00"  # compute_hash's domain prefix; the leaf's length follows
_NODE_TAG = b"pol/merkle-node/v1\x00" + (32).to_bytes(8, "little")  # ... and the left node's length
_NODE_LEN = (32).to_bytes(8, "little")  # the right node's length: every node is a 32-byte digest


def merkle_root(leaf_data: Sequence[bytes]) -> bytes:
    """Root over the leaf hashes of `leaf_data`: `_levels(...)[-1][0]`, one blake3 call per hash."""
    assert leaf_data, "a Merkle tree needs at least one leaf"
    hasher = blake3.blake3
    level = [hasher(_LEAF_TAG + len(d).to_bytes(8, "little") + d).digest() for d in leaf_data]
    while len(level) > 1:
        carried = [level[-1]] if len(level) % 2 else []
        pairs = zip(level[::2], level[1::2], strict=False)  # the odd one out is carried
        level = [hasher(_NODE_TAG + left + _NODE_LEN + right).digest() for left, right in pairs]
        level += carried
    return level[0]


def compute_commitment(job_id: Digest, root: bytes, n_leaves: int) -> Digest:
    """The commitment a solver posts: binds the Merkle root to the job and to the number of records."""
    return compute_hash("pol/commitment/v1", bytes.fromhex(job_id), root, n_leaves.to_bytes(8, "little")).hex()


@dataclass(frozen=True, slots=True)
class InclusionProof:
    index: int
    n_leaves: int
    siblings: tuple[str, ...]  # hex digests, bottom-up; levels where the node is carried up contribute none

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "n_leaves": self.n_leaves, "siblings": list(self.siblings)}


def get_proof(leaf_data: Sequence[bytes], index: int) -> InclusionProof:
    """The inclusion proof of leaf `index`."""
    assert 0 <= index < len(leaf_data), f"leaf {index} out of range"
    siblings = []
    i = index
    for level in _levels([leaf_hash(d) for d in leaf_data])[:-1]:
        partner = i ^ 1
        if partner < len(level):
            siblings.append(level[partner].hex())
        i //= 2
    return InclusionProof(index, len(leaf_data), tuple(siblings))


def verify_proof(root: bytes, leaf_data: bytes, proof: InclusionProof, n_leaves: int) -> None:
    """Check that `leaf_data` is leaf `proof.index` of the tree of `n_leaves` (as committed) with `root`.

    Raises CommitmentError.
    """
    if proof.n_leaves != n_leaves:
        raise CommitmentError(f"proof is for a tree of {proof.n_leaves} leaves, the commitment has {n_leaves}")
    if not (isinstance(proof.index, int) and isinstance(proof.n_leaves, int) and 0 <= proof.index < proof.n_leaves):
        raise CommitmentError(f"proof index {proof.index} is outside a tree of {proof.n_leaves} leaves")
    node, i, width, used = leaf_hash(leaf_data), proof.index, proof.n_leaves, 0
    while width > 1:
        partner = i ^ 1
        if partner < width:
            if used >= len(proof.siblings):
                raise CommitmentError("inclusion proof is too short")
            try:
                sibling = bytes.fromhex(proof.siblings[used])
            except (ValueError, TypeError):
                raise CommitmentError(f"inclusion proof sibling {used} is not hex") from None
            used += 1
            node = node_hash(node, sibling) if i % 2 == 0 else node_hash(sibling, node)
        i, width = i // 2, (width + 1) // 2
    if used != len(proof.siblings):
        raise CommitmentError("inclusion proof is too long")
    if node != root:
        raise CommitmentError(f"inclusion proof for leaf {proof.index} does not reach the committed root")
