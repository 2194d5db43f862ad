"""Data-parallel training with torch.distributed: one job, N processes, and (in exact numerics) one commitment
whatever N is.

A step is a fixed set of micro-batches (the spec's `microbatch`). Process `rank` of `world` computes micro-batches
i with i % world == rank, in index order, as `pol.engine.one_step` would (same batch rows, same random keys).

- **Exact numerics.** The step's gradient is defined (`pol.engine.one_step`) as the exact sum of the micro-batch
  gradients, rounded once to float32. Each process turns its micro-batch gradients into exact fixed-point digits
  (`pol.exact.reduce.accumulate_digits_dense`: int64 counts of 2**(16*b - 149) per 16-bit exponent bin b), the
  processes agree on one bin range (an all-reduce of each tensor's lowest and highest bin), the int64 digits are
  all-reduced by SUM (integer addition is associative, so gloo's or NCCL's reduction order cannot matter) and
  rounded once (`digits_to_f32`). One more int64 per element counts the terms that are not -0, so that a sum of
  negative zeros only is -0, as in the single-process exact sum. Carries cannot overflow: a bin-b term is below
  2**40 units, so 2**21 micro-batches per step sum below 2**61 (checked). A step with a non-finite gradient
  anywhere falls back to gathering the float gradients and summing them exactly (NaN/inf rules of
  `pol.exact.reduce.exact_sum`). Result: the same bits as one process, so the same commitment for 1, 2, 3, ... N.
- **Native numerics.** Each process accumulates its micro-batches in `.grad` and the float32 gradients are
  all-reduced by SUM (the loss is already scaled by micro/size), as DDP does; the result depends on the world
  size in its last bits, which native verification tolerates.

Every process runs the optimizer update identically. Only rank 0 writes checkpoints, records, progress and the
manifest (`pol.prove.train_and_prove` with `data_parallel=`); at every checkpoint all processes all-gather their
state digests and every process stops with `RankDiverged` naming the ranks that differ from rank 0. On `--resume`
rank 0 reads the last checkpoint and broadcasts it.

Launch: `pol train --nproc N ...` (runs `torch.distributed.run --standalone --nproc-per-node N -m pol train ...`)
or `torchrun --nproc-per-node N -m pol train ...` (multi-node with torchrun's own `--nnodes`/`--rdzv-endpoint`).
gloo on CPU, NCCL on CUDA (each process then uses `cuda:<LOCAL_RANK>`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import TrainingError
from .exact.reduce import accumulate_digits_dense, digits_to_f32, exact_sum

__all__ = [
    "DataParallelGroup",
    "RankDiverged",
    "launched_by_torchrun",
    "init_from_env",
    "FAULT_ENV",
    "MAX_MICROBATCHES",
    "relaunch",
    "exponent_bins",
    "digit_block",
    "round_block",
    "train_spawned",
    "SpawnedRun",
]

FAULT_ENV = "POL_DP_FAULT"
"""Testing only: `RANK:after` makes that rank add noise to its reduced gradient (its state then diverges and the
cross-rank check names it); `RANK:before` makes it add noise to its own contribution before the all-reduce (every
rank then trains the same wrong state: the bundle is wrong, and verification rejects it); `RANK:kill@N` makes
that rank SIGKILL itself in its N-th step."""
MAX_MICROBATCHES = 1 << 21  # micro-batches per step whose digits cannot overflow int64 carries (< 2**61)


class RankDiverged(TrainingError):
    """Processes of one data-parallel job hold different states at a checkpoint."""


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> tuple[DataParallelGroup, str]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA). Returns the group and this process's
    device ("cuda" becomes cuda:<LOCAL_RANK>)."""
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallelGroup(device=device), device


def exponent_bins(x: torch.Tensor) -> torch.Tensor:
    """Each float32's 16-bit exponent bin, as `accumulate_digits_dense` assigns them."""
    return (torch.clamp((x.view(torch.int32) >> 23) & 0xFF, min=1) - 1) // 16


