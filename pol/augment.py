"""Data augmentation whose randomness is pol's: every draw is keyed, so a verifier re-derives the augmented batch.

A transform applied to sample `i` (its index in the dataset) at step `s` draws from `pol.rng` with the key
`(seed, "augment/<transform name>", [s, i, k])`, `k` counting the draws that transforms of that name made for that
sample before (so a pipeline naming one transform twice draws twice). Mixup pairs the samples of a batch by a
permutation keyed `(seed, "augment/mixup", [s])`. The draws are integers or floats on a 24-bit grid rounded once,
and the transforms compute with integer indexing or elementwise IEEE operations each rounded once (no libm
function, no reduction whose order could vary): the same batch on every machine and instruction set.

Augmentation runs in `pol.engine.step_batch` (through `Dataset.transform`), the one derivation of a step's batch
that the solver, the verifier, pinpoint's capture and the referee share, so the per-step batch digest covers the
augmented batch. Two ways to ask for it:

- in the spec, the data component's kwarg `augment`, for any dataset (built-in, `dir:`, `module:callable`):
  `data = {name = "images", kwargs = {channels = 3, size = 32, augment = [{name = "random_crop", padding = 4},
  {name = "hflip"}]}}`; the transforms are part of the spec, hence of the job id. Built-in transforms only
  (`TRANSFORMS`).
- in user code: a dataset factory returns `Augmented(dataset, [RandomCrop(4), HFlip(), MyTransform()])`, where
  `MyTransform` subclasses `Transform` and draws through the `Draws` it is given; pinned by the factory's code
  digest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import rng
from .data import Dataset, map_samples
from .errors import ComponentError, DataError

__all__ = ["Draws", "Transform", "BatchTransform", "RandomCrop", "HFlip", "ColorJitter", "Mixup", "Augmented",
           "TRANSFORMS", "parse_pipeline", "MAX_TRANSFORMS"]

MAX_TRANSFORMS = 16
MAX_PADDING = 1024  # a spec's random_crop padding (a stranger's spec: bounded)
MAX_CLASSES = 1 << 16  # a spec's mixup classes: the targets become batch x classes float32 probabilities
_GRID = 1 << 24  # rng's integer draws are uniform on [0, 2**24)

Sample = dict[str, torch.Tensor]


class Draws:
    """pol's keyed randomness for one transform on one sample at one step: each call draws under its own key
    `(seed, "augment/<name>", [step, index, k])`, k = 0, 1, ... (shared by the transforms of that name)."""

    def __init__(self, seed: int, name: str, step: int, index: int, counter: dict[str, int]) -> None:
        self._seed, self._purpose, self._step, self._index, self._counter, self._name = seed, f"augment/{name}", step, index, counter, name

    def _counters(self) -> list[int]:
        k = self._counter.get(self._name, 0)
        self._counter[self._name] = k + 1
        return [self._step, self._index, k]

    def ints(self, shape: Sequence[int], low: int, high: int) -> np.ndarray:
        """int64 array uniform on [low, high) (high - low <= 2**24)."""
        return rng.small_ints(self._seed, self._purpose, self._counters(), tuple(shape), low, high)

    def uniform(self, shape: Sequence[int], low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """float32 tensor uniform on [low, high) on a 24-bit grid, rounded once."""
        return rng.uniform(self._seed, self._purpose, self._counters(), tuple(shape), low, high)

    def chance(self, p: float) -> bool:
        """True with probability p (an integer comparison against round(p * 2**24))."""
        return int(self.ints((1,), 0, _GRID)[0]) < round(p * _GRID)


class Transform:
    """A per-sample transform: `__call__(sample, draws)` returns the sample's new tensors (a dict by name; leave
    the ones it does not change). Subclass it for your own; its `name` keys its draws ("augment/<name>")."""

    name = "transform"

    def __call__(self, sample: Sample, draws: Draws) -> Sample:
        raise NotImplementedError

    def apply_batch(self, batch: Sample, draws: Sequence[Draws]) -> Sample:
        """The transform of every sample of `batch` (row j with `draws[j]`), stacked. A built-in transform does it
        in a few batched operations (the same bits as `__call__` per sample); a user's is called per sample, on
        the POL_DATA_WORKERS threads."""
        names = list(batch)

        def one(j: int) -> Sample:
            out = self({name: batch[name][j] for name in names}, draws[j])
            if not isinstance(out, Mapping) or set(out) != set(names):
                raise DataError(f"augmentation {self.name!r} returned {type(out).__name__} without the batch's tensors {names}")
            return dict(out)

        samples = map_samples(one, list(range(len(draws))))
        result = {}
        for name in names:
            parts = [sample[name] for sample in samples]
            if any(p.dtype != parts[0].dtype or p.shape != parts[0].shape for p in parts):
                raise DataError(f"augmentation {self.name!r} made samples of {name!r} of different shapes or dtypes")
            result[name] = torch.stack(parts)
        return result

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class BatchTransform:
    """A transform of a whole batch (e.g. mixup, which pairs samples): `apply(batch, seed, step, idx)`."""

    name = "batch-transform"

    def apply(self, batch: Sample, *, seed: int, step: int, idx: np.ndarray) -> Sample:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _image(sample: Sample, key: str, what: str) -> torch.Tensor:
    if key not in sample:
        raise DataError(f"{what}: the batch holds no tensor {key!r} (name it with key = ...)")
    t = sample[key]
    if t.dim() < 2:
        raise DataError(f"{what}: {key!r} has per-sample shape {tuple(t.shape)}; expected (..., H, W)")
    return t


class RandomCrop(Transform):
    """Pad the last two dimensions (H, W) by `padding` with `fill` and crop back to H x W at an offset drawn
    uniformly in [0, 2 * padding] on each axis (torchvision's RandomCrop(size, padding) with size = H x W)."""

    name = "random_crop"

    def __init__(self, padding: int = 4, key: str = "x", fill: float = 0.0) -> None:
        self.padding, self.key, self.fill = padding, key, fill

    def __call__(self, sample: Sample, draws: Draws) -> Sample:
        return {k: v[0] for k, v in self.apply_batch({k: v[None] for k, v in sample.items()}, [draws]).items()}

    def apply_batch(self, batch: Sample, draws: Sequence[Draws]) -> Sample:
        """Each output pixel is the input pixel `padding` - offset away, or `fill` outside the image: a selection,
        without materialising the padded images (a stranger's spec may ask for a wide padding)."""
        x = _image(batch, self.key, self.name)
        if x.dim() < 3:
            raise DataError(f"{self.name}: {self.key!r} has per-sample shape {tuple(x.shape[1:])}; expected (..., H, W)")
        p, (h, w) = self.padding, x.shape[-2:]
        offsets = torch.from_numpy(np.stack([d.ints((2,), 0, 2 * p + 1) for d in draws]))
        flat = x.reshape(x.shape[0], -1, h, w)  # (N, C, H, W), C all leading dimensions
        rows = (offsets[:, 0, None] - p + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1): source row
        cols = (offsets[:, 1, None] - p + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W): source column
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        n = torch.arange(x.shape[0])[:, None, None, None]
        c = torch.arange(flat.shape[1])[None, :, None, None]
        picked = flat[n, c, rows.clamp(0, h - 1), cols.clamp(0, w - 1)]
        out = torch.where(inside, picked, torch.tensor(self.fill, dtype=x.dtype))
        return {**batch, self.key: out.reshape(x.shape).contiguous()}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "padding": self.padding, "key": self.key, "fill": self.fill}


