"""Certified evaluation: the metrics of a checkpoint's model on the spec's held-out data (`JobSpec.evaluation`).

The solver evaluates every checkpoint (step 0 and the last included) and commits the values in the trace (a
record's `eval`, part of its Merkle leaf); the verifier recomputes them for every checkpoint it touches and always
for the final one, so a client can pay for the final metric as certified (see pol.verify, games.market).

Definition (the one the solver and the verifier both run, `evaluate_totals`):

- the evaluation data (built with `pol.data.build_dataset`, its digest checked against the spec's
  `evaluation.data_digest`: `EvalDataDiffers` otherwise) is read in index order in batches of
  `evaluation.batch_size` rows (the last one shorter), never shuffled, never augmented;
- the model runs in eval mode (each module's mode restored afterwards, every buffer restored bit for bit, so
  batch-norm statistics do not move), without gradients, under the spec's numerics context: in exact numerics
  every value is the same bits on every machine and thread count. It is called exactly as in training (the
  spec's `inputs`, a lone `x` positionally);
- each metric is a (sum, count) pair accumulated over the batches in Python floats (float64), and its value is
  sum / count:
    * "loss": the spec's loss on each batch (a batch mean, as in training) times the batch's rows, over the rows;
    * "accuracy": argmax over the last dimension of the loss's output tensor (the spec's `output`) against the
      target, rows whose target is -100 ignored;
    * a user metric `module:callable(output, batch, **kwargs) -> (sum, count)` (tensors or numbers) on the whole
      model output and the batch; pinned and allow-listed like any user code.
- a model that draws torch random numbers in eval mode (rare) has its draws served by pol.rng, keyed by
  (seed, "eval", step); one that draws from Python's or numpy's global generator is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .components import CodePolicy, load_callable
from .data import Dataset, build_dataset, data_digest
from .errors import DataDiffers, DataNotProvided, PolError, SpecError, UnsupportedOperator, UserCodeError
from .losses import LossFn, build_loss, select_output
from .numerics import numerics_context
from .randomness import random_context
from .spec import JobSpec

__all__ = [
    "Evaluator",
    "evaluate",
    "evaluate_totals",
    "build_eval_dataset",
    "compare_eval",
    "eval_tolerance",
    "EvalDataDiffers",
    "EvalDataNotProvided",
    "EVAL_REL_TOL",
    "EVAL_FLIP_SHARE",
]

# Native numerics: the verifier evaluates the very bytes the solver evaluated (a committed checkpoint, checked
# against its digest), so the only difference is the forward pass's float32 rounding on another machine or thread
# count, about 1e-6 relative on a loss (no drift accumulates over steps, unlike a replayed segment). A smooth
# metric (the loss, a user metric) may differ by EVAL_REL_TOL relative (floor EVAL_ABS_TOL): 100x that rounding.
# Accuracy is discontinuous: a row whose two best logits are within rounding of each other may flip, so it may
# differ by max(1, EVAL_FLIP_SHARE of the rows) rows. That is the most a solver can inflate a native metric;
# exact numerics compares bit for bit.
EVAL_REL_TOL = 1e-4
EVAL_ABS_TOL = 1e-7
EVAL_FLIP_SHARE = 1e-3


class EvalDataDiffers(DataDiffers):
    """The evaluation data here is not the data the spec's evaluation committed to (not evidence of fraud)."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(expected, got)
        self.args = (f"evaluation data differs: the spec commits to evaluation data digest {expected}, the evaluation "
                     f"data here hashes to {got}",)


