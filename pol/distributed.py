"""Data-parallel training with torch.distributed: one job, N processes, and (in exact numerics) one commitment
whatever N is.

A step is a fixed set of micro-batches (the spec's `microbatch`). Process `rank` of `world` computes micro-batches
i with i % world == rank, in index order, as `pol.engine.one_step` would (same batch rows, same random keys).

- **Exact numerics.** The step's gradient is defined (`pol.engine.one_step`) as the exact sum of the micro-batch
  gradients, rounded once to float32: `pol.exact.reduce.exact_sum`'s bits. The processes compute it with two
  integer all-reduces whose result no reduction order can change (MAX, then SUM), the window all-reduce:
  1. Each element's terms get a uint8 exponent code (0: -0, 1: +0, else 1 + max(biased exponent, 1)); the codes are
     MAXed over blocks of `CODE_BLOCK` = 32 elements, then over processes: each block's largest exponent E.
  2. With M micro-batches in the step (spec-known, h = bitlength(M)), the window unit is u = 2**(E - 126 - w),
     w = 62 - 3h (62 - 2h with one code per element): every term is below 2**w units. Each process sums, over
     its micro-batches, trunc(term / u) (exact: a power-of-two scaling in float64), shifted up by low bits that
     count the terms cut inexactly (and, for a block, the terms that are not -0); the int64 sums are
     all-reduced by SUM (no overflow: M terms stay below 2**62).
  3. Every process rounds each element's sum H once. If no term was cut, H*u is the exact sum. Otherwise the exact
     sum lies strictly between (H - C)*u and (H + C)*u (C terms cut, under a unit each); rounding is monotone, so
     where both ends round to the same float32 (integer to float64 rounded to odd, then one rounding) the exact
     sum rounds to it too. Where they differ (a rounding midpoint within C units: a tie or a cancellation among
     cut terms) the element is unsafe; unsafe elements are known alike on every process (computed from
     all-reduced values), and only they are gathered (float32, every micro-batch) and summed by `exact_sum`. A
     zero sum with nothing cut is -0 only if every term was -0.
  Bytes per element: 8 + 1/32 (2.008x native's float32); the 0.8% over the issue's 2x target is the exponent code,
  the 2x is the int64 (a float32 sum needs 24 bits plus headroom for exponent spread and cancellation: a 32-bit
  window leaves too little, see benchmarks/results/distributed.md). The cut count is what makes the window
  cheap: with the bound M for every element instead, some 15% of ordinary 4-micro-batch sums fall within M units
  of a midpoint (sums of few float32 often sit exactly on one). A block also gives h bits to the count of terms
  that are not -0; from 16 micro-batches per step on (`MAX_BLOCK_MICROBATCHES`) each element has its own code
  (9 bytes, 2.25x), beyond 1023 (`MAX_WINDOW_MICROBATCHES`) and on any inf/NaN term every gradient is gathered
  and summed by `exact_sum` (its IEEE rules). Result: the same bits as one process, the same commitment for any N.
- **Native numerics.** Each process accumulates its micro-batches in `.grad`; during its last backward pass
  post-accumulate-grad hooks all-reduce (SUM, asynchronously) buckets of about `BUCKET_BYTES` = 25 MiB of
  parameters in reverse order as their gradients are final, in bucket order on every process, as DDP does
  (`NativeBuckets`; the loss is already scaled by micro/size); the optimizer waits for them. The result depends
  on the world size in its last bits, which native verification tolerates.

Every process runs the optimizer update identically. Only rank 0 writes checkpoints, records, progress and the
manifest (`pol.prove.train_and_prove` with `data_parallel=`); at every checkpoint all processes all-gather their
state digests and every process stops with `RankDiverged` naming the ranks that differ from rank 0. On `--resume`
rank 0 reads the last checkpoint and broadcasts it.

Launch: `pol train --nproc N ...` (runs `torch.distributed.run --standalone --nproc-per-node N -m pol train ...`)
or `torchrun --nproc-per-node N -m pol train ...` (multi-node with torchrun's own `--nnodes`/`--rdzv-endpoint`).
gloo on CPU, NCCL on CUDA (each process then uses `cuda:<LOCAL_RANK>`).
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

from .errors import TrainingError
from .exact.reduce import (
    CODE_SPECIAL,
    Window,
    compute_block_codes,
    compute_exponent_codes,
    compute_window_rounding,
    compute_window_sums,
    exact_sum,
    get_element_codes,
)

__all__ = [
    "DataParallelGroup",
    "RankDiverged",
    "launched_by_torchrun",
    "init_from_env",
    "FAULT_ENV",
    "MAX_WINDOW_MICROBATCHES",
    "MAX_BLOCK_MICROBATCHES",
    "CODE_BLOCK",
    "BUCKET_BYTES",
    "relaunch",
    "leave_group",
    "train_spawned",
    "SpawnedRun",
]

FAULT_ENV = "POL_DP_FAULT"
"""Testing only: `RANK:after` makes that rank add noise to its reduced gradient (its state then diverges and the
cross-rank check names it); `RANK:before` makes it add noise to its own contribution before the all-reduce (every
rank then trains the same wrong state: the bundle is wrong, and verification rejects it); `RANK:kill@N` makes
that rank SIGKILL itself in its N-th step."""
MAX_WINDOW_MICROBATCHES = (1 << 10) - 1
"""Micro-batches per step up to which gradients are summed by the window all-reduce; beyond, every micro-batch
gradient is gathered and summed by `exact_sum` (the window's headroom shrinks with h = bitlength(M))."""
MAX_BLOCK_MICROBATCHES = (1 << 4) - 1
"""Micro-batches per step up to which one exponent code covers a block of `code_block` elements; from 16 on
each element has its own code (the zero counts a block needs take 2h of the int64's bits)."""
CODE_BLOCK = 32
"""Elements sharing one exponent code in the window all-reduce's first round: 1/32 byte per element (module
docstring; benchmarks/results/distributed.md compares 1, 8, 32, 128)."""
CHUNK_ELEMENTS = 1 << 16
"""Elements per pass of the window all-reduce's element-wise work (encoding, rounding): cache-sized chunks run
about twice as fast as whole tensors on a CPU."""
BUCKET_BYTES = 25 * 1024 * 1024
"""Native numerics: gradient bytes per all-reduce bucket, as DDP's default."""


class RankDiverged(TrainingError):
    """Processes of one data-parallel job hold different states at a checkpoint."""


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "cpu", timeout_s: float = 600.0, **options: int) -> tuple[DataParallelGroup, str]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA). Returns the group and this process's
    device ("cuda" becomes cuda:<LOCAL_RANK>). `options`: DataParallelGroup's `code_block`, `bucket_bytes`."""
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        backend, timeout = "nccl" if cuda else "gloo", datetime.timedelta(seconds=timeout_s)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if attempt > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # A restarted attempt (torchrun --max-restarts) shares the agent's store with the failed one, whose
            # processes' addresses are still in it: a fresh prefix per attempt, or a new process may read a dead
            # peer's address and fail to connect ("connectFullMesh ... Connection refused").
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"pol/attempt-{attempt}", agent), rank=rank,
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        atexit.register(leave_group)
    return DataParallelGroup(device=device, **options), device