class HFlip(Transform):
    """Flip the last dimension (W) with probability `p`."""

    name = "hflip"

    def __init__(self, p: float = 0.5, key: str = "x") -> None:
        self.p, self.key = p, key

    def __call__(self, sample: Sample, draws: Draws) -> Sample:
        x = _image(sample, self.key, self.name)
        return {**sample, self.key: x.flip(-1)} if draws.chance(self.p) else sample

    def apply_batch(self, batch: Sample, draws: Sequence[Draws]) -> Sample:
        x = _image(batch, self.key, self.name)
        flip = torch.tensor([d.chance(self.p) for d in draws]).reshape((-1,) + (1,) * (x.dim() - 1))
        return {**batch, self.key: torch.where(flip, x.flip(-1), x)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "p": self.p, "key": self.key}


class ColorJitter(Transform):
    """Brightness then contrast, each factor drawn uniformly in [1 - b, 1 + b] (24-bit grid, rounded once to the
    tensor's dtype). Brightness: x * f. Contrast: x * f + m * (1 - f), m the mean of the sample's elements (all
    channels), summed exactly (`math.fsum`) and divided once; `m * (1 - f)` is formed in float64 and rounded once
    to the dtype; then clamped to `clamp` = [lo, hi] if given. Every operation is elementwise IEEE arithmetic."""

    name = "color_jitter"

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, clamp: Sequence[float] | None = None, key: str = "x") -> None:
        self.brightness, self.contrast, self.clamp, self.key = brightness, contrast, clamp, key

    def __call__(self, sample: Sample, draws: Draws) -> Sample:
        return {k: v[0] for k, v in self.apply_batch({k: v[None] for k, v in sample.items()}, [draws]).items()}

    def apply_batch(self, batch: Sample, draws: Sequence[Draws]) -> Sample:
        x = batch.get(self.key)
        if x is None or not x.is_floating_point():
            raise DataError(f"{self.name}: {self.key!r} must be a floating-point tensor of the batch")
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self.brightness:
            f = torch.cat([d.uniform((1,), 1.0 - self.brightness, 1.0 + self.brightness) for d in draws]).to(x.dtype)
            x = x * f.reshape(shape)
        if self.contrast:
            f = torch.cat([d.uniform((1,), 1.0 - self.contrast, 1.0 + self.contrast) for d in draws]).to(x.dtype)
            rows = x.double().reshape(x.shape[0], -1)
            means = [math.fsum(row.tolist()) / max(1, row.numel()) for row in rows]  # one sample's list at a time
            shift = torch.tensor([m * (1.0 - float(v)) for m, v in zip(means, f.tolist(), strict=True)], dtype=torch.float64)
            x = x * f.reshape(shape) + shift.to(x.dtype).reshape(shape)
        if self.clamp is not None:
            x = x.clamp(self.clamp[0], self.clamp[1])
        return {**batch, self.key: x}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "brightness": self.brightness, "contrast": self.contrast, "clamp": self.clamp, "key": self.key}


