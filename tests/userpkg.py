"""A user's own model and dataset, brought in by import path (`tests.userpkg:...`)."""

import torch
from torch import nn


def make_model(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))


def make_data(n: int = 128) -> dict[str, torch.Tensor]:
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) / (n * 4)
    return {"x": x, "y": x.sum(dim=1, keepdim=True) * 0.5}


def not_a_model() -> str:
    return "nope"


def bad_data() -> int:
    return 3


def shape_mismatch_model(width: int = 8) -> nn.Module:
    """A model whose first layer expects 5 features: on the 4-feature data its forward raises."""
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 1))


def nan_data(n: int = 64) -> dict[str, torch.Tensor]:
    """Data whose inputs are NaN: the loss of the very first step is not finite."""
    x = torch.full((n, 4), float("nan"))
    return {"x": x, "y": torch.zeros(n, 1)}


class _Output:
    """What transformers models return: an object whose `.logits` holds the output."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class MaskedTokens(nn.Module):
    """A tiny sequence classifier called as `model(input_ids=..., attention_mask=...)`, returning `returns`:
    "object" (with .logits), "dict" ({"logits": ...}), "tuple" ((hidden, logits)) or "tensor"."""

    def __init__(self, vocab: int = 16, width: int = 8, classes: int = 3, returns: str = "object") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)
        self.returns = returns

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # (B, T), (B, T)
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)  # (B, T, C)
        pooled = h.sum(dim=1) / attention_mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)  # (B, C)
        logits = self.head(pooled)  # (B, classes)
        return {"object": lambda: _Output(logits), "dict": lambda: {"logits": logits, "hidden": pooled},
                "tuple": lambda: (pooled, logits), "tensor": lambda: logits}[self.returns]()


def masked_tokens(**kwargs) -> nn.Module:
    return MaskedTokens(**kwargs)


def token_data(n: int = 96, length: int = 6, vocab: int = 16, classes: int = 3) -> dict[str, torch.Tensor]:
    """Token sequences with a padding mask and a label: a dataset with three named tensors."""
    ids = (torch.arange(n * length).reshape(n, length) * 7 + 3) % vocab
    lengths = 2 + torch.arange(n) % (length - 1)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    labels = (ids * mask).sum(dim=1) % classes
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ThreadSensitive(nn.Module):
    """A model whose output depends on the thread count (as some kernels' rounding does, much amplified): its
    honest replays disagree far more than native thresholds may allow."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + 0.05 * torch.get_num_threads()


def thread_sensitive() -> nn.Module:
    return ThreadSensitive()


def batchnorm_mlp(width: int = 8) -> nn.Module:
    """A batch-coupled model: batch norm's statistics mix the rows of a batch."""
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))


class DropoutNet(nn.Module):
    """Two nn.Dropout layers and its own initialisation (a transformers-style `_init_weights`)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.2), nn.Tanh(), nn.Linear(width, width), nn.Dropout(0.1),
                                 nn.Tanh(), nn.Linear(width, 1))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.3)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def dropout_net(width: int = 16) -> nn.Module:
    return DropoutNet(width)


class LateRandom(nn.Module):
    """Draws random numbers only from its third call on (so its first step does not reveal that it draws)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        noise = torch.rand(x.shape[0], 1) if self.calls >= 3 else torch.zeros(x.shape[0], 1)
        return self.layer(x) + 0.01 * noise


def late_random() -> nn.Module:
    return LateRandom()


def weighted_mse(output, batch, weight: float = 2.0):
    """A user loss (`tests.userpkg:weighted_mse`): called with the model's whole output and the batch."""
    return ((output - batch["y"]) ** 2).mean() * weight


class SignSGD(torch.optim.Optimizer):
    """A user optimizer class (`tests.userpkg:SignSGD`): p -= lr * sign(grad)."""

    def __init__(self, params, lr: float = 1e-3, shrink: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "shrink": shrink})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "flips" not in state:
                    state["flips"] = torch.zeros_like(p)
                state["flips"].add_(torch.sign(p.grad))
                p.add_(torch.sign(p.grad), alpha=-group["lr"]).mul_(1.0 - group["shrink"])
        return None


def plain_step(model, batch, ctx):
    """A user step doing what the spec's own step does: the model on `x`, the spec's loss."""
    return ctx.loss(model(batch["x"]), batch)


def regularised_step(model, batch, ctx, weight: float = 1e-3):
    """A user step the spec cannot say: two forward passes (one on noised inputs from pol's stream) and an L2
    penalty, with the learning rate in reach."""
    noise = ctx.uniform(batch["x"].shape, "input-noise", -0.01, 0.01)
    out = model(batch["x"])
    noisy = model(batch["x"] + noise)
    penalty = sum((p * p).sum() for p in model.parameters())
    assert ctx.lrs and ctx.lrs[0] > 0
    return ctx.loss(out, batch) + 0.5 * ctx.loss(noisy, batch) + weight * penalty


def unseeded_step(model, batch, ctx):
    """A user step that draws from Python's global generator: refused."""
    import random

    return ctx.loss(model(batch["x"]), batch) * (1.0 + random.random() * 1e-3)


def make_classifier(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes))


def make_soft_data(n: int = 128, classes: int = 3, log: int = 0) -> dict[str, torch.Tensor]:
    """Soft targets (a teacher's probabilities, or log-probabilities with log=1) for distillation and BCE."""
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) / (n * 4)
    logits = torch.stack([x[:, 0] * (k + 1) - x[:, 1] * k for k in range(classes)], dim=1)
    probs = torch.softmax(logits, dim=1)
    return {"x": x, "y": torch.log_softmax(logits, dim=1) if log else probs}


class CountingSGD(torch.optim.Optimizer):
    """A user optimizer keeping Python numbers in its state (`tests.userpkg:CountingSGD`): a step count (int) and
    a running scale (float) that shrinks the step."""

    def __init__(self, params, lr: float = 1e-3, decay: float = 0.5) -> None:
        super().__init__(params, {"lr": lr, "decay": decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["count"], state["scale"] = 0, 1.0
                state["count"] += 1
                state["scale"] *= group["decay"]
                p.add_(p.grad, alpha=-group["lr"] * (1.0 + state["scale"]) / state["count"])
        return None
