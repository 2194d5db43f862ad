import hashlib
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pol.errors import UnsupportedOperator
from pol.exact import exact_mode
from pol.randomness import (
    compute_exp,
    compute_log,
    compute_standard_normal,
    init_context,
    random_context,
    refused_operators,
    served_operators,
)

ROOT = os.path.dirname(os.path.dirname(__file__))

# every served family, model initialisation, and dropout forward+backward under exact numerics: one digest each
SUITE = """
import hashlib, torch, torch.nn.functional as F
from torch import nn
from pol.exact import exact_mode
from pol.randomness import init_context, random_context

def digest(*ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]

with random_context(7, "step", [3, 1]):
    draws = [torch.rand(257), torch.randn(257, dtype=torch.float64), torch.randn(33, dtype=torch.bfloat16),
             torch.empty(99).uniform_(-2, 3), torch.empty(99).normal_(1, 0.5), torch.empty(99).exponential_(2.0),
             torch.empty(99).log_normal_(), torch.empty(99).cauchy_(), torch.empty(99).geometric_(0.2),
             torch.bernoulli(torch.rand(99)), torch.randint(-5, 1000, (99,)), torch.empty(9, dtype=torch.int64).random_(),
             torch.randperm(50), torch.multinomial(torch.rand(3, 20), 5), torch.multinomial(torch.rand(20), 30, True),
             F.rrelu(torch.randn(99), training=True), torch.native_dropout(torch.randn(99), 0.3, True)[0]]
print("draws", digest(*draws))

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.norm = nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.head = nn.Linear(16, 50)
        self.apply(self._init_weights)

    def _init_weights(self, module):  # transformers style
        if isinstance(module, nn.Linear) and module.out_features == 50:
            module.weight.data.normal_(mean=0.0, std=0.02)
            module.bias.data.zero_()

with init_context(11):
    model = Block()
print("init", digest(*model.state_dict().values()))

w = ((torch.arange(64 * 16) - 500).float() / 256).reshape(64, 16).requires_grad_()  # exact inputs (not linspace,
x = ((torch.arange(64 * 16) % 97 - 48).float() / 16).reshape(64, 16)  # whose values depend on the instruction set)
for threads in (1, 2):
    torch.set_num_threads(threads)
    w.grad = None
    with exact_mode(), random_context(7, "step", [0, 0]):
        y = F.dropout(nn.Dropout(0.3)(w * x), 0.1)
        y, _ = torch.native_dropout(y, 0.2, True)
        y.square().sum().backward()
    print("dropout", threads, digest(y, w.grad))
"""


def _suite(capability: str) -> list[str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", SUITE], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.splitlines()


def test_draws_init_and_exact_dropout_are_identical_across_cpu_capabilities_and_threads():
    default, avx2 = _suite("default"), _suite("avx2")
    assert len(default) == 4 and default == avx2
    assert default[2].split()[-1] == default[3].split()[-1]  # dropout: 1 and 2 threads give the same bits


def _bits(t: torch.Tensor) -> bytes:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).digest()


def test_same_key_same_values_and_torch_generator_untouched():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with random_context(1, "step", [0, 0]):
        a = torch.randn(100)
    torch.manual_seed(12345)
    with random_context(1, "step", [0, 0]):
        b = torch.randn(100)
    torch.manual_seed(0)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drew from torch's global generator


