import blake3
import torch

from pol.canonical import canonical_json, compute_hash
from pol.digest import state_digest, tensor_digest, tensor_digests

SMALL = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1, 2, 3], dtype=torch.int64),
    "meta/step": torch.tensor(5),
}


def test_golden_state_digest():
    # pinned: changing the digest layout must be a deliberate, versioned decision
    assert state_digest(SMALL) == "1f9920acc4ddfcbc18d5b41958f097bd4092f2e23b5b83fc59dec925ce8dac27"
    assert tensor_digests(SMALL)["a"] == "90236f6d0f9aa4d6b5e0c90dafa566a8e034d2a6c3d0eb66718c872028b731ee"


def test_tensor_digest_follows_the_documented_layout():
    t = SMALL["a"]
    header = compute_hash("pol/tensor-header/v1", b"a", b"torch.float32", b"(2, 3)")
    assert tensor_digest("a", t) == blake3.blake3(header + t.numpy().tobytes()).hexdigest()


def test_dict_order_and_layout_do_not_change_the_digest():
    reordered = {k: SMALL[k] for k in reversed(list(SMALL))}
    assert state_digest(reordered) == state_digest(SMALL)
    strided = {**SMALL, "a": SMALL["a"].t().contiguous().t()}  # same values, column-major storage
    assert not strided["a"].is_contiguous()
    assert state_digest(strided) == state_digest(SMALL)


def test_digest_sees_name_dtype_shape_and_every_bit():
    base = state_digest(SMALL)
    assert state_digest({**SMALL, "a": SMALL["a"].reshape(3, 2)}) != base
    assert state_digest({**SMALL, "a": SMALL["a"].double()}) != base
    assert state_digest({"c" if k == "a" else k: v for k, v in SMALL.items()}) != base
    flipped = SMALL["a"].clone()
    flipped.view(torch.int32)[1, 1] ^= 1  # lowest mantissa bit
    assert state_digest({**SMALL, "a": flipped}) != base
    assert state_digest({**SMALL, "a": torch.tensor([-0.0])}) != state_digest({**SMALL, "a": torch.tensor([0.0])})


def test_canonical_json_is_sorted_and_exact():
    assert canonical_json({"b": 1, "a": [0.1, 2]}) == '{"a":[0.1,2],"b":1}'
    assert float(canonical_json(1 / 3)) == 1 / 3
