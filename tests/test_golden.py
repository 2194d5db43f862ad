"""Golden bytes: the canonical spec, a job id, a commitment and a manifest are pinned, so any change to how pol
encodes or hashes them is deliberate (and bumps the version). Canonical JSON is RFC 8785 (JCS), checked against
vectors from the RFC, so a verifier written in another language recomputes the same job id."""

from __future__ import annotations

import blake3
import pytest

from pol.bundle import FileEntry, Manifest
from pol.canonical import canonical_bytes
from pol.spec import spec_from_dict
from pol.trace import Record, compute_trace_commitment

SPEC = {"model": {"name": "mlp", "kwargs": {"hidden": 32}}, "data": {"name": "synthetic", "kwargs": {"n": 512}},
        "steps": 8, "every": 4, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.001}, "data_digest": "11" * 32,
        "versions": {"pol": "0.5.0", "torch": "2.13.0"}}
CANONICAL = (
    '{"batch_size":16,"data":{"code":null,"kwargs":{"n":512},"name":"synthetic"},"data_digest":"' + "1" * 64 + '","dtype":"fl'
    'oat32","evaluation":null,"every":4,"init":"model","inputs":[],"loss":{"code":null,"kwargs":{},"name":"cro'
    'ss_entropy"},"microbatch":0,"model":{"code":null,"kwargs":{"hidden":32},"name":"mlp"},"numerics":"native"'
    ',"optimizer":{"beta1":0.9,"beta2":0.999,"clip_grad_norm":0,"clip_grad_value":0,"code":null,"ema":0,"eps":'
    '1e-8,"kwargs":{},"lr":0.001,"momentum":0.9,"name":"adamw","param_groups":[],"schedule":"constant","schedu'
    'ler":null,"warmup":0,"weight_decay":0},"output":"","seed":0,"step_fn":null,"steps":8,"target":"y","versio'
    'ns":{"pol":"0.5.0","torch":"2.13.0"}}'
)
JOB_ID = "610cacb905b3c9d08bef37b9f771fea57e2e078e4129e8582e702f5d938b91a7"
RECORDS = (Record(0, "22" * 32, "0" * 64, None), Record(4, "33" * 32, "44" * 32, 2.25, update=0.125),
           Record(8, "55" * 32, "66" * 32, 1.0000000000000002, update=3.0000000000000004))
MERKLE = "2c335f002e2625300870ebb6a4b8004a9897cf0c265e33dedc595cdda0d7693a"
COMMITMENT = "af2a858345e526b33b1df13a2078b45d300d352fff326c69071b89473f3e344f"
MANIFEST_BLAKE3 = "4de3d1cb337d12cfc2bc70d6638fcdd16b6f5059fbe041e561349f88f8039b8f"


def test_canonical_spec_and_job_id():
    spec = spec_from_dict(SPEC)
    assert spec.canonical().decode() == CANONICAL
    assert spec.job_id == JOB_ID
    reordered = spec_from_dict(dict(reversed(list(SPEC.items()))))
    assert reordered.job_id == JOB_ID  # dict order never matters


def test_commitment_and_manifest():
    assert compute_trace_commitment(JOB_ID, RECORDS) == (MERKLE, COMMITMENT)
    files = {f"checkpoints/step-00000000{s}.safetensors": FileEntry(100 + s, "77" * 32) for s in (0, 4, 8)}
    manifest = Manifest(spec_from_dict(SPEC), RECORDS, MERKLE, COMMITMENT, files, {"note": "golden"})
    assert blake3.blake3(canonical_bytes(manifest.to_dict())).hexdigest() == MANIFEST_BLAKE3


@pytest.mark.parametrize("value, text", [
    # RFC 8785 appendix B (numbers) and section 3.2.2
    (1e30, "1e+30"), (4.50, "4.5"), (0.002, "0.002"), (1e-27, "1e-27"), (333333333.3333333, "333333333.3333333"),
    (-0.0, "0"), (0.000001, "0.000001"), (1e-7, "1e-7"), (1e21, "1e+21"), (1e20, "100000000000000000000"),
    (9007199254740991, "9007199254740991"), (-1.5, "-1.5"), (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
    # strings: minimal escapes, UTF-8 (section 3.2.2.2)
    ("\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/", '"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"'),
])
def test_rfc8785_vectors(value, text):
    assert canonical_bytes(value) == text.encode("utf-8")


def test_rfc8785_key_order_is_by_utf16_code_units():
    keys = ["\u20ac", "\r", "\ufb33", "1", "\U0001f600", "\u0080", "\u00f6"]
    encoded = canonical_bytes({k: i for i, k in enumerate(keys)}).decode("utf-8")
    order = ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]  # RFC 8785 section 3.2.3
    assert [encoded.index(f'"{k}"' if k != "\r" else '"\\r"') for k in order] == sorted(encoded.index(f'"{k}"' if k != "\r" else '"\\r"') for k in order)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**53, -(2**53), {1: 2}])
def test_values_without_a_canonical_form_are_refused(value):
    with pytest.raises(ValueError):
        canonical_bytes(value)


def test_transcript_head():
    """A dispute transcript's head chain: the opening head over the venue's params, then one entry."""
    from pinpoint.messages import Timeout
    from pinpoint.protocol import Params, compute_head, new_dispute

    state = new_dispute(Params(budget_ms=1000, commitment="aa" * 32), 0)
    assert state.head == "a71b11e0b2e5a6dc839b98173fa2fc95416c07244f03663f7087e9910742b849"
    after = compute_head(state.head, 1000, Timeout(0, state.head, claimant="solver"))
    assert after == "341be8c048b3d3db7dcb584b048620c16c170703c8b3d75781241f0f9318c7fc"
