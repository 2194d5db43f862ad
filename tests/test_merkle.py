import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pol.errors import CommitmentError
from pol.merkle import InclusionProof, get_proof, merkle_root, verify_proof
from pol.trace import Record, compute_trace_commitment

JOB = "ab" * 32


def records(n: int) -> list[Record]:
    return [Record(i * 10, f"{i:064x}", f"{i + 1:064x}", None if i == 0 else 1.0 / (i + 1)) for i in range(n)]


@given(st.integers(1, 40), st.data())
def test_every_leaf_proves_against_the_root(n, data):
    leaves = [r.leaf(JOB) for r in records(n)]
    root = merkle_root(leaves)
    i = data.draw(st.integers(0, n - 1))
    verify_proof(root, leaves[i], get_proof(leaves, i), n)


def test_proofs_fail_for_every_single_field_tampering():
    recs = records(9)
    leaves = [r.leaf(JOB) for r in recs]
    root = merkle_root(leaves)
    proof = get_proof(leaves, 5)
    r = recs[5]
    for tampered in (
        dataclasses.replace(r, step=r.step + 1),
        dataclasses.replace(r, state="f" + r.state[1:]),
        dataclasses.replace(r, data="f" + r.data[1:]),
        dataclasses.replace(r, loss=0.25),
    ):
        with pytest.raises(CommitmentError):
            verify_proof(root, tampered.leaf(JOB), proof, 9)
    with pytest.raises(CommitmentError):
        verify_proof(root, r.leaf("cd" * 32), proof, 9)  # same record, other job
    bad_sibling = dataclasses.replace(proof, siblings=("00" * 32,) + proof.siblings[1:])
    for bad in (
        bad_sibling,
        dataclasses.replace(proof, index=4),
        dataclasses.replace(proof, index=99),
        dataclasses.replace(proof, n_leaves=10),
        dataclasses.replace(proof, siblings=proof.siblings[:-1]),
        dataclasses.replace(proof, siblings=proof.siblings + ("00" * 32,)),
        dataclasses.replace(proof, siblings=("zz",) + proof.siblings[1:]),
    ):
        with pytest.raises(CommitmentError):
            verify_proof(root, r.leaf(JOB), bad, 9)
    with pytest.raises(CommitmentError):
        verify_proof(bytes(32), r.leaf(JOB), proof, 9)


def test_leaves_and_nodes_are_domain_separated():
    a, b = records(2)
    leaves = [a.leaf(JOB), b.leaf(JOB)]
    root = merkle_root(leaves)
    assert merkle_root([root]) != root
    assert isinstance(get_proof(leaves, 0), InclusionProof)


def test_commitment_binds_job_and_count():
    recs = records(4)
    _, c = compute_trace_commitment(JOB, recs)
    assert compute_trace_commitment("cd" * 32, recs)[1] != c
    assert compute_trace_commitment(JOB, recs[:3])[1] != c
    assert compute_trace_commitment(JOB, recs[::-1])[1] != c