class Mixup(BatchTransform):
    """Mix each sample with the one a keyed permutation of the batch pairs it with: x = x_j * lam + x_perm(j) *
    (1 - lam), and the target becomes float32 probabilities over `classes` (a loss taking probabilities is needed:
    a user loss such as -(y * log_softmax(out)).sum(-1).mean()). lam ~ Beta(alpha, alpha) for an integer alpha >= 1,
    drawn exactly as the alpha-th smallest of 2 alpha - 1 grid uniforms (order statistics: no transcendental
    function), keyed (seed, "augment/mixup", [step, index, 0]); 1 - lam is exact on the grid."""

    name = "mixup"

    def __init__(self, classes: int, alpha: int = 1, key: str = "x", target: str = "y") -> None:
        self.classes, self.alpha, self.key, self.target = classes, alpha, key, target

    def apply(self, batch: Sample, *, seed: int, step: int, idx: np.ndarray) -> Sample:
        x, y = batch.get(self.key), batch.get(self.target)
        if x is None or y is None or not x.is_floating_point():
            raise DataError(f"mixup: the batch needs a floating-point {self.key!r} and a target {self.target!r}")
        n = x.shape[0]
        perm = torch.from_numpy(rng.permutation(seed, "augment/mixup", [step], n))
        draws = np.stack([rng.small_ints(seed, "augment/mixup", [step, int(i), 0], (2 * self.alpha - 1,), 0, _GRID) for i in idx])
        lam64 = np.sort(draws, axis=1)[:, self.alpha - 1].astype(np.float64) / _GRID  # exact: k / 2**24
        shape = (n,) + (1,) * (x.dim() - 1)
        lam = torch.from_numpy(lam64).to(x.dtype).reshape(shape)
        rest = torch.from_numpy(1.0 - lam64).to(x.dtype).reshape(shape)
        mixed = x * lam + x.index_select(0, perm) * rest
        if y.is_floating_point() and y.dim() == 2 and y.shape[1] == self.classes:
            probs = y.to(torch.float32)  # already probabilities (an earlier mixup)
        else:
            if y.dim() != 1 or y.is_floating_point() or int(y.min()) < 0 or int(y.max()) >= self.classes:
                raise DataError(f"mixup: the target {self.target!r} must be class indices in [0, {self.classes})")
            probs = F.one_hot(y, self.classes).to(torch.float32)
        lam32 = torch.from_numpy(lam64).to(torch.float32)[:, None]
        rest32 = torch.from_numpy(1.0 - lam64).to(torch.float32)[:, None]
        target = probs * lam32 + probs.index_select(0, perm) * rest32
        return {**batch, self.key: mixed, self.target: target}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "classes": self.classes, "alpha": self.alpha, "key": self.key, "target": self.target}