class EvalDataNotProvided(DataNotProvided):
    """The spec's evaluation data is a `dir:` directory and the caller did not say where it holds it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.args = (f"the job's evaluation data is {name!r}, a directory on the solver's machine; a verifier reads no "
                     "path a bundle names: pass --eval-data-dir DIR (eval_data_dir=) where you hold that data",)


def build_eval_dataset(spec: JobSpec, *, data_dir: str | None = None, code: CodePolicy | None = None) -> Dataset:
    """The spec's evaluation data, checked against its committed digest when the spec is resolved.

    Raises SpecError (no evaluation), EvalDataNotProvided (a `dir:` dataset without `data_dir`, for a caller
    that did not write the spec), EvalDataDiffers, DataError, CodeNotAllowed, ComponentError."""
    from .engine import verify_batch_names

    ev = spec.evaluation
    if ev is None:
        raise SpecError("the spec names no evaluation")
    try:
        dataset = build_dataset(ev.data.name, ev.data.kwargs, data_dir=data_dir, code=code)
    except DataNotProvided:
        raise EvalDataNotProvided(ev.data.name) from None
    verify_batch_names(spec, dataset)
    if ev.data_digest is not None:
        got = data_digest(dataset)
        if got != ev.data_digest:
            raise EvalDataDiffers(ev.data_digest, got)
    return dataset


MetricFn = Any  # (output, batch, step rows) -> (sum, count)


class Evaluator:
    """The spec's metrics, built once (user metrics imported on `code`'s terms), run on any model state."""

    def __init__(self, spec: JobSpec, dataset: Dataset, *, code: CodePolicy | None = None, loss_fn: LossFn | None = None) -> None:
        if spec.evaluation is None:
            raise SpecError("the spec names no evaluation")
        self.spec = spec
        self.dataset = dataset
        self.code = code or CodePolicy()
        self.loss_fn = loss_fn or build_loss(spec.loss, output=spec.output, target=spec.target, code=self.code)
        self.metrics: dict[str, Any] = {}
        for m in spec.evaluation.metrics:
            if m.is_user_code:
                self.metrics[m.name] = (load_callable(m.name, self.code), dict(m.kwargs))
            else:
                self.metrics[m.name] = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.metrics)

    def totals(self, model: nn.Module, *, step: int = 0, device: torch.device | None = None) -> dict[str, tuple[float, float]]:
        """Each metric's (sum, count) over the whole evaluation set (see the module docstring)."""
        from .engine import _generator_states, _host_generator_states  # the engine's own watch on the generators

        device = device or _model_device(model)
        host = _host_generator_states()
        before = _generator_states(device)
        with _eval_mode(model):
            totals = self._run(model, device, step, randomised=False)
            if _generator_states(device) != before:  # the model drew in eval mode: serve its draws from pol.rng
                totals = self._run(model, device, step, randomised=True)
        if _host_generator_states() != host:
            raise UnsupportedOperator(
                "Python's random / numpy's global generator",
                f"model {self.spec.model.name!r} or an evaluation metric drew from an unseeded host generator while "
                f"evaluating step {step}: its values are not pol's to re-derive")
        return totals

    def __call__(self, model: nn.Module, *, step: int = 0, device: torch.device | None = None) -> dict[str, float]:
        return values_of(self.totals(model, step=step, device=device), step)

    def _run(self, model: nn.Module, device: torch.device, step: int, *, randomised: bool) -> dict[str, tuple[float, float]]:
        spec, ev = self.spec, self.spec.evaluation
        assert ev is not None
        sums = {name: 0.0 for name in self.metrics}
        counts = {name: 0.0 for name in self.metrics}
        n = len(self.dataset)
        from .engine import get_model_inputs

        with torch.no_grad(), numerics_context(spec.numerics):
            rand = random_context(spec.seed, "eval", [step]) if randomised else contextlib.nullcontext()
            with rand:
                for start in range(0, n, ev.batch_size):
                    idx = np.arange(start, min(start + ev.batch_size, n), dtype=np.int64)
                    batch = {k: t.to(device) for k, t in self.dataset.batch(idx).items()}
                    rows = len(idx)
                    names = get_model_inputs(spec, batch)
                    try:
                        out = model(batch["x"]) if names == ("x",) else model(**{k: batch[k] for k in names})
                    except PolError:
                        raise
                    except Exception as exc:
                        raise UserCodeError(f"model {spec.model.name!r} failed on an evaluation batch (rows {start}.."
                                            f"{start + rows - 1}): {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
                    for name, fn in self.metrics.items():
                        s, c = self._metric(name, fn, out, batch, rows)
                        sums[name] += s
                        counts[name] += c
        return {name: (sums[name], counts[name]) for name in self.metrics}

    def _metric(self, name: str, fn: Any, out: Any, batch: Mapping[str, torch.Tensor], rows: int) -> tuple[float, float]:
        spec = self.spec
        try:
            if name == "loss":
                return float(self.loss_fn(out, batch)) * rows, float(rows)
            if name == "accuracy":
                return _accuracy(select_output(out, spec.output), batch[spec.target])
            call, kwargs = fn
            result = call(out, batch, **kwargs)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise TypeError(f"it returned {type(result).__name__}, not a (sum, count) pair")
            s, c = (float(v.detach().double().sum()) if isinstance(v, torch.Tensor) else float(v) for v in result)
            if not math.isfinite(c) or c < 0:
                raise ValueError(f"its count {c!r} is not a non-negative number")
            return s, c
        except PolError:
            raise
        except Exception as exc:
            raise UserCodeError(f"evaluation metric {name[:200]!r} failed: {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]}") from exc


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    if target.is_floating_point():
        raise SpecError("the accuracy metric needs integer class targets (argmax of the output against the target)")
    pred = output.argmax(-1)
    if target.shape != pred.shape:
        if target.numel() != pred.numel():
            raise SpecError(f"the accuracy metric compares argmax over the output's last dimension {tuple(pred.shape)} "
                            f"with the target {tuple(target.shape)}: their sizes differ")
        target = target.reshape(pred.shape)
    keep = target != -100
    return float(((pred == target) & keep).sum()), float(keep.sum())


def values_of(totals: Mapping[str, tuple[float, float]], step: int = 0, *, strict: bool = True) -> dict[str, float]:
    """Each metric's value, sum / count. Raises UserCodeError for an empty or non-finite metric (unless not
    `strict`: then it is NaN)."""
    values = {}
    for name, (s, c) in totals.items():
        value = s / c if c > 0 else math.nan
        if strict and not math.isfinite(value):
            raise UserCodeError(f"evaluation metric {name[:200]!r} is not finite at step {step} (sum {s!r}, count {c!r})")
        values[name] = value
    return values


def evaluate(rt_or_model: Any, spec: JobSpec | None = None, eval_dataset: Dataset | None = None, *, step: int | None = None,
             code: CodePolicy | None = None, device: torch.device | None = None, data_dir: str | None = None) -> dict[str, float]:
    """The spec's evaluation metrics of a model (an nn.Module, or a pol Runtime: its model, spec, loss, device and
    step) over the whole evaluation set. `eval_dataset` defaults to the spec's, built and checked against its
    digest (`build_eval_dataset`, with `data_dir` for a `dir:` dataset). Returns {metric name: value}."""
    from .engine import Runtime

    if isinstance(rt_or_model, Runtime):
        rt = rt_or_model
        spec = spec or rt.spec
        model, loss_fn, device, code = rt.model, rt.loss_fn, device or rt.device, code or rt.code
        step = rt.step if step is None else step
    else:
        model, loss_fn = rt_or_model, None
    if spec is None:
        raise SpecError("evaluate needs the job's spec")
    dataset = eval_dataset if eval_dataset is not None else build_eval_dataset(spec, data_dir=data_dir, code=code)
    return Evaluator(spec, dataset, code=code, loss_fn=loss_fn)(model, step=step or 0, device=device)


def evaluate_totals(evaluator: Evaluator, model: nn.Module, *, step: int, device: torch.device | None = None) -> dict[str, tuple[float, float]]:
    """Each metric's (sum, count): what the verifier's tolerance for a discontinuous metric needs."""
    return evaluator.totals(model, step=step, device=device)


def eval_tolerance(name: str, value: float, count: float) -> float:
    """How far a committed native-numerics metric may be from the verifier's value (see EVAL_REL_TOL)."""
    tol = max(EVAL_REL_TOL * abs(value), EVAL_ABS_TOL)
    if name == "accuracy" and count > 0:
        tol = max(tol, max(1.0, EVAL_FLIP_SHARE * count) / count)
    return tol


def compare_eval(claimed: Mapping[str, float] | None, totals: Mapping[str, tuple[float, float]], *, exact: bool,
                 step: int) -> list[str]:
    """Problems with a committed evaluation against the recomputed one: exact numerics bit for bit, native within
    `eval_tolerance`. Each problem names the metric and the step."""
    if claimed is None:
        return [f"step {step}: the record commits no evaluation"]
    problems = []
    values = values_of(totals, step, strict=False)
    for name, value in values.items():
        got = claimed.get(name)
        if got is None:
            problems.append(f"step {step}: metric {name!r} is not committed")
        elif not math.isfinite(value):
            problems.append(f"step {step}: metric {name!r} committed {got!r}, recomputed {value!r} (not finite)")
        elif exact and got != value:
            problems.append(f"step {step}: metric {name!r} committed {got!r}, recomputed {value!r} (exact numerics: bit for bit)")
        elif not exact and abs(got - value) > eval_tolerance(name, value, totals[name][1]):
            problems.append(f"step {step}: metric {name!r} committed {got!r}, recomputed {value!r} (beyond the native "
                            f"tolerance {eval_tolerance(name, value, totals[name][1]):.3g})")
    return problems


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, each module's own mode and every buffer restored afterwards (a model that updated a buffer in
    eval mode would otherwise change the state the trace commits)."""
    modes = [(m, m.training) for m in model.modules()]
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
