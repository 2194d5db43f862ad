"""Datasets: built-in generators, user datasets by import path or directory, the data digest and batch order.

Every built-in generator works in integers and scales once by a power of two, so its bytes are the same on every
platform. Batch order is one permutation per epoch, keyed by (seed, "order", epoch): a verifier can re-derive the
batch of any step without replaying the ones before it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import rng
from .canonical import Digest, compute_hash
from .components import CodePolicy, is_import_path, load_callable
from .digest import combine_digests, tensor_digests
from .errors import ComponentError, DataError, DataNotProvided
from .spec import MAX_BATCH_TENSORS
from .zoo import ZOO_DATA

__all__ = ["Dataset", "BUILTIN_DATA", "MAX_BUILTIN_ELEMENTS", "build_dataset", "data_digest", "batch_indices", "steps_per_epoch"]

MAX_BUILTIN_ELEMENTS = 1 << 27  # a built-in dataset's kwargs come from a spec, maybe a stranger's: bounded before memory

CHARS_ALPHABET = " abcdefghijklmnopqrstuvwxyz.,!?\n"  # 32 symbols: token id = position


@dataclass(frozen=True)
class Dataset:
    """Named tensors sharing their first dimension (one row per sample): the model's inputs (`x`, or e.g.
    `input_ids` and `attention_mask`) and the target (`y`, or as the spec names it). A batch is the same names,
    each tensor indexed by the batch's sample indices."""

    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if not 0 < len(self.tensors) <= MAX_BATCH_TENSORS:
            raise DataError(f"a dataset holds 1 to {MAX_BATCH_TENSORS} named tensors, got {len(self.tensors)}")
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
                raise DataError(f"dataset tensor name {str(name)[:80]!r} is not an identifier of at most 64 characters")
            if not isinstance(t, torch.Tensor):
                raise DataError(f"dataset entry {name!r} is a {type(t).__name__}, not a tensor")
        n = {t.shape[0] if t.dim() else -1 for t in self.tensors.values()}
        if len(n) != 1 or -1 in n:
            raise DataError(f"dataset tensors {sorted(self.tensors)} must share their first dimension (one row per sample)")

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(np.array(idx, dtype=np.int64))
        return {name: t.index_select(0, index) for name, t in self.tensors.items()}


def _synthetic(seed: int = 0, n: int = 4096, d_in: int = 32, classes: int = 10, hidden: int = 64) -> Dataset:
    """Classification by a random integer teacher network (exact integer arithmetic, so labels are portable)."""
    x_int = rng.small_ints(seed, "data/synthetic/x", [], (n, d_in), -64, 64)
    w1 = rng.small_ints(seed, "data/synthetic/w1", [], (d_in, hidden), -8, 8)
    w2 = rng.small_ints(seed, "data/synthetic/w2", [], (hidden, classes), -8, 8)
    logits = np.maximum(x_int @ w1, 0) @ w2  # int64, exact
    y = np.argmax(logits, axis=1).astype(np.int64)
    x = (x_int.astype(np.float32) / np.float32(32.0)).astype(np.float32)
    return Dataset({"x": torch.from_numpy(x), "y": torch.from_numpy(y)})


def _images(seed: int = 0, n: int = 2048, size: int = 16, classes: int = 10, channels: int = 1) -> Dataset:
    """Greyscale images: a per-class integer template plus integer noise, scaled by 1/64."""
    templates = rng.small_ints(seed, "data/images/templates", [], (classes, channels, size, size), -48, 48)
    y = rng.small_ints(seed, "data/images/labels", [], (n,), 0, classes)
    noise = rng.small_ints(seed, "data/images/noise", [], (n, channels, size, size), -40, 40)
    x = ((templates[y] + noise).astype(np.float32) / np.float32(64.0)).astype(np.float32)
    return Dataset({"x": torch.from_numpy(x), "y": torch.from_numpy(y.astype(np.int64))})


def _chars(seed: int = 0, length: int = 1 << 16, block_size: int = 32, words: int = 200) -> Dataset:
    """A character corpus from a seeded vocabulary and a word-to-word Markov chain; windows of block_size + 1."""
    letters = CHARS_ALPHABET[1:27]
    lengths = rng.small_ints(seed, "data/chars/word-lengths", [], (words,), 2, 9)
    letter_ids = rng.small_ints(seed, "data/chars/letters", [], (words, 8), 0, 26)
    vocab = ["".join(letters[i] for i in letter_ids[w, : lengths[w]]) for w in range(words)]
    successors = rng.small_ints(seed, "data/chars/successors", [], (words, 4), 0, words)
    choices = rng.small_ints(seed, "data/chars/walk", [], (length,), 0, 16)
    pieces, total, word = [], 0, 0
    for c in choices:
        word = int(successors[word, c % 4])
        sep = ".\n" if c == 15 else ", " if c == 14 else " "
        pieces.append(vocab[word] + sep)
        total += len(pieces[-1])
        if total >= length:
            break
    text = "".join(pieces)[:length]
    ids = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    table = np.zeros(256, dtype=np.int64)
    table[np.frombuffer(CHARS_ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(len(CHARS_ALPHABET))
    tokens = table[ids]
    stride = block_size // 2 or 1
    starts = np.arange(0, len(tokens) - block_size - 1, stride)
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts])
    return Dataset({"x": torch.from_numpy(windows[:, :-1].copy()), "y": torch.from_numpy(windows[:, 1:].copy())})


BUILTIN_DATA: dict[str, Any] = {"synthetic": _synthetic, "images": _images, "chars": _chars, **ZOO_DATA}