def digit_block(x: torch.Tensor | None, numel: int, lo: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The exact sums of the rows of finite float32 `x` (elements, terms) as int64 (elements, width + 1): digits
    0..width-1 weigh 2**(16*(lo + j) - 149) (`lo` at most, and lo + width - 3 above, every bin in `x`), the last
    column counts the terms that are not -0. Blocks add as integers (any grouping, any order); `round_block`
    rounds a sum of them once. `x` None: no terms (zeros)."""
    block = torch.zeros(numel, width + 1, dtype=torch.int64, device=device)
    if x is not None and x.shape[1]:
        d, dlo = accumulate_digits_dense(x)
        block[:, dlo - lo : dlo - lo + d.shape[1]] = d.to(device)  # lo <= dlo and dlo + d.shape[1] <= lo + width
        block[:, width] = (~((x == 0) & torch.signbit(x))).sum(dim=1).to(device)
    return block


def round_block(block: torch.Tensor, lo: int, width: int) -> torch.Tensor:
    """float32 of a (sum of) `digit_block`: the exact sum rounded once to nearest even; -0 if every term was -0."""
    g = digits_to_f32(block[:, :width].contiguous(), lo)
    return torch.where((g == 0) & (block[:, width] == 0), torch.full_like(g, -0.0), g)


class DataParallelGroup:
    """This process's part in a data-parallel job (`pol.engine.DataParallel`), over the default process group."""

    def __init__(self, device: str = "cpu") -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = torch.device(device)
        self.bytes_reduced = 0  # bytes this process has all-reduced for gradients so far (benchmarks)
        fault = os.environ.get(FAULT_ENV, "")
        rank, _, where = fault.partition(":")
        self.fault = where if fault and int(rank) == self.rank else None
        self.steps_reduced = 0

    def _count_step(self) -> None:
        self.steps_reduced += 1
        if self.fault == f"kill@{self.steps_reduced}":  # testing: die as a machine does, mid-step
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    # -- the step ---------------------------------------------------------------------------------------------
    def microbatches(self, count: int) -> Sequence[int]:
        return range(self.rank, count, self.world)

    def reduce_exact(self, per_micro: Mapping[str, list[torch.Tensor]], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._count_step()
        names = list(params)
        local = {n: torch.stack([g.detach().reshape(-1) for g in per_micro[n]], dim=1) if per_micro[n] else None
                 for n in names}  # (elements, local micro-batches)
        if self.fault == "before":
            local = {n: (x * 1.001 if x is not None else x) for n, x in local.items()}
        counts = torch.tensor([len(per_micro[names[0]]) if names else 0], dtype=torch.int64, device=self.device)
        # agree on each tensor's bin range, and on whether anything is non-finite: one small MAX all-reduce
        big = 1 << 20
        stats = torch.full((2 * len(names) + 1,), -big, dtype=torch.int64, device=self.device)
        finite = True
        for j, n in enumerate(names):
            x = local[n]
            if x is None or x.numel() == 0:
                continue
            finite = finite and bool(torch.isfinite(x).all())
            b = exponent_bins(x)
            stats[2 * j], stats[2 * j + 1] = -int(b.min()), int(b.max())
        stats[-1] = 0 if finite else 1
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        total = int(counts[0])
        if total > MAX_MICROBATCHES:
            raise TrainingError(f"{total} micro-batches in one step: exact digits hold at most {MAX_MICROBATCHES}")
        if int(stats[-1]):
            return self._reduce_gathered(per_micro, params, total)
        layout = []
        parts = []
        for j, n in enumerate(names):
            lo, hi = -int(stats[2 * j]), int(stats[2 * j + 1])
            if lo > hi:  # no process has a term (cannot happen with >= 1 micro-batch): zeros
                lo = hi = 0
            width = hi - lo + 1 + 3  # 3 carry digits, as accumulate_digits_dense keeps
            block = digit_block(local[n], params[n].numel(), lo, width, self.device)
            layout.append((n, lo, width))
            parts.append(block.reshape(-1))
        flat = torch.cat(parts)
        self.bytes_reduced += flat.numel() * flat.element_size()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out: dict[str, torch.Tensor] = {}
        pos = 0
        for n, lo, width in layout:
            p = params[n]
            block = flat[pos : pos + p.numel() * (width + 1)].view(p.numel(), width + 1)
            pos += p.numel() * (width + 1)
            out[n] = self._after(round_block(block, lo, width).reshape(p.shape).to(p.device))
        return out

    def _reduce_gathered(self, per_micro: Mapping[str, list[torch.Tensor]], params: Mapping[str, torch.Tensor],
                         total: int) -> dict[str, torch.Tensor]:
        """A step with a non-finite gradient: gather every micro-batch's float gradient, sum exactly (one rounding,
        the IEEE rules of `exact_sum`), in micro-batch index order (which does not change an exact sum)."""
        out = {}
        for n, p in params.items():
            mine = torch.zeros(total, p.numel(), dtype=torch.float32, device=self.device)
            for k, i in enumerate(self.microbatches(total)):
                mine[i] = per_micro[n][k].detach().reshape(-1)
            gathered = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(gathered, mine)
            rows = torch.stack([gathered[i % self.world][i] for i in range(total)])
            out[n] = self._after(exact_sum(rows, 0).reshape(p.shape).to(p.device))
        return out

    def _after(self, g: torch.Tensor) -> torch.Tensor:
        return g * 1.001 if self.fault == "after" else g

    def reduce_native(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._count_step()
        names = list(grads)
        flat = torch.cat([grads[n].detach().reshape(-1).to(self.device) for n in names])
        if self.fault == "before":
            flat = flat * 1.001
        self.bytes_reduced += flat.numel() * flat.element_size()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out, pos = {}, 0
        for n in names:
            g = grads[n]
            out[n] = self._after(flat[pos : pos + g.numel()].view(g.shape).to(g.device))
            pos += g.numel()
        return out

    def gather_losses(self, losses: Mapping[int, float], count: int) -> dict[int, float]:
        vec = torch.zeros(count, dtype=torch.float64, device=self.device)
        for i, v in losses.items():
            vec[i] = v
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)  # one nonzero term per index: x + 0 + ... + 0 == x exactly
        return {i: float(v) for i, v in enumerate(vec.tolist())}

    # -- checkpoints -------------------------------------------------------------------------------------------
    def check_digests(self, step: int, digest: str) -> None:
        """All-gather every process's state digest at a checkpoint; raise RankDiverged naming those that differ
        from rank 0's (on every process, so the whole job stops)."""
        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        digests = [bytes(t.cpu().tolist()).hex() for t in gathered]
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            ranks = ", ".join(str(r) for r in bad)
            raise RankDiverged(f"rank {ranks} diverged from rank 0 at step {step}: state digest "
                               f"{digests[bad[0]][:16]} against rank 0's {digests[0][:16]} (a faulty process or machine; "
                               "nothing past the last agreed checkpoint is written)")

    def share_state(self, state: dict[str, torch.Tensor] | None, layout_at: Any) -> dict[str, torch.Tensor]:
        """Rank 0's state (given there; None elsewhere) on every process. `layout_at(step)`: name -> (dtype,
        shape) of a state at that step (`pol.engine.expected_layout`)."""
        step = torch.tensor([int(state["meta/step"]) if state is not None else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(step, 0)
        layout = layout_at(int(step[0]))
        out = {}
        for name in sorted(layout):
            dtype, shape = layout[name]
            t = state[name].to(self.device) if state is not None else torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(t, 0)
            out[name] = t.cpu()
        return out

    def share_object(self, value: Any) -> Any:
        """Rank 0's picklable `value` on every process (within the job's own processes only)."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, 0)
        return box[0]


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """`pol <argv>` with `--nproc N` run as N processes by torch.distributed.run (single node, a free port).
    Returns its exit code."""
    import subprocess
    import sys

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pol", *args]
    return subprocess.call(cmd)


@dataclass(frozen=True)
class SpawnedRun:
    """What `train_spawned` reports: rank 0's result, or every process's error."""

    root: str | None  # the commitment (None if the run failed)
    path: str | None
    errors: dict[int, str]  # rank -> "ErrorClass: message"
    bytes_reduced: int = 0  # rank 0's gradient all-reduce bytes over the run
    seconds: float = 0.0  # rank 0's time in train_and_prove
    step_seconds: float = 0.0  # rank 0's median time between consecutive steps


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned(rank: int, nproc: int, port: int, spec: Any, out: str, kwargs: dict[str, Any], env: dict[str, str],
             queue: Any) -> None:
    import time

    from .prove import train_and_prove

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_RANK": str(rank), **env})
    torch.set_num_threads(int(env.get("POL_SPAWN_THREADS", "1")))
    dp, device = init_from_env(kwargs.pop("device", "cpu"), timeout_s=120)
    stamps: list[float] = []
    try:
        started = time.perf_counter()
        result = train_and_prove(spec, out, device=device, data_parallel=dp,
                                 on_progress=lambda *_: stamps.append(time.perf_counter()), **kwargs)
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        if rank == 0:
            queue.put(("ok", rank, result.manifest.root, str(result.path), dp.bytes_reduced,
                       (time.perf_counter() - started, gaps[len(gaps) // 2] if gaps else 0.0)))
    except Exception as exc:
        queue.put(("error", rank, f"{type(exc).__name__}: {exc}", None, 0, (0.0, 0.0)))
        raise
    finally:
        dist.destroy_process_group()


def train_spawned(spec: Any, out: str | os.PathLike[str], nproc: int, *, env: Mapping[str, str] | None = None,
                  **kwargs: Any) -> SpawnedRun:
    """Train `spec` (pol.prove.train_and_prove's keyword arguments in `kwargs`) on `nproc` local processes started
    with torch.multiprocessing (gloo on CPU, one thread each): for tests and benchmarks; `env` is set in each."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        mp.start_processes(_spawned, args=(nproc, _free_port(), spec, str(out), kwargs, dict(env or {}), queue),
                           nprocs=nproc, join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        pass
    except mp.ProcessExitedException:
        pass
    root = path = None
    errors: dict[int, str] = {}
    reduced, seconds, step = 0, 0.0, 0.0
    while not queue.empty():
        kind, rank, a, b, n, (t, st) = queue.get()
        if kind == "ok":
            root, path, reduced, seconds, step = a, b, n, t, st
        else:
            errors[rank] = a
    return SpawnedRun(root, path, errors, reduced, seconds, step)
