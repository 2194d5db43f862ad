"""On a machine with CUDA: exact training on the GPU gives the CPU's digests bit for bit (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from pol.exact import exact_mm, exact_mode, exact_sum
from tests.exact.digest_run import digest
from tests.exact.helpers import f32, wide_rows
from tests.exact.models import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_primitives_agree_between_cpu_and_cuda() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = f32(wide_rows(rng, (96, 300))), f32(wide_rows(rng, (300, 40)))
    assert torch.equal(exact_mm(a.cuda(), b.cuda()).cpu(), exact_mm(a, b))
    assert torch.equal(exact_sum(a.cuda(), [1]).cpu(), exact_sum(a, [1]))


@cuda
@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn"])
def test_training_digests_agree_between_cpu_and_cuda(kind: str) -> None:
    cpu = train(kind, 3, exact_mode)
    gpu = train(kind, 3, exact_mode, device="cuda")
    assert digest(cpu) == digest(gpu)