def leave_group() -> None:
    """Destroy the process group while the interpreter is alive: gloo's worker threads may otherwise free tensors
    during interpreter finalization, which aborts the process ("terminate called without an active exception")."""
    import gc

    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


class DataParallelGroup:
    """This process's part in a data-parallel job (`pol.engine.DataParallel`), over the default process group."""

    def __init__(self, device: str = "cpu", code_block: int = CODE_BLOCK, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = torch.device(device)
        self.bytes_reduced = 0  # bytes this process has all-reduced for gradients so far (benchmarks)
        fault = os.environ.get(FAULT_ENV, "")
        rank, _, where = fault.partition(":")
        self.fault = where if fault and int(rank) == self.rank else None
        self.steps_reduced = 0
        self.code_block = code_block
        self.bucket_bytes = bucket_bytes
        self.count = 0  # the current step's micro-batches (set by `microbatches`, which every step calls first)
        self.unsafe = 0  # elements the window all-reduce could not round, so far (summed by another path)

    def _count_step(self) -> None:
        self.steps_reduced += 1
        if self.fault == f"kill@{self.steps_reduced}":  # testing: die as a machine does, mid-step
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    # -- the step ---------------------------------------------------------------------------------------------
    def microbatches(self, count: int) -> Sequence[int]:
        self.count = count
        return range(self.rank, count, self.world)

    def _all_reduce(self, t: torch.Tensor, op: Any) -> None:
        self.bytes_reduced += t.numel() * t.element_size()
        dist.all_reduce(t, op=op)

    def reduce_exact(self, per_micro: Mapping[str, list[torch.Tensor]], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The exact sum of every process's micro-batch gradients, rounded once: the window all-reduce (an exponent
        code per block, MAX; an int64 per element, SUM), the elements it cannot round gathered and summed by
        `exact_sum`. The same bits as `exact_sum` over all micro-batch gradients on one process."""
        self._count_step()
        names = list(params)
        local = torch.cat([torch.stack([g.detach().reshape(-1).to(self.device) for g in per_micro[n]], dim=1)
                           if per_micro[n] else torch.zeros(params[n].numel(), 0, device=self.device) for n in names])
        if self.fault == "before":
            local = local * 1.001
        count = self.count
        if count > MAX_WINDOW_MICROBATCHES:
            return self._split(self._sum_gathered(local, count), params)
        block = self.code_block if count <= MAX_BLOCK_MICROBATCHES else 1
        rows = block * max(1, CHUNK_ELEMENTS // block)  # elements per chunk of the element-wise passes (cache-sized)
        spans = [slice(i, i + rows) for i in range(0, local.shape[0], rows)] or [slice(0, 0)]
        codes = torch.cat([compute_block_codes(compute_exponent_codes(local[c]), block) for c in spans])
        self._all_reduce(codes, dist.ReduceOp.MAX)
        if bool((codes == CODE_SPECIAL).any()):  # inf/NaN somewhere: the IEEE rules of exact_sum, on everything
            return self._split(self._sum_gathered(local, count), params)
        element = get_element_codes(codes, block, local.shape[0])
        window = Window(count, counts=block > 1)
        sums = torch.cat([compute_window_sums(local[c], element[c], window) for c in spans])
        self._all_reduce(sums, dist.ReduceOp.SUM)
        rounded = [compute_window_rounding(sums[c], element[c], window) for c in spans]
        values = torch.cat([v for v, _ in rounded])
        safe = torch.cat([ok for _, ok in rounded])
        unsafe = torch.nonzero(~safe).reshape(-1)  # the same on every process: computed from all-reduced values
        self.unsafe += unsafe.numel()
        if unsafe.numel():
            values = values.index_put((unsafe,), self._sum_gathered(local[unsafe], count))
        return self._split(values, params)

    def _split(self, flat: torch.Tensor, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for n, p in params.items():
            out[n] = self._after(flat[pos : pos + p.numel()].reshape(p.shape).to(p.device))
            pos += p.numel()
        return out

    def _sum_gathered(self, local: torch.Tensor, count: int) -> torch.Tensor:
        """`exact_sum` over all `count` micro-batch gradients of some elements: every process's (elements, its
        micro-batches) float32 rows are all-gathered and summed exactly (one rounding, the IEEE rules of
        `exact_sum`, which no order or grouping changes)."""
        per = -(-count // self.world)
        mine = torch.zeros(per, local.shape[0], dtype=torch.float32, device=self.device)
        mine[: local.shape[1]] = local.T
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        self.bytes_reduced += mine.numel() * mine.element_size()
        dist.all_gather(gathered, mine)
        rows = torch.stack([gathered[i % self.world][i // self.world] for i in range(count)])  # micro-batch order
        return exact_sum(rows, 0)

    def _after(self, g: torch.Tensor) -> torch.Tensor:
        return g * 1.001 if self.fault == "after" else g

    def reduce_native(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The float32 sum over processes of each process's accumulated gradients (one flat all-reduce, after the
        backward passes; `overlap_native` is DDP's overlapped form)."""
        self._count_step()
        names = list(grads)
        flat = torch.cat([grads[n].detach().reshape(-1).to(self.device) for n in names])
        if self.fault == "before":
            flat = flat * 1.001
        self._all_reduce(flat, dist.ReduceOp.SUM)
        out, pos = {}, 0
        for n in names:
            g = grads[n]
            out[n] = self._after(flat[pos : pos + g.numel()].view(g.shape).to(g.device))
            pos += g.numel()
        return out

    def overlap_native(self, params: Mapping[str, torch.Tensor]) -> NativeBuckets:
        """Start DDP's overlap for the coming (last) backward pass of this process's step: hooks all-reduce
        gradient buckets as their gradients are final; `finish()` waits and returns the summed gradients. With
        no backward pass to come (a process without micro-batches), `finish()` all-reduces them all."""
        self._count_step()
        return NativeBuckets(self, params)

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