def test_keys_differ_by_position_step_microbatch_and_seed():
    x = torch.ones(64, 64)

    def masks(seed: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        with random_context(seed, "step", [step, micro]) as mode:
            first, second = nn.Dropout(0.5)(x), nn.Dropout(0.5)(x)
        assert mode.position == 2
        return first, second

    first, second = masks(1, 0, 0)
    assert not torch.equal(first, second)  # two layers in one step
    assert torch.equal(first, masks(1, 0, 0)[0])  # same key, same mask
    for other in ((1, 0, 1), (1, 1, 0), (2, 0, 0)):  # another micro-batch, step, seed
        assert not torch.equal(first, masks(*other)[0])
    with random_context(1, "other", [0, 0]):
        assert not torch.equal(first, nn.Dropout(0.5)(x))  # another purpose


def test_unserved_random_operators_are_refused_by_name():
    with random_context(0, "step", [0, 0]):
        with pytest.raises(UnsupportedOperator, match=r"aten\.poisson\.default: pol cannot serve"):
            torch.poisson(torch.ones(3))
        with pytest.raises(UnsupportedOperator, match=r"aten\._standard_gamma\.default"):
            torch._standard_gamma(torch.ones(3))
        q = torch.ones(1, 1, 4, 8)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        assert flash(q, q, q, 0.0)[0].shape == q.shape  # a fused kernel without dropout runs as it is
        with pytest.raises(UnsupportedOperator, match=r"_scaled_dot_product_flash_attention_for_cpu.*dropout 0.1"):
            flash(q, q, q, 0.1)
        with pytest.raises(UnsupportedOperator, match=r"aten\.normal_\.default.*not torch\.int64"):
            torch.empty(3, dtype=torch.int64).normal_()
    # the lists are complete: every operator torch marks as seeded is served or refused, never run as it is
    served, refused = set(served_operators()), set(refused_operators())
    assert not served & refused
    assert {"aten.bernoulli_.float", "aten.native_dropout.default", "aten.randn.out", "aten.dropout.default"} <= served
    assert {"aten.poisson.default", "aten.binomial.default", "aten._fused_dropout.default"} <= refused
    tagged = {str(getattr(torch.ops.aten, n).default) for n in ("rand", "randn", "bernoulli", "poisson", "multinomial")}
    assert tagged <= served | refused


def test_refusal_reaches_exact_numerics_too():
    with exact_mode(), random_context(0, "step", [0, 0]):
        with pytest.raises(UnsupportedOperator, match=r"aten\.poisson"):
            torch.poisson(torch.ones(3))


def test_distributions_have_their_moments():
    n = 100_000
    with random_context(5, "stats", []):
        u = torch.rand(n)
        z = torch.randn(n, dtype=torch.float64)
        a = torch.empty(n).uniform_(-2.0, 6.0)
        g = torch.empty(n).normal_(3.0, 0.5)
        e = torch.empty(n).exponential_(4.0)
        ln = torch.empty(n).log_normal_(0.5, 0.25)
        c = torch.empty(n).cauchy_(1.0, 2.0)
        geo = torch.empty(n).geometric_(0.25)
        b = torch.empty(n).bernoulli_(0.3)
        bt = torch.bernoulli(torch.full((n,), 0.8, dtype=torch.float64))
        ri = torch.randint(-3, 7, (n,))
        r = torch.empty(n, dtype=torch.uint8).random_()
        perm = torch.randperm(1000)
        m = torch.multinomial(torch.tensor([0.2, 0.0, 0.5, 0.3]), n, replacement=True)
        mw = torch.multinomial(torch.tensor([[1.0, 0.0, 2.0, 1.0, 4.0]]).expand(20_000, 5), 2)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.015 and abs(float((z**4).mean()) - 3) < 0.1
    assert float(z.abs().max()) > 3.5  # real tails (not a sum of uniforms cut at 6 sigma)
    assert float(a.min()) >= -2 and float(a.max()) < 6 and abs(float(a.mean()) - 2) < 0.03
    assert abs(float(g.mean()) - 3) < 0.005 and abs(float(g.std()) - 0.5) < 0.005
    assert float(e.min()) > 0 and abs(float(e.mean()) - 0.25) < 0.003
    assert abs(float(ln.log().mean()) - 0.5) < 0.003 and abs(float(ln.log().std()) - 0.25) < 0.003
    assert abs(float(c.median()) - 1) < 0.05 and abs(float(c.quantile(0.75)) - 3) < 0.1
    assert float(geo.min()) == 1 and abs(float(geo.mean()) - 4) < 0.05 and torch.equal(geo, geo.round())
    assert set(b.unique().tolist()) == {0.0, 1.0} and abs(float(b.mean()) - 0.3) < 0.005
    assert abs(float(bt.mean()) - 0.8) < 0.005
    counts = torch.bincount(ri + 3, minlength=10)
    assert int(ri.min()) == -3 and int(ri.max()) == 6 and float(counts.min()) > 0.9 * n / 10
    assert int(r.min()) == 0 and int(r.max()) == 255
    assert sorted(perm.tolist()) == list(range(1000)) and perm.tolist() != list(range(1000))
    freq = torch.bincount(m, minlength=4).double() / n
    assert freq[1] == 0 and torch.allclose(freq, torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64), atol=0.006)
    assert mw.shape == (20_000, 2) and bool((mw[:, 0] != mw[:, 1]).all()) and not bool((mw == 1).any())
    first = torch.bincount(mw[:, 0], minlength=5).double() / 20_000
    assert torch.allclose(first, torch.tensor([0.125, 0, 0.25, 0.125, 0.5], dtype=torch.float64), atol=0.015)


def test_float_definitions_against_references():
    p = np.array([2.0**-53, 1e-20, 1e-3, 0.02, 0.0751, 0.3, 0.5 - 2.0**-53, 0.9, 0.999, 1 - 2.0**-53])
    ref = np.array([statistics.NormalDist().inv_cdf(float(v)) for v in p])
    assert np.allclose(compute_standard_normal(p), ref, rtol=1e-14, atol=0)
    x = np.array([5e-324, 1e-300, 1e-8, 0.5, 0.75, 1.0, 1.5, 3.0, 1e300])
    assert np.allclose(compute_log(x), [math.log(v) for v in x], rtol=1e-15, atol=0)
    y = np.array([-745.0, -20.0, -1e-9, 0.0, 0.3, 1.0, 50.0, 700.0])
    assert np.allclose(compute_exp(y), [math.exp(v) for v in y], rtol=2e-15, atol=0)
    edges = compute_exp(np.array([np.nan, np.inf, -np.inf, 800.0, -800.0]))
    assert np.isnan(edges[0]) and edges[1] == np.inf and edges[2] == 0 and edges[3] == np.inf and edges[4] == 0


