"""Built-in models (`mlp`, `cnn`, `transformer`, and the zoo of `pol.zoo`), user models by import path, and seeded initialisation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from .. import rng
from ..components import CodePolicy, is_import_path, load_callable
from ..errors import ComponentError, PolError
from ..randomness import init_context
from ..spec import Component
from ..zoo import ZOO_MODELS
from .cnn import CNN
from .common import SeededDropout
from .mlp import MLP
from .transformer import GPT

__all__ = ["BUILTIN_MODELS", "MAX_BUILTIN_PARAMETERS", "build_model", "init_parameters", "SeededDropout", "MLP", "CNN", "GPT"]

BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "transformer": GPT, **ZOO_MODELS}
MAX_BUILTIN_PARAMETERS = 1 << 28  # a built-in model's kwargs come from a spec, maybe a stranger's: bounded before memory


def _check_builtin_size(component: Component) -> None:
    """Build the built-in model on the meta device (no memory) and refuse one larger than MAX_BUILTIN_PARAMETERS."""
    try:
        with torch.device("meta"):
            model = BUILTIN_MODELS[component.name](**component.kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ComponentError(f"cannot build model {component.name!r} with {dict(component.kwargs)}: {exc}") from None
    count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if count > MAX_BUILTIN_PARAMETERS:
        raise ComponentError(f"model {component.name!r} with {dict(component.kwargs)} has {count:,} parameters, more than "
                             f"the {MAX_BUILTIN_PARAMETERS:,} a built-in model may have")


def build_model(component: Component, code: CodePolicy | None = None, *, init_seed: int | None = None) -> nn.Module:
    """Construct the model a spec names. User code is imported only if `code` allows it (default: built-ins only).
    With `init_seed`, the model is constructed under `pol.randomness.init_context(init_seed)`: its own
    initialisation (`reset_parameters`, `_init_weights`, `torch.nn.init`) draws from pol.rng, identically on every
    machine; without, from torch's generator (for counting parameters only). Raises CodeNotAllowed, ComponentError."""
    if component.name in BUILTIN_MODELS:
        _check_builtin_size(component)
        factory = BUILTIN_MODELS[component.name]
    elif is_import_path(component.name):
        factory = load_callable(component.name, code or CodePolicy())
    else:
        raise ComponentError(
            f"unknown model {component.name!r}: use one of {', '.join(BUILTIN_MODELS)} or 'module:callable'"
        )
    try:
        with init_context(init_seed) if init_seed is not None else contextlib.nullcontext():
            model = factory(**component.kwargs)
    except PolError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise ComponentError(f"cannot build model {component.name!r} with {dict(component.kwargs)}: {exc}") from None
    except Exception as exc:  # user code raising anything else: one line, not a traceback
        raise ComponentError(f"model {component.name!r} raised {type(exc).__name__} while being built: {str(exc)[:300]}") from exc
    if not isinstance(model, nn.Module):
        raise ComponentError(f"model {component.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def init_parameters(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter from the hardware-independent generator, keyed by (seed, "init/<name>").

    The rule follows torch's defaults so user models train as they would otherwise: matrices and convolution
    kernels uniform in +-1/sqrt(fan_in); embeddings normal with std 1; one-dimensional weights (norms) 1; biases 0.
    """
    embedding_weights = {f"{prefix}.weight" if prefix else "weight" for prefix, m in model.named_modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = tuple(param.shape)
            if name in embedding_weights:
                value = rng.normal(seed, f"init/{name}", [], shape, 1.0)
            elif name.endswith("bias"):
                value = torch.zeros(shape)
            elif param.dim() <= 1:
                value = torch.ones(shape)
            else:
                bound = 1.0 / math.sqrt(math.prod(shape[1:]))
                value = rng.uniform(seed, f"init/{name}", [], shape, -bound, bound)
            param.copy_(value.to(dtype=param.dtype))