def _builtin_elements(name: str, kwargs: Mapping[str, Any]) -> int:
    """An upper bound on the numbers a built-in generator makes with `kwargs` (checked before it runs)."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(BUILTIN_DATA[name]).parameters.items()}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise ComponentError(f"dataset {name!r} has no arguments {sorted(unknown)}")
    args = {**defaults, **kwargs}
    if not all(type(v) is int and 0 <= v <= MAX_BUILTIN_ELEMENTS for v in args.values()):
        raise ComponentError(f"dataset {name!r}: every argument must be an integer in [0, {MAX_BUILTIN_ELEMENTS}], got {dict(kwargs)}")
    if name == "synthetic":
        return args["n"] * args["d_in"] + args["d_in"] * args["hidden"] + args["hidden"] * args["classes"] + args["n"]
    if name in ("images", "pixels"):
        pixels = args["channels"] * args["size"] ** 2
        return (args["n"] + args["classes"]) * pixels + args["n"]
    if name == "tokens":  # the chars corpus with its default words, and three tensors of windows
        return 4 * args["length"] + 3 * args["length"] * (args["block_size"] + 1) + 16 * 200
    return 4 * args["length"] + args["length"] * (args["block_size"] + 1) + 16 * args["words"]  # chars: walk, windows


def _check_builtin_size(name: str, kwargs: Mapping[str, Any]) -> None:
    elements = _builtin_elements(name, kwargs)
    if elements > MAX_BUILTIN_ELEMENTS:
        raise ComponentError(f"dataset {name!r} with {dict(kwargs)} would hold about {elements:,} numbers, more than the "
                             f"{MAX_BUILTIN_ELEMENTS:,} a built-in dataset may hold")


def _from_directory(path: Path) -> Dataset:
    """Concatenate the tensors of every `*.safetensors` file of a directory, in sorted file-name order. Every file
    holds the same tensor names (e.g. `x` and `y`, or `input_ids`, `attention_mask` and `labels`)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DataError(f"data directory {path} holds no .safetensors files")
    parts: dict[str, list[torch.Tensor]] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"cannot read data file {f}: {exc}") from None
        if parts and set(tensors) != set(parts):
            raise DataError(f"data file {f} holds tensors {sorted(tensors)}, the files before it {sorted(parts)}")
        for name, t in tensors.items():
            parts.setdefault(name, []).append(t)
    try:
        return Dataset({name: torch.cat(ts) for name, ts in parts.items()})
    except RuntimeError as exc:
        raise DataError(f"data files in {path} do not fit together: {exc}") from None


def _coerce(value: Any, name: str) -> Dataset:
    if isinstance(value, Dataset):
        return value
    if isinstance(value, Mapping):
        return Dataset(dict(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Dataset({"x": value[0], "y": value[1]})
    if isinstance(value, torch.utils.data.TensorDataset) and len(value.tensors) == 2:
        return Dataset({"x": value.tensors[0], "y": value.tensors[1]})
    raise ComponentError(f"dataset {name!r} returned {type(value).__name__}; expected a dict of named tensors or (x, y)")


def build_dataset(name: str, kwargs: Mapping[str, Any], *, data_dir: str | Path | None = None, code: CodePolicy | None = None) -> Dataset:
    """Build the dataset a spec names. `data_dir` overrides the directory of a `dir:` dataset (same digest needed).
    User code is imported only if `code` allows it (default: built-ins only). The path of a `dir:` dataset is read
    only by the caller who wrote the spec (`code.trust_all`); anyone else (a verifier, a referee) must say where its
    copy is (`data_dir`), so a stranger's spec never picks which local files are read.

    Raises CodeNotAllowed, ComponentError (unknown name, bad arguments), DataNotProvided (a `dir:` dataset without
    `data_dir` for a caller that did not write the spec) or DataError (unreadable or malformed data).
    """
    if name.startswith("dir:"):
        if data_dir is None and not (code is not None and code.trust_all):
            raise DataNotProvided(name)
        path = Path(data_dir) if data_dir is not None else Path(name[4:])
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist")
        return _from_directory(path)
    if name in BUILTIN_DATA:
        _check_builtin_size(name, kwargs)
        factory = BUILTIN_DATA[name]
    elif is_import_path(name):
        factory = load_callable(name, code or CodePolicy())
    else:
        raise ComponentError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_DATA)}, 'module:callable' or 'dir:PATH'")
    try:
        value = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ComponentError(f"cannot build dataset {name!r} with {dict(kwargs)}: {exc}") from None
    except Exception as exc:  # user code raising anything else: one line, not a traceback
        raise ComponentError(f"dataset {name!r} raised {type(exc).__name__} while being built: {str(exc)[:300]}") from exc
    dataset = _coerce(value, name)
    return Dataset({k: t.detach().to("cpu").contiguous() for k, t in dataset.tensors.items()})


def data_digest(dataset: Dataset) -> Digest:
    """The digest the spec binds: every byte of every tensor, with names, dtypes and shapes."""
    return compute_hash("pol/data/v1", bytes.fromhex(combine_digests(tensor_digests(dataset.tensors)))).hex()


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped). Raises DataError if there is not one."""
    if n < batch_size:
        raise DataError(f"the dataset has {n} samples, fewer than one batch of {batch_size}")
    return n // batch_size


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    order = rng.permutation(seed, "order", [epoch], n)
    order.setflags(write=False)
    return order


def batch_indices(seed: int, n: int, batch_size: int, step: int) -> np.ndarray:
    """Sample indices of the batch consumed by the step that goes from state `step` to `step + 1`."""
    spe = steps_per_epoch(n, batch_size)
    epoch, j = divmod(step, spe)
    return _epoch_order(seed, epoch, n)[j * batch_size : (j + 1) * batch_size]
