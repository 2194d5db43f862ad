"""Datasets: built-in generators, user datasets by import path or directory, the data digest and batch order.

A dataset is held in memory (a dict of tensors) or read lazily, sample by sample: `dir:` shards of safetensors
(never concatenated), memory-mapped `.npy` arrays, or a torch map-style Dataset a `module:callable` returns. Either
way a step's batch is its samples in pol's keyed order (fetched on `POL_DATA_WORKERS` threads if set: no bit
changes), and the data digest is the same for the same bytes, streamed for lazy data (`data_digest`).

Every built-in generator works in integers and scales once by a power of two, so its bytes are the same on every
platform. Batch order is one permutation per epoch, keyed by (seed, "order", epoch): a verifier can re-derive the
batch of any step without replaying the ones before it.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from . import rng
from .canonical import Digest, compute_hash
from .components import CodePolicy, is_import_path, load_callable
from .digest import _header, combine_digests, tensor_bytes, tensor_digests
from .errors import ComponentError, DataError, DataNotProvided
from .spec import MAX_BATCH_TENSORS
from .zoo import ZOO_DATA

__all__ = ["Dataset", "LazyDataset", "ShardedDataset", "NumpyDataset", "TorchDataset", "memory_cap", "data_workers", "map_samples", "BUILTIN_DATA", "MAX_BUILTIN_ELEMENTS", "build_dataset", "data_digest", "batch_indices", "steps_per_epoch"]

MAX_BUILTIN_ELEMENTS = 1 << 27  # a built-in dataset's kwargs come from a spec, maybe a stranger's: bounded before memory

CHARS_ALPHABET = " abcdefghijklmnopqrstuvwxyz.,!?\n"  # 32 symbols: token id = position


class Dataset:
    """Named tensors sharing their first dimension (one row per sample): the model's inputs (`x`, or e.g.
    `input_ids` and `attention_mask`) and the target (`y`, or as the spec names it). A batch is the same names,
    each tensor indexed by the batch's sample indices.

    This class holds its tensors in memory; its subclasses read samples lazily (`LazyDataset`: safetensors shards,
    memory-mapped numpy arrays, a torch map-style Dataset) or augment them (`pol.augment.Augmented`). Every kind
    gives `names`, `layout` (per-sample dtype and shape), `len`, `batch(idx)`, `chunks()` (rows in index order,
    for the digest) and `transform(batch, seed=, step=, idx=)` (identity here; augmentation)."""

    in_memory = True

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        _check_names(tensors)
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise DataError(f"dataset entry {name!r} is a {type(t).__name__}, not a tensor")
        n = {t.shape[0] if t.dim() else -1 for t in tensors.values()}
        if len(n) != 1 or -1 in n:
            raise DataError(f"dataset tensors {sorted(tensors)} must share their first dimension (one row per sample)")
        self._tensors = dict(tensors)

    @property
    def tensors(self) -> Mapping[str, Any]:
        """The tensors by name (a lazy dataset gives each name's per-sample (dtype, shape) instead: no data)."""
        return self._tensors

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.tensors))

    @property
    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each tensor's per-sample dtype and shape."""
        return {name: (t.dtype, tuple(t.shape[1:])) for name, t in self._tensors.items()}

    @property
    def nbytes(self) -> int:
        return len(self) * sum(_row_bytes(d, s) for d, s in self.layout.values())

    def __len__(self) -> int:
        return int(next(iter(self._tensors.values())).shape[0])

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(np.array(idx, dtype=np.int64))
        return {name: t.index_select(0, index) for name, t in self._tensors.items()}

    def chunks(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rows in index order, in consecutive pieces (here: one piece, the tensors themselves)."""
        yield self._tensors

    def transform(self, batch: dict[str, torch.Tensor], *, seed: int, step: int, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch a step consumes from the fetched rows: unchanged here; augmentation's draws (pol.augment)."""
        return batch

    @property
    def digest_key(self) -> tuple[Any, ...] | None:
        """A key under which this data's digest may be reused within the process (files unchanged), or None."""
        return None


def _check_names(names: Iterable[Any]) -> None:
    names = list(names)
    if not 0 < len(names) <= MAX_BATCH_TENSORS:
        raise DataError(f"a dataset holds 1 to {MAX_BATCH_TENSORS} named tensors, got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
            raise DataError(f"dataset tensor name {str(name)[:80]!r} is not an identifier of at most 64 characters")


def _row_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------- memory and workers

MEMORY_ENV = "POL_DATA_MEMORY"  # bytes (suffix K, M or G allowed): the most data pol holds in memory at once
WORKERS_ENV = "POL_DATA_WORKERS"  # threads fetching a step's samples (0: the calling thread); changes no bit
DIGEST_CHUNK_BYTES = 16 << 20  # a lazy dataset is hashed in pieces of about this size (less under a memory cap)


def memory_cap() -> int | None:
    """The cap `POL_DATA_MEMORY` sets on the data bytes pol holds at once (None: no cap). An in-memory dataset
    larger than it is refused; a lazily read one may be any size, each read (a batch, a digest piece) is checked."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return None
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise DataError(f"{MEMORY_ENV}={text!r}: expected a number of bytes, optionally with K, M or G") from None
    if value <= 0:
        raise DataError(f"{MEMORY_ENV}={text!r}: expected a positive number of bytes")
    return value


def check_memory(nbytes: int, what: str) -> None:
    """Raise DataError if holding `nbytes` of data at once would pass the `POL_DATA_MEMORY` cap."""
    cap = memory_cap()
    if cap is not None and nbytes > cap:
        raise DataError(f"{what} holds {nbytes:,} bytes, more than the {cap:,} that {MEMORY_ENV} allows in memory "
                        f"(give the data as dir: shards, .npy arrays or a torch Dataset: they are read lazily)")


def data_workers() -> int:
    """How many threads fetch (and augment) a step's samples, from `POL_DATA_WORKERS` (default 0: none). An
    execution choice, not part of the spec: every sample is placed at its position in pol's order, so any count
    gives the same batch."""
    text = os.environ.get(WORKERS_ENV, "").strip() or "0"
    try:
        workers = int(text)
    except ValueError:
        raise DataError(f"{WORKERS_ENV}={text!r}: expected a number of threads") from None
    if not 0 <= workers <= 64:
        raise DataError(f"{WORKERS_ENV}={text!r}: expected 0 to 64 threads")
    return workers


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def map_samples(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`[fn(item) for item in items]`, on `data_workers()` threads when there are some: the result's order is the
    items' order, whichever thread finished first."""
    workers = data_workers()
    if workers == 0 or len(items) < 2:
        return [fn(item) for item in items]
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pol-data")
    return list(pool.map(fn, items))


# ----------------------------------------------------------------------------------------------------- lazy datasets


class LazyDataset(Dataset):
    """A dataset read sample by sample, never whole: a subclass gives `read_sample(i)` (one sample's tensors, no
    leading dimension) and may give a faster `read_rows(start, stop)`. A batch stacks its samples in pol's order
    (`torch.stack`, fetched on `POL_DATA_WORKERS` threads); the digest streams the rows in index order."""

    in_memory = False

    def __init__(self, n: int, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        _check_names(layout)
        self._n = int(n)
        self._layout = {name: (dtype, tuple(int(d) for d in shape)) for name, (dtype, shape) in layout.items()}

    @property
    def tensors(self) -> Mapping[str, Any]:
        return self._layout

    @property
    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return dict(self._layout)

    def __len__(self) -> int:
        return self._n

    def read_sample(self, i: int) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return self._stack([self.read_sample(i) for i in range(start, stop)], start)

    def _checked_sample(self, i: int) -> Mapping[str, torch.Tensor]:
        sample = self.read_sample(i)
        if set(sample) != set(self._layout):
            raise DataError(f"sample {i} holds tensors {sorted(sample)}, the dataset {sorted(self._layout)}")
        for name, t in sample.items():
            dtype, shape = self._layout[name]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise DataError(f"sample {i}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, sample 0's {dtype} {shape}")
        return sample

    def _stack(self, samples: Sequence[Mapping[str, torch.Tensor]], first: int) -> dict[str, torch.Tensor]:
        return {name: torch.stack([s[name] for s in samples]) if samples else torch.empty((0, *shape), dtype=dtype)
                for name, (dtype, shape) in self._layout.items()}

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in np.asarray(idx, dtype=np.int64)]
        check_memory(len(indices) * sum(_row_bytes(d, s) for d, s in self._layout.values()), "a batch")
        return self._stack(map_samples(self._checked_sample, indices), 0)

    def chunks(self) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive rows in pieces of at most a quarter of the memory cap (and DIGEST_CHUNK_BYTES), never across
        the `_piece_ends` boundaries (a shard's end): a piece is read, hashed and dropped before the next."""
        row = max(1, sum(_row_bytes(d, s) for d, s in self._layout.values()))
        cap = memory_cap()
        size = max(1, min(DIGEST_CHUNK_BYTES, cap // 4 if cap else DIGEST_CHUNK_BYTES) // row)
        start = 0
        for end in self._piece_ends():
            while start < end:
                stop = min(end, start + size)
                check_memory((stop - start) * row, "a piece of the data being hashed")
                yield self.read_rows(start, stop)
                start = stop

    def _piece_ends(self) -> list[int]:
        return [self._n]


class ShardedDataset(LazyDataset):
    """`*.safetensors` shards of one directory, in sorted file-name order, read lazily: each shard is opened with
    safetensors' `safe_open` (memory-mapped) and only the rows asked for are read; the shards are never
    concatenated. Every shard holds the same tensor names, with the same per-row dtype and shape."""

    def __init__(self, files: Sequence[Path]) -> None:
        if not files:
            raise DataError("a sharded dataset needs at least one .safetensors file")
        self.files = [Path(f) for f in files]
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None
        self._starts: list[int] = []
        n = 0
        for f in self.files:
            rows, shard_layout = self._shard_layout(f)
            if layout is None:
                layout = shard_layout
            elif shard_layout != layout:
                raise DataError(f"data file {f} holds {_describe(shard_layout)}, the files before it {_describe(layout)}")
            self._starts.append(n)
            n += rows
        assert layout is not None
        super().__init__(n, layout)
        self._local = threading.local()

    @staticmethod
    def _shard_layout(f: Path) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
        try:
            with safe_open(str(f), framework="pt") as handle:
                layout, rows = {}, set()
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    shape = tuple(sl.get_shape())
                    if not shape:
                        raise DataError(f"data file {f}: tensor {name!r} is a scalar, not rows")
                    rows.add(shape[0])
                    layout[name] = (_SAFETENSORS_DTYPES.get(sl.get_dtype()), shape[1:])
        except (SafetensorError, OSError) as exc:
            raise DataError(f"cannot read data file {f}: {exc}") from None
        if None in {d for d, _ in layout.values()}:
            raise DataError(f"data file {f} holds a dtype pol does not read")
        if len(rows) != 1:
            raise DataError(f"data file {f}: tensors {sorted(layout)} must share their first dimension")
        _check_names(layout)
        return rows.pop(), layout  # type: ignore[return-value]

    def _handle(self, shard: int) -> Any:
        """This thread's open handle of a shard (safetensors' handles are not shared between threads)."""
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        if shard not in handles:
            try:
                handles[shard] = safe_open(str(self.files[shard]), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise DataError(f"cannot read data file {self.files[shard]}: {exc}") from None
        return handles[shard]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._n:
            raise DataError(f"sample index {i} is outside the dataset's {self._n} rows")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def _read(self, shard: int, a: int, b: int) -> dict[str, torch.Tensor]:
        handle = self._handle(shard)
        return {name: handle.get_slice(name)[a:b] for name in self._layout}

    def read_sample(self, i: int) -> Mapping[str, torch.Tensor]:
        shard, row = self._locate(i)
        return {name: t[0] for name, t in self._read(shard, row, row + 1).items()}

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        parts: list[dict[str, torch.Tensor]] = []
        i = start
        while i < stop:
            shard, row = self._locate(i)
            end = self._starts[shard + 1] if shard + 1 < len(self._starts) else self._n
            take = min(stop, end) - i
            parts.append(self._read(shard, row, row + take))
            i += take
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([p[name] for p in parts]) for name in self._layout}

    def _piece_ends(self) -> list[int]:
        return [*self._starts[1:], self._n]

    @property
    def digest_key(self) -> tuple[Any, ...] | None:
        return _files_key(self.files)


class NumpyDataset(LazyDataset):
    """`*.npy` arrays of one directory, one per tensor (`x.npy` is the tensor `x`), memory-mapped
    (`np.load(mmap_mode="r")`): only the rows asked for are read."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = sorted(Path(f) for f in files)
        self._arrays: dict[str, np.ndarray] = {}
        for f in self.files:
            try:
                array = np.load(str(f), mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read data file {f}: {exc}") from None
            if array.ndim == 0 or array.dtype.byteorder == ">" or array.dtype not in _NUMPY_DTYPES:
                raise DataError(f"data file {f}: expected rows of a little-endian number type, got {array.dtype} {array.shape}")
            self._arrays[f.stem] = array
        _check_names(self._arrays)
        rows = {a.shape[0] for a in self._arrays.values()}
        if len(rows) != 1:
            raise DataError(f"the arrays in {self.files[0].parent} must share their first dimension, got {sorted(rows)}")
        super().__init__(rows.pop(), {name: (_NUMPY_DTYPES[a.dtype], a.shape[1:]) for name, a in self._arrays.items()})

    def read_sample(self, i: int) -> Mapping[str, torch.Tensor]:
        if not 0 <= i < self._n:
            raise DataError(f"sample index {i} is outside the dataset's {self._n} rows")
        return {name: torch.from_numpy(np.array(a[i])) for name, a in self._arrays.items()}

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(a[start:stop])) for name, a in self._arrays.items()}

    @property
    def digest_key(self) -> tuple[Any, ...] | None:
        return _files_key(self.files)


class TorchDataset(LazyDataset):
    """A torch map-style `torch.utils.data.Dataset` (`len(ds)`, `ds[i]`), indexed sample by sample in pol's order.
    A sample is a dict of named tensors, or a pair (x, y) named `x` and `y`; numpy arrays become tensors, Python
    ints int64 and Python floats float32 scalars (a label). Every sample has sample 0's names, dtypes and shapes."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        try:
            n = len(dataset)
        except TypeError:
            raise DataError(f"a {type(dataset).__name__} has no length: pol indexes map-style datasets only") from None
        if n < 1:
            raise DataError("the torch dataset is empty")
        first = self._convert(0)
        super().__init__(n, {name: (t.dtype, tuple(t.shape)) for name, t in first.items()})

    def _convert(self, i: int) -> dict[str, torch.Tensor]:
        try:
            sample = self.dataset[i]
        except Exception as exc:  # user code: one line, not a traceback
            raise DataError(f"the torch dataset raised {type(exc).__name__} for sample {i}: {str(exc)[:300]}") from exc
        if isinstance(sample, Mapping):
            items = dict(sample)
        elif isinstance(sample, (tuple, list)) and len(sample) == 2:
            items = {"x": sample[0], "y": sample[1]}
        else:
            raise DataError(f"sample {i} of the torch dataset is a {type(sample).__name__}: expected a dict of tensors or (x, y)")
        out = {}
        for name, value in items.items():
            if isinstance(value, torch.Tensor):
                out[name] = value.detach().to("cpu").contiguous()
            elif isinstance(value, np.ndarray):
                out[name] = torch.from_numpy(np.ascontiguousarray(value))
            elif isinstance(value, (bool, np.bool_)):
                out[name] = torch.tensor(bool(value))
            elif isinstance(value, (int, np.integer)):
                out[name] = torch.tensor(int(value), dtype=torch.int64)
            elif isinstance(value, (float, np.floating)):
                out[name] = torch.tensor(float(value), dtype=torch.float32)
            else:
                raise DataError(f"sample {i}: {name!r} is a {type(value).__name__}, not a tensor, array or number")
        return out

    def read_sample(self, i: int) -> Mapping[str, torch.Tensor]:
        return self._convert(i)


def _describe(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> str:
    return ", ".join(f"{name} {dtype} {list(shape)}" for name, (dtype, shape) in sorted(layout.items()))


def _files_key(files: Sequence[Path]) -> tuple[Any, ...] | None:
    try:
        stats = [(str(f.resolve()), (st := f.stat()).st_size, st.st_ino, st.st_mtime_ns) for f in files]
    except OSError:
        return None
    if max(s[3] for s in stats) >= time.time_ns() - 2_000_000_000:  # changed within the clock's granularity: no reuse
        return None
    return tuple(stats)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
_NUMPY_DTYPES = {np.dtype(k): v for k, v in {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
                 "bool": torch.bool}.items()}


# ------------------------------------------------------------------------------------------------------ built-ins


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
    """The `*.safetensors` shards of a directory, in sorted file-name order, read lazily (`ShardedDataset`: every
    shard holds the same tensor names, e.g. `x` and `y`, or `input_ids`, `attention_mask` and `labels`), or else
    its `*.npy` arrays, one per tensor, memory-mapped (`NumpyDataset`)."""
    files = sorted(path.glob("*.safetensors"))
    arrays = sorted(path.glob("*.npy"))
    if files and arrays:
        raise DataError(f"data directory {path} holds both .safetensors and .npy files: keep one kind")
    if files:
        return ShardedDataset(files)
    if arrays:
        return NumpyDataset(arrays)
    raise DataError(f"data directory {path} holds no .safetensors or .npy files")


def _coerce(value: Any, name: str) -> Dataset:
    if isinstance(value, LazyDataset):
        return value
    if isinstance(value, Dataset):  # an in-memory one, or an augmented one (pol.augment.Augmented)
        inner = getattr(value, "inner", None)
        if inner is not None and not isinstance(inner, Dataset):
            value.inner = _coerce(inner, name)
        return value
    if isinstance(value, Mapping):
        return Dataset(dict(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Dataset({"x": value[0], "y": value[1]})
    if isinstance(value, torch.utils.data.TensorDataset) and len(value.tensors) == 2:
        return Dataset({"x": value.tensors[0], "y": value.tensors[1]})
    if isinstance(value, torch.utils.data.IterableDataset):
        raise ComponentError(f"dataset {name!r} returned an IterableDataset: pol indexes map-style datasets only "
                             f"(its order is pol's, so a verifier can fetch any step's batch)")
    if isinstance(value, torch.utils.data.Dataset):
        return TorchDataset(value)
    raise ComponentError(f"dataset {name!r} returned {type(value).__name__}; expected a dict of named tensors, (x, y) "
                         f"or a torch map-style Dataset")


AUGMENT_KWARG = "augment"  # a data component's kwarg that pol takes for itself: the augmentation pipeline


def build_dataset(name: str, kwargs: Mapping[str, Any], *, data_dir: str | Path | None = None, code: CodePolicy | None = None) -> Dataset:
    """Build the dataset a spec names. `data_dir` overrides the directory of a `dir:` dataset (same digest needed).
    User code is imported only if `code` allows it (default: built-ins only). The path of a `dir:` dataset is read
    only by the caller who wrote the spec (`code.trust_all`); anyone else (a verifier, a referee) must say where its
    copy is (`data_dir`), so a stranger's spec never picks which local files are read.

    The kwarg `augment` (a list of transforms, see pol.augment) is pol's, whatever the dataset: the data is
    wrapped in `pol.augment.Augmented`, whose draws are keyed by (seed, step, sample) in `transform`.

    Raises CodeNotAllowed, ComponentError (unknown name, bad arguments), DataNotProvided (a `dir:` dataset without
    `data_dir` for a caller that did not write the spec) or DataError (unreadable or malformed data, or an
    in-memory dataset above the POL_DATA_MEMORY cap).
    """
    kwargs = dict(kwargs)
    pipeline = None
    if AUGMENT_KWARG in kwargs:
        from .augment import parse_pipeline

        pipeline = parse_pipeline(kwargs.pop(AUGMENT_KWARG))
    dataset = _build_plain(name, kwargs, data_dir=data_dir, code=code)
    if pipeline is not None:
        from .augment import Augmented

        dataset = Augmented(dataset, pipeline)
    return dataset


def _build_plain(name: str, kwargs: Mapping[str, Any], *, data_dir: str | Path | None, code: CodePolicy | None) -> Dataset:
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
    return _in_memory_on_cpu(_coerce(value, name), name)


def _in_memory_on_cpu(dataset: Dataset, name: str) -> Dataset:
    inner = getattr(dataset, "inner", None)
    if inner is not None:  # augmented: its inner data
        dataset.inner = _in_memory_on_cpu(inner, name)
        return dataset
    if not dataset.in_memory:
        return dataset
    check_memory(dataset.nbytes, f"dataset {name!r} (in memory)")
    return Dataset({k: t.detach().to("cpu").contiguous() for k, t in dataset.tensors.items()})


_DIGESTS: dict[tuple[Any, ...], Digest] = {}


def data_digest(dataset: Dataset) -> Digest:
    """The digest the spec binds: every byte of every tensor, with names, dtypes and shapes (augmentation is not
    data: its transforms are in the spec's data kwargs, or in user code pinned by its code digest).

    Definition, whatever the storage: for each name, `tensor_digest(name, T)` of the tensor T that stacks all the
    samples in index order (blake3 over the header (name, dtype, shape (n, *sample shape)) and then T's raw
    little-endian bytes, row after row); the per-name digests are combined as a state's are, and hashed under
    "pol/data/v1". A lazy dataset (shards, memory-mapped arrays, a torch Dataset) is streamed row piece by row
    piece into per-name hashers, never held whole, and gets the digest the same bytes held in memory get (so a
    `dir:` of shards, a torch Dataset and a dict of tensors holding the same samples share a digest)."""
    dataset = getattr(dataset, "inner", dataset)
    if dataset.in_memory:
        per_name = tensor_digests(dataset.tensors)
    else:
        key = dataset.digest_key
        if key is not None and (cached := _DIGESTS.get(key)) is not None:
            return cached
        n = len(dataset)
        hashers = {name: blake3.blake3(_header(name, dtype, (n, *shape))) for name, (dtype, shape) in dataset.layout.items()}
        rows = 0
        pieces = dataset.chunks()
        while (chunk := next(pieces, None)) is not None:  # (a for loop would hold the last piece while reading the next)
            for name, hasher in hashers.items():
                t = chunk[name]
                if t.dtype != dataset.layout[name][0] or tuple(t.shape[1:]) != dataset.layout[name][1]:
                    raise DataError(f"rows {rows}..: tensor {name!r} is {t.dtype} {tuple(t.shape[1:])} per row, "
                                    f"the dataset's {dataset.layout[name][0]} {dataset.layout[name][1]}")
                hasher.update(tensor_bytes(t))
            rows += int(next(iter(chunk.values())).shape[0])
            del chunk, t
        if rows != n:
            raise DataError(f"the data gave {rows} rows while hashing, its length says {n}")
        per_name = {name: h.hexdigest() for name, h in hashers.items()}
    digest = compute_hash("pol/data/v1", bytes.fromhex(combine_digests(per_name))).hex()
    if not dataset.in_memory and (key := dataset.digest_key) is not None:
        if len(_DIGESTS) >= 64:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


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
