"""The model zoo: tiny configurations of `transformers` models (GPT-2, Llama, BERT, ViT, ResNet) as built-in model
names, and the data they train on, made from pol's built-in generators (no downloads).

The models are transformers' own classes, built from a config with their default dropout, attention implementation
(SDPA) and initialisation; only the sizes are small. `transformers` is an optional dependency (`pip install
pol[zoo]`), imported when a zoo model is built; since it is code pol runs, its version is bound into the spec of a
job that uses one (`pol.engine.resolve_spec`) and a verifier with another version cannot verify (VersionMismatch).

Data: `tokens` is pol's `chars` corpus as `input_ids`/`labels` (with `attention_mask` and some padded rows when
`padded=1`: the padding is masked in attention and its labels are -100, ignored by the loss); `pixels` is pol's
`images` with `channels` channels at `size`x`size` as `pixel_values`/`labels`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from . import rng
from .errors import ComponentError

__all__ = ["ZOO_MODELS", "ZOO_DATA", "is_zoo_model", "get_transformers_version", "tokens", "pixels"]

VOCAB = 32  # pol's chars alphabet


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ComponentError("the model zoo needs the transformers package: pip install 'pol[zoo]'") from None


def get_transformers_version() -> str:
    """The installed transformers version. Raises ComponentError if it is missing."""
    return str(_transformers().__version__)


class _Logits(nn.Module):
    """A transformers model called with keyword inputs, returning its logits (so `.logits` is read and any
    built-in loss of the model is never computed: pol's loss is the spec's)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(**inputs).logits


def gpt2(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 32) -> nn.Module:
    """transformers' GPT2LMHeadModel: learned positions, GELU (tanh), layer norm, dropout 0.1 (embedding,
    attention, residual), SDPA attention."""
    tf = _transformers()
    config = tf.GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                           bos_token_id=0, eos_token_id=0)
    return _Logits(tf.GPT2LMHeadModel(config))


def llama(num_hidden_layers: int = 2, hidden_size: int = 64, num_attention_heads: int = 4, num_key_value_heads: int = 2,
          intermediate_size: int = 128, max_position_embeddings: int = 32) -> nn.Module:
    """transformers' LlamaForCausalLM: RMS norm, rotary embeddings, SiLU-gated MLP, grouped-query SDPA attention."""
    tf = _transformers()
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                            num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings)
    return _Logits(tf.LlamaForCausalLM(config))


def bert(num_hidden_layers: int = 2, hidden_size: int = 64, num_attention_heads: int = 4, intermediate_size: int = 128,
         max_position_embeddings: int = 32) -> nn.Module:
    """transformers' BertForTokenClassification (one class per token: the next character), bidirectional SDPA
    attention under the batch's attention mask, dropout 0.1."""
    tf = _transformers()
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                           max_position_embeddings=max_position_embeddings, num_labels=VOCAB)
    return _Logits(tf.BertForTokenClassification(config))


def vit(image_size: int = 16, patch_size: int = 4, num_channels: int = 3, num_hidden_layers: int = 2, hidden_size: int = 64,
        num_attention_heads: int = 4, intermediate_size: int = 128, num_labels: int = 10) -> nn.Module:
    """transformers' ViTForImageClassification: patch embedding (a strided convolution), CLS token, SDPA."""
    tf = _transformers()
    config = tf.ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                          num_hidden_layers=num_hidden_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                          intermediate_size=intermediate_size, num_labels=num_labels)
    return _Logits(tf.ViTForImageClassification(config))


def resnet(num_channels: int = 3, embedding_size: int = 16, hidden_sizes: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (1, 1),
           layer_type: str = "basic", num_labels: int = 10) -> nn.Module:
    """transformers' ResNetForImageClassification: convolutions, batch norm, ReLU, max and adaptive average pooling."""
    tf = _transformers()
    config = tf.ResNetConfig(num_channels=num_channels, embedding_size=embedding_size, hidden_sizes=list(hidden_sizes),
                             depths=list(depths), layer_type=layer_type, num_labels=num_labels)
    return _Logits(tf.ResNetForImageClassification(config))


ZOO_MODELS: dict[str, Callable[..., nn.Module]] = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "resnet": resnet}


def is_zoo_model(name: str) -> bool:
    return name in ZOO_MODELS


def tokens(seed: int = 0, length: int = 1 << 14, block_size: int = 32, padded: int = 0) -> dict[str, torch.Tensor]:
    """pol's `chars` windows as `input_ids` and next-character `labels`. With `padded=1`, an `attention_mask` too, and
    about a quarter of the rows padded from a seeded position on (token 0, mask 0, label -100: ignored by the loss)."""
    from .data import _chars

    d = _chars(seed=seed, length=length, block_size=block_size)
    ids, labels = d.tensors["x"].clone(), d.tensors["y"].clone()
    if not padded:
        return {"input_ids": ids, "labels": labels}
    n, t = ids.shape
    cut = rng.small_ints(seed, "data/tokens/pad", [], (n,), t // 2, 4 * t)  # >= t: not padded
    keep = torch.from_numpy(np.arange(t)[None, :] < cut[:, None])
    return {"input_ids": ids.masked_fill(~keep, 0), "attention_mask": keep.to(torch.int64), "labels": labels.masked_fill(~keep, -100)}


def pixels(seed: int = 0, n: int = 512, size: int = 16, channels: int = 3, classes: int = 10) -> dict[str, torch.Tensor]:
    """pol's `images` with `channels` channels of `size`x`size` as `pixel_values` and `labels`."""
    from .data import _images

    d = _images(seed=seed, n=n, size=size, classes=classes, channels=channels)
    return {"pixel_values": d.tensors["x"], "labels": d.tensors["y"]}


ZOO_DATA: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"tokens": tokens, "pixels": pixels}