class NativeBuckets:
    """DDP's bucketed all-reduce for native numerics: parameters in reverse order (the order a backward pass
    finishes them) are cut into buckets of about `bucket_bytes`; a post-accumulate-grad hook marks a parameter
    ready, and buckets are all-reduced asynchronously in index order (the same on every process) as soon as all
    of theirs are ready. `finish()` launches the rest (parameters without a gradient count as zeros), waits, and
    returns each parameter's summed gradient: the float32 sum over processes, as `reduce_native` defines it."""

    def __init__(self, group: DataParallelGroup, params: Mapping[str, torch.Tensor]) -> None:
        self.group = group
        self.params = dict(params)
        self.buckets: list[list[str]] = [[]]
        size = 0
        for n in reversed(list(self.params)):
            if size and size + self.params[n].numel() * 4 > group.bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(n)
            size += self.params[n].numel() * 4
        self.bucket_of = {n: b for b, names in enumerate(self.buckets) for n in names}
        self.waiting = [len(names) for names in self.buckets]
        self.flat: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.works: list[Any] = []
        self.launched = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._ready(n)) for n, p in self.params.items()
                        if p.requires_grad]

    def _ready(self, name: str) -> Any:
        def hook(_: torch.Tensor) -> None:
            self.waiting[self.bucket_of[name]] -= 1
            with _disable_current_modes():  # collectives, not operators of the step's arithmetic
                while self.launched < len(self.buckets) and self.waiting[self.launched] == 0:
                    self._launch(self.launched)

        return hook

    def _launch(self, b: int) -> None:
        group = self.group
        flat = torch.cat([(p.grad if (p := self.params[n]).grad is not None else torch.zeros_like(p)).detach()
                          .reshape(-1).to(group.device, torch.float32) for n in self.buckets[b]])
        if group.fault == "before":
            flat = flat * 1.001
        group.bytes_reduced += flat.numel() * flat.element_size()
        self.flat[b] = flat
        self.works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
        self.launched = b + 1

    def finish(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        while self.launched < len(self.buckets):
            self._launch(self.launched)
        for work in self.works:
            work.wait()
        out = {}
        for b, names in enumerate(self.buckets):
            flat, pos = self.flat[b], 0
            assert flat is not None
            for n in names:
                p = self.params[n]
                out[n] = self.group._after(flat[pos : pos + p.numel()].view(p.shape).to(p.device))
                pos += p.numel()
        return {n: out[n] for n in self.params}


def relaunch(nproc: int, argv: Sequence[str], max_restarts: int = 0) -> int:
    """`pol <argv>` with `--nproc N` (and `--max-restarts R`) run as N processes by torch.distributed.run (single
    node, a free port; after a failure the processes are restarted up to R times, and `pol train` continues from
    the last checkpoint). Returns its exit code."""
    import subprocess
    import sys

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nproc", "--max-restarts"):
            skip = True
        elif not a.startswith(("--nproc=", "--max-restarts=")):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "pol", *args]
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
    unsafe: int = 0  # elements rank 0's window all-reduces could not round (summed from gathered gradients)


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
    dp, device = init_from_env(kwargs.pop("device", "cpu"), timeout_s=120, **kwargs.pop("group_options", {}))
    stamps: list[float] = []
    try:
        started = time.perf_counter()
        result = train_and_prove(spec, out, device=device, data_parallel=dp,
                                 on_progress=lambda *_: stamps.append(time.perf_counter()), **kwargs)
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        if rank == 0:
            queue.put(("ok", rank, result.manifest.root, str(result.path), dp.bytes_reduced,
                       (time.perf_counter() - started, gaps[len(gaps) // 2] if gaps else 0.0, dp.unsafe)))
    except Exception as exc:
        queue.put(("error", rank, f"{type(exc).__name__}: {exc}", None, 0, (0.0, 0.0, 0)))
        raise
    finally:
        leave_group()


def train_spawned(spec: Any, out: str | os.PathLike[str], nproc: int, *, env: Mapping[str, str] | None = None,
                  **kwargs: Any) -> SpawnedRun:
    """Train `spec` (pol.prove.train_and_prove's keyword arguments in `kwargs`) on `nproc` local processes started
    with torch.multiprocessing (gloo on CPU, one thread each): for tests and benchmarks; `env` is set in each;
    `group_options` (a keyword) go to each DataParallelGroup."""
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
    reduced, seconds, step, unsafe = 0, 0.0, 0.0, 0
    while not queue.empty():
        kind, rank, a, b, n, (t, st, un) = queue.get()
        if kind == "ok":
            root, path, reduced, seconds, step, unsafe = a, b, n, t, st, un
        else:
            errors[rank] = a
    return SpawnedRun(root, path, errors, reduced, seconds, step, unsafe)
