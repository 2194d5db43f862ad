"""Subprocess entry: train one tiny model and print a blake3 digest of its final parameters.

    python -m tests.exact.digest_run MODE STEPS [--models mlp,cnn,attn] [--threads N] [--no-mkldnn] [--micro N]

Prints one line per model: `<model> <digest>`.
"""

from __future__ import annotations

import argparse

import blake3
import torch

from pol.exact import exact_mode
from tests.exact.models import native, train


def digest(params: dict[str, torch.Tensor]) -> str:
    h = blake3.blake3()
    for name in sorted(params):
        t = params[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["exact", "native"])
    ap.add_argument("steps", type=int)
    ap.add_argument("--models", default="mlp,cnn,attn")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-mkldnn", action="store_true")
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True)
    for model in a.models.split(","):
        params = train(model, a.steps, exact_mode if a.mode == "exact" else native, batch=a.batch, micro_batches=a.micro)
        print(model, digest(params))


if __name__ == "__main__":
    main()