def test_outputs_follow_torch_contracts():
    t = torch.ones(3, 4).t()  # a transposed layout
    with random_context(2, "step", [0, 0]) as mode:
        assert torch.rand(2, 3).dtype == torch.get_default_dtype()
        assert torch.rand(2, dtype=torch.float64).dtype == torch.float64
        like = torch.rand_like(t)
        assert like.shape == (4, 3) and like.stride() == t.stride()
        assert torch.randn_like(t, dtype=torch.float16).dtype == torch.float16
        assert torch.randint(5, (2, 2)).dtype == torch.int64
        assert torch.randint_like(torch.ones(3, dtype=torch.int16), 9).dtype == torch.int16
        assert torch.randperm(4, dtype=torch.int32).dtype == torch.int32
        for dtype in (torch.float16, torch.int32, torch.bool, torch.float64):
            target = torch.zeros(5, dtype=dtype)
            assert target.bernoulli_(0.5) is target and target.dtype == dtype
        out = torch.empty(0)
        assert torch.randn(3, 2, out=out) is out and out.shape == (3, 2)
        assert torch.normal(torch.zeros(2, 1), torch.ones(3)).shape == (2, 3)
        x = torch.randn(6)
        y, mask = torch.native_dropout(x, 0.5, True)
        assert mask.dtype == torch.bool and torch.equal(y, torch.where(mask, x / 0.5, 0.0))
        position = mode.position
        for p, train in ((0.5, False), (0.0, True)):  # no draw, no position, as the CPU path of F.dropout
            y, mask = torch.native_dropout(x, p, train)
            assert torch.equal(y, x) and bool(mask.all())
        y, mask = torch.native_dropout(x, 1.0, True)
        assert not bool(mask.any()) and not bool(y.any())
        assert F.dropout(x, 0.0) is x and mode.position == position
        fine = torch.rand(10_000, dtype=torch.float64)
        assert bool(((fine * 2**24) != (fine * 2**24).round()).any())  # float64 uses the 53-bit grid


def test_native_dropout_matches_the_cpu_path_of_dropout_forward_and_backward():
    x = torch.linspace(-2, 2, 300).reshape(30, 10)
    results = []
    for run in (lambda v: F.dropout(v, 0.3), lambda v: torch.native_dropout(v, 0.3, True)[0]):
        leaf = x.clone().requires_grad_()
        with random_context(4, "step", [0, 0]):
            out = run(leaf)
            out.square().sum().backward()
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with torch.inference_mode(), random_context(4, "step", [0, 0]):  # aten.dropout itself reaches the mode here
        assert torch.equal(F.dropout(x, 0.3), results[0][0])


def test_random_operators_never_reach_exact_mode():
    lin = nn.Linear(8, 8)
    with exact_mode() as exact, random_context(0, "step", [0, 0]):
        F.dropout(nn.Dropout(0.5)(lin(torch.ones(4, 8))), 0.2).sum().backward()
        torch.native_dropout(torch.ones(3, requires_grad=True), 0.5, True)[0].sum().backward()
    seen = set(exact.seen)
    assert "aten.mul.Tensor" in seen and not {s for s in seen if "bernoulli" in s or "dropout" in s}


def test_model_initialisation_draws_from_pol():
    def build(seed: int) -> tuple[nn.Linear, nn.Embedding, nn.Linear]:
        with init_context(seed):
            lin, emb, head = nn.Linear(400, 300), nn.Embedding(1000, 64), nn.Linear(64, 10)
            head.weight.data.normal_(mean=0.0, std=0.02)  # a transformers-style _init_weights
            head.bias.data.zero_()
        return lin, emb, head

    torch.manual_seed(0)
    lin, emb, head = (m.requires_grad_(False) for m in build(1))
    torch.manual_seed(1)
    again = build(1)
    assert all(
        torch.equal(a, b)
        for m, n in zip((lin, emb, head), again, strict=True)
        for a, b in zip(m.parameters(), n.parameters(), strict=True)
    )
    assert not torch.equal(lin.weight, build(2)[0].weight)
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) of nn.Linear
    assert float(lin.weight.abs().max()) <= bound and float(lin.weight.abs().max()) > 0.99 * bound
    assert abs(float(lin.weight.std()) - bound / math.sqrt(3)) < 0.002
    assert float(lin.bias.abs().max()) <= bound
    assert abs(float(emb.weight.std()) - 1) < 0.01 and abs(float(emb.weight.mean())) < 0.01
    assert abs(float(head.weight.std()) - 0.02) < 0.002 and not bool(head.bias.any())
    assert again[0].weight.requires_grad and isinstance(again[0].weight, nn.Parameter)