class Augmented(Dataset):
    """A dataset (`inner`: pol's, a dict of tensors, a torch Dataset...) whose batches pass through `pipeline`
    (transforms in order: per-sample ones on each sample, batch ones on the batch). Its digest is the inner data's:
    the pipeline is the spec's (kwarg `augment`) or the user code's (pinned by its code digest)."""

    def __init__(self, inner: Any, pipeline: Sequence[Transform | BatchTransform]) -> None:
        if not 0 < len(pipeline) <= MAX_TRANSFORMS:
            raise ComponentError(f"an augmentation pipeline holds 1 to {MAX_TRANSFORMS} transforms, got {len(pipeline)}")
        for t in pipeline:
            if not isinstance(t, (Transform, BatchTransform)):
                raise ComponentError(f"augmentation {t!r} is not a pol.augment.Transform or BatchTransform")
        self.inner = inner  # coerced to a pol Dataset by build_dataset
        self.pipeline = tuple(pipeline)

    in_memory = property(lambda self: self.inner.in_memory)  # type: ignore[assignment]
    tensors = property(lambda self: self.inner.tensors)  # type: ignore[assignment]
    layout = property(lambda self: self.inner.layout)  # type: ignore[assignment]
    nbytes = property(lambda self: self.inner.nbytes)  # type: ignore[assignment]
    digest_key = property(lambda self: self.inner.digest_key)  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.inner)

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return self.inner.batch(idx)

    def chunks(self) -> Any:
        return self.inner.chunks()

    def transform(self, batch: dict[str, torch.Tensor], *, seed: int, step: int, idx: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.inner.transform(batch, seed=seed, step=step, idx=idx)
        indices = [int(i) for i in np.asarray(idx)]
        counters: list[dict[str, int]] = [{} for _ in indices]  # per sample: draws made so far by each transform name
        for t in self.pipeline:
            if isinstance(t, Transform):
                batch = t.apply_batch(batch, [Draws(seed, t.name, step, i, c) for i, c in zip(indices, counters, strict=True)])
            else:
                batch = t.apply(batch, seed=seed, step=step, idx=np.asarray(idx))
        return batch


def _number(item: Mapping[str, Any], key: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = item.get(key, default)
    ok = type(value) is int if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        raise ComponentError(f"augment {item.get('name')!r}: {key} must be {'an integer' if kind is int else 'a number'} "
                             f"in [{low}, {high}], got {value!r}")
    return kind(value)


def _key(item: Mapping[str, Any], key: str = "key", default: str = "x") -> str:
    value = item.get(key, default)
    if not isinstance(value, str) or not value.isidentifier():
        raise ComponentError(f"augment {item.get('name')!r}: {key} must name a batch tensor, got {value!r}")
    return value


def _random_crop(item: Mapping[str, Any]) -> Transform:
    return RandomCrop(_number(item, "padding", 4, int, 0, MAX_PADDING), _key(item), _number(item, "fill", 0.0, float, -1e30, 1e30))


def _hflip(item: Mapping[str, Any]) -> Transform:
    return HFlip(_number(item, "p", 0.5, float, 0.0, 1.0), _key(item))


def _color_jitter(item: Mapping[str, Any]) -> Transform:
    clamp = item.get("clamp")
    if clamp is not None:
        if not (isinstance(clamp, list) and len(clamp) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamp)
                and clamp[0] <= clamp[1]):
            raise ComponentError(f"augment 'color_jitter': clamp must be [low, high], got {clamp!r}")
        clamp = [float(v) for v in clamp]
    return ColorJitter(_number(item, "brightness", 0.0, float, 0.0, 0.999), _number(item, "contrast", 0.0, float, 0.0, 0.999), clamp, _key(item))


def _mixup(item: Mapping[str, Any]) -> BatchTransform:
    if "classes" not in item:
        raise ComponentError("augment 'mixup' needs classes (the target's number of classes)")
    return Mixup(_number(item, "classes", 0, int, 1, MAX_CLASSES), _number(item, "alpha", 1, int, 1, 64), _key(item), _key(item, "target", "y"))


TRANSFORMS: dict[str, tuple[Any, frozenset[str]]] = {  # name -> (parser, its keys besides name)
    "random_crop": (_random_crop, frozenset({"padding", "key", "fill"})),
    "hflip": (_hflip, frozenset({"p", "key"})),
    "color_jitter": (_color_jitter, frozenset({"brightness", "contrast", "clamp", "key"})),
    "mixup": (_mixup, frozenset({"classes", "alpha", "key", "target"})),
}


def parse_pipeline(value: Any) -> tuple[Transform | BatchTransform, ...]:
    """The transforms a data component's `augment` kwarg names: a list of tables `{name = ..., <arguments>}` of
    built-in transforms (TRANSFORMS), applied in order. Raises ComponentError."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_TRANSFORMS:
        raise ComponentError(f"augment must be a list of 1 to {MAX_TRANSFORMS} transforms ({{name = ..., ...}}), got {str(value)[:80]}")
    out = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or item.get("name") not in TRANSFORMS:
            name = item.get("name") if isinstance(item, Mapping) else item
            raise ComponentError(f"unknown augmentation {str(name)[:80]!r}: use one of {', '.join(TRANSFORMS)} "
                                 f"(your own: a dataset factory returning pol.augment.Augmented)")
        parser, keys = TRANSFORMS[item["name"]]
        unknown = set(item) - keys - {"name"}
        if unknown:
            raise ComponentError(f"augment {item['name']!r} has no arguments {sorted(unknown)} (it takes {sorted(keys)})")
        out.append(parser(item))
    return tuple(out)
