"""Fused CPU kernels of the exact primitives: one C call where the torch implementation takes dozens of operators.

The kernels (`_kernels.c`, beside this file) compute the same bits as the torch implementations in this package,
which stay the definition: integer arithmetic is exact, and the float code repeats the torch code's IEEE operations
in the same order, compiled without FMA contraction or fast-math. `tests/exact/test_native.py` holds every kernel
to the torch path bit for bit, on random inputs and on the awkward ones (subnormals, signed zeros, NaN, infinities,
overflow, rounding ties). Exact mode is the same function with or without them; they only make it cheaper.

The library is compiled by pol/exact/build.py (the compiler driver, which reads `CC`, `POL_CACHE_DIR` and
`POL_EXACT_NATIVE` once) and loaded with ctypes; `SIGNATURES` declares each kernel as `_kernels.h` does (a test
holds the two together). Where no compiler works, or with `POL_EXACT_NATIVE=0`, every primitive takes its torch
path; `status()` says which and why.

Each wrapper returns None when its kernel does not apply (a CUDA tensor, another dtype, the library missing, or a
non-finite operand of a product), and the caller then takes the torch path.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

from pol.exact import build, polys

__all__ = [
    "available", "disabled", "status", "vnni", "sum_rows", "sum_slots", "product", "unary", "adamw", "layer_norm",
    "layer_norm_backward", "softmax", "softmax_backward", "log_softmax", "log_softmax_backward", "gelu", "gelu_backward",
    "UNARY_OPS",
]  # fmt: skip

log = logging.getLogger(__name__)

UNARY_OPS = ("exp", "expm1", "log", "log1p", "tanh", "sigmoid", "erf", "sqrt", "rsqrt")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> tuple[str, ...]:
    """This CPU's instruction-set flags for the build (a seam: tests build for other levels)."""
    return build.get_cpu_flags()


def _build(env: build.BuildEnvironment | None = None) -> ctypes.CDLL:
    """Compile `_kernels.c` for this CPU's level (see pol/exact/build.py) and load it with its signatures declared.
    Raises OSError, RuntimeError or subprocess.SubprocessError when that is not possible."""
    lib = build.build_library(env or build.read_environment(), _cpu_flags())
    return _declare(ctypes.CDLL(str(lib)))


_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "sum_rows_f32": (_I32, (_P, _I64, _I64, _I64, _I64, _P)),
    "sum_slots_f32": (_I32, (_P, _P, _I64, _I64, _P)),
    "split_rows_f32": (_I64, (_P, _I64, _I64, _P, _P)),
    "split_cols_f32": (_I64, (_P, _I64, _I64, _I64, _P, _P, _P)),
    "combine_f32": (None, (_P, _I64, _I64, _I64, _P, _P, _P)),
    "split_rows_i8": (_I64, (_P, _I64, _I64, _P, _P)),
    "split_cols_i8": (_I64, (_P, _I64, _I64, _I64, _P, _P, _P)),
    "gemm_f64_exact": (_I64, (_P, _P, _P, _I64, _I64, _I64, _I64)),
    "combine_i8": (None, (_P, _I64, _I64, _I64, _P, _P, _P, _I64)),
    "product_i8_vnni": (_I64, (_P, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64)),
    **{f"{op}_f32": (None, (_P, _P, _I64, _P)) for op in UNARY_OPS},
    "layer_norm_f32": (None, (_P, _P, _P, _I64, _I64, _F32, _P, _P, _P, _P)),
    "layer_norm_bwd_f32": (None, (_P, _P, _P, _P, _P, _I64, _I64, _P, _P, _P)),
    "softmax_f32": (_I64, (_P, _I64, _I64, _P, _P)),
    "softmax_bwd_f32": (None, (_P, _P, _I64, _I64, _P)),
    "log_softmax_f32": (_I64, (_P, _I64, _I64, _P, _P)),
    "log_softmax_bwd_f32": (None, (_P, _P, _I64, _I64, _P, _P)),
    "gelu_f32": (None, (_P, _P, _I64, _F32, _P)),
    "gelu_bwd_f32": (None, (_P, _P, _P, _I64, _F32, _F32, _P)),
    "adamw_f32": (None, (_P, _P, _P, _P, _I64, _P)),
    "kernel_constants": (None, (_P,)),
}
"""Each kernel's (restype, argtypes) for ctypes, as `_kernels.h` declares it (tests/exact/test_native.py checks)."""


def _declare(dll: ctypes.CDLL) -> ctypes.CDLL:
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(dll, name)
        fn.argtypes, fn.restype = list(argtypes), restype
    _check_constants(dll)
    return dll


_off = threading.local()


@contextmanager
def disabled() -> Iterator[None]:
    """Within this block (this thread), every primitive takes its torch path: tests compare the two."""
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def _library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None (with the reason in `status()`) when unavailable."""
    if getattr(_off, "on", False):
        return None
    if "dll" in _state:
        return _state["dll"]  # type: ignore[return-value]
    with _lock:
        if "dll" not in _state:
            dll: ctypes.CDLL | None = None
            env = build.read_environment()  # once per process
            if not env.enabled:
                _state["why"] = "disabled by POL_EXACT_NATIVE=0"
            else:
                try:
                    dll = _build(env)
                    _state["why"] = "compiled kernels loaded"
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # RuntimeError: no home directory
                    _state["why"] = f"no compiled kernels ({exc}); exact mode takes its torch path"
                    log.info("pol.exact.native: %s", _state["why"])
            _state["dll"] = dll
    return _state["dll"]  # type: ignore[return-value]


def available() -> bool:
    """True when the compiled kernels are loaded (building them on first call)."""
    return _library() is not None


def status() -> str:
    """One line: whether the compiled kernels are in use, and why not."""
    _library()
    return str(_state.get("why", ""))


@cache
def vnni() -> bool:
    """True when the kernels were built with AVX-512 VNNI, so 2-D int8-form products run in one pass
    (product_i8_vnni) instead of five `_int_mm` calls and a combine; the same bits either way."""
    dll = _library()
    if dll is None:
        return False
    left, right = torch.zeros(16, dtype=torch.int8), torch.zeros(16, dtype=torch.int8)
    e, out = torch.zeros(1, dtype=torch.int32), torch.empty(1)
    return dll.product_i8_vnni(_ptr(left), _ptr(right), 1, 4, 1, _ptr(e), _ptr(e), _ptr(out), 0, 1, 0, 1, 1) == 0


use_vnni = True
"""Tests switch this off to hold the one-pass VNNI product to the `_int_mm` one."""


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _cpu_f32(*xs: torch.Tensor) -> bool:
    return all(x.device.type == "cpu" and x.dtype == torch.float32 for x in xs)


PARALLEL_MIN = 1 << 17
"""Work (items times their cost) below which one thread does it: a pool hand-off costs tens of microseconds."""
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _parallel(total: int, cost: int, run: Callable[[int, int], int | None]) -> list[int | None]:
    """run(lo, hi) over [0, total) split into up to torch.get_num_threads() ranges, the first on this thread.

    The kernels release the GIL (ctypes) and every item they take is computed on its own (a row, an element, a
    batch entry), so the split changes no bit. Returns each range's return value."""
    global _pool, _pool_size
    chunks = min(torch.get_num_threads(), total, max(1, total * cost // PARALLEL_MIN))
    if chunks <= 1:
        return [run(0, total)]
    with _pool_lock:
        if _pool is None or _pool_size < chunks:  # grows with torch's thread count
            _pool, _pool_size = ThreadPoolExecutor(max_workers=chunks, thread_name_prefix="pol-exact"), chunks
        pool = _pool
    step = -(-total // chunks)
    futures = [pool.submit(run, lo, min(total, lo + step)) for lo in range(step, total, step)]
    return [run(0, step), *(f.result() for f in futures)]


def sum_rows(flat: torch.Tensor) -> torch.Tensor | None:
    """Exact row sums of 2-D float32 `flat` (any strides), each rounded once; None where the kernel does not apply."""
    dll = _library()
    if dll is None or not _cpu_f32(flat) or flat.dim() != 2:
        return None
    outer, r = flat.shape
    out = torch.empty(outer, dtype=torch.float32)
    if outer and r:
        so, si = flat.stride()
        px, po = _ptr(flat), _ptr(out)
        rcs = _parallel(outer, r, lambda lo, hi: dll.sum_rows_f32(px + 4 * lo * so, hi - lo, r, so, si, po + 4 * lo))
        if any(rcs):
            raise MemoryError("exact row sums: out of memory")
    else:
        out.zero_()
    return out


def sum_slots(x: torch.Tensor, target: torch.Tensor, num_targets: int) -> torch.Tensor | None:
    """out[t] = exact sum of x[i] over target[i] == t, rounded once; None where the kernel does not apply.

    Raises IndexError for a target outside [0, num_targets), as torch's index_add does."""
    dll = _library()
    if dll is None or not _cpu_f32(x) or target.device.type != "cpu":
        return None
    x = x.reshape(-1).contiguous()
    target = target.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(num_targets, dtype=torch.float32)
    rc = dll.sum_slots_f32(_ptr(x), _ptr(target), x.numel(), num_targets, _ptr(out))
    if rc == -1:
        raise IndexError(f"index out of range for {num_targets} slots")
    if rc != 0:
        raise MemoryError("exact slot sums: out of memory")
    return out


F64_MAX_K = 1 << 12
"""The float64 form (one float64 GEMM) has partial sums below K * 2**40.001: exact up to K = 2**12."""
INT8_MAX_K = 1 << 15
"""The int8 form sums at most 4 limb pairs of |products| <= 2**12 per term in int32: no wrap up to K = 2**15."""


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The defined exact product (see pol/exact/matmul.py) of float32 (M, K) @ (K, N), or (Z, M, K) @ (Z, K, N).

    The int8 form: the definition's int8 digits split by the kernels, then either one pass of the VNNI kernel
    (where the CPU has AVX-512 VNNI and K is a multiple of 4) or one `torch._int_mm` per diagonal s + t of limb pairs
    (5 int8 GEMMs per product, no copies) combined by the kernels: 2-D products, and batched ones with K > 2**12.
    The float64 form, one batched float64 GEMM, for the other batched products (attention). Returns None where
    neither applies (K too long, a non-finite operand, not on the CPU, the library missing).
    """
    dll = _library()
    if dll is None or not _cpu_f32(a, b) or a.dim() not in (2, 3) or 0 in a.shape or b.shape[-1] == 0:
        return None
    k = a.shape[-1]
    # batched: 5 GEMM calls per entry cost more than the float64 form (measured), and so does the one-pass VNNI
    # kernel at attention's sizes (0.26 against 0.22 ms at (64,32,32)x(64,32,16): splitting into int8 costs more).
    # 2-D: the int8 form only with the one-pass VNNI kernel; without it `torch._int_mm` has no fast int8 kernel
    # (measured at 1 thread on an AVX2 CPU: 63 ms against 1.1 ms for the float64 form at 256x256x64)
    if k <= INT8_MAX_K and (k > F64_MAX_K or (a.dim() == 2 and _one_pass_int8(k))):
        out = _product_int8(dll, _batch_of_one(a), _batch_of_one(b))
    elif k <= F64_MAX_K:
        out = _product_f64(dll, _batch_of_one(a), _batch_of_one(b))
    else:
        return None
    return out if out is None or a.dim() == 3 else out[0]


def _one_pass_int8(k: int) -> bool:
    """True when a 2-D int8-form product of reduction length k runs in one pass of the VNNI kernel."""
    return use_vnni and k % 4 == 0 and vnni()


def _batch_of_one(x: torch.Tensor) -> torch.Tensor:
    """Contiguous (Z, M, K) from a 2-D or 3-D operand. A 2-D one is made contiguous BEFORE the batch dim is added:
    torch copies a transposed (1, M, K) view about 4x slower than the (M, K) one (252 against 67 us at 512 x 256)."""
    return x.contiguous() if x.dim() == 3 else x.contiguous().unsqueeze(0)


_DIAGONALS = tuple((max(0, d - 3), min(d, 3) + 1, 3 - d + max(0, d - 3), 4 - d + min(d, 3)) for d in range(5))
"""Per diagonal d = s + t: left blocks [l0, l1) (digits A_s) against right blocks [r0, r1) (B_3..B_0 reversed)."""


def _split(
    rows_fn: Callable[..., int], cols_fn: Callable[..., int], a: torch.Tensor, b: torch.Tensor, width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Split contiguous (Z, M, K) @ (Z, K, N) operands into a product form's pieces: left (Z, M, width * K), right
    (Z, width * K, N), row and column exponents; rows in parallel. None when an operand is not finite."""
    z, m, k = a.shape
    n = b.shape[2]
    left = torch.empty((z, m, width * k), dtype=dtype)
    right = torch.empty((z, width * k, n), dtype=dtype)
    ea = torch.empty((z, m), dtype=torch.int32)
    eb = torch.empty((z, n), dtype=torch.int32)
    pa, pl, pe, row_bytes = _ptr(a), _ptr(left), _ptr(ea), width * k * left.element_size()
    if any(_parallel(z * m, k, lambda lo, hi: rows_fn(pa + 4 * lo * k, hi - lo, k, pl + lo * row_bytes, pe + 4 * lo))):
        return None
    scratch = torch.empty(n, dtype=torch.float32)  # held by a name: a temporary would be freed before the call
    if cols_fn(_ptr(b), z, k, n, _ptr(right), _ptr(eb), _ptr(scratch)):
        return None
    return left, right, ea, eb


def _product_int8(dll: ctypes.CDLL, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    z, m, k = a.shape
    n = b.shape[2]
    split = _split(dll.split_rows_i8, dll.split_cols_i8, a, b, 4, torch.int8)
    if split is None:
        return None
    left, right, ea, eb = split
    out = torch.empty((z, m, n), dtype=torch.float32)
    narrow = k <= F64_MAX_K
    if _one_pass_int8(k):  # one pass, no int32 diagonals in memory
        pl, pr, pea, peb, po = _ptr(left), _ptr(right), _ptr(ea), _ptr(eb), _ptr(out)
        if z == 1:  # threads take blocks of 4 rows (each packs the right operand's panels itself: small next to the GEMM)
            rcs = _parallel(-(-m // 4), 13 * k * n, lambda lo, hi: dll.product_i8_vnni(pl, pr, m, k, n, pea, peb, po, 0, 1, 4 * lo, min(m, 4 * hi), narrow))
        else:  # threads take batch entries
            rcs = _parallel(z, 13 * m * k * n, lambda lo, hi: dll.product_i8_vnni(pl, pr, m, k, n, pea, peb, po, lo, hi, 0, m, narrow))
        if not any(rcs):
            return out
        if -2 in rcs:
            raise MemoryError("exact product: out of memory")
    diag = torch.empty((z, 5, m, n), dtype=torch.int32)
    for li, ri, di in zip(left, right, diag, strict=True):
        for d, (l0, l1, r0, r1) in enumerate(_DIAGONALS):  # limb pairs (s, d - s) of diagonal d, side by side along K
            torch._int_mm(li[:, l0 * k : l1 * k], ri[r0 * k : r1 * k], out=di[d])
    dll.combine_i8(_ptr(diag), z, m, n, _ptr(ea), _ptr(eb), _ptr(out), narrow)
    return out


def _product_f64(dll: ctypes.CDLL, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    z, m, k = a.shape
    n = b.shape[2]
    split = _split(dll.split_rows_f32, dll.split_cols_f32, a, b, 3, torch.float64)
    if split is None:
        return None
    left, right, ea, eb = split
    v = torch.empty((z, m, n), dtype=torch.float64)
    kk, pl, pr, pv = 3 * k, _ptr(left), _ptr(right), _ptr(v)

    def gemm(lo: int, hi: int) -> int:
        return dll.gemm_f64_exact(pl + 8 * lo * m * kk, pr + 8 * lo * kk * n, pv + 8 * lo * m * n, hi - lo, m, kk, n)

    def gemm_rows(lo: int, hi: int) -> int:  # one batch entry: threads take blocks of 6 rows (the kernel's tiles)
        return dll.gemm_f64_exact(pl + 8 * 6 * lo * kk, pr, pv + 8 * 6 * lo * n, 1, min(m, 6 * hi) - 6 * lo, kk, n)

    rcs = _parallel(z, m * kk * n, gemm) if z > 1 else _parallel(-(-m // 6), 6 * kk * n, gemm_rows)
    if any(rcs):  # the kernel declined: N % 8 != 0, or sizes where the library's blocked GEMM is faster
        v = torch.bmm(left, right).contiguous()
    out = torch.empty((z, m, n), dtype=torch.float32)
    dll.combine_f32(_ptr(v), z, m, n, _ptr(ea), _ptr(eb), _ptr(out))
    return out


@cache
def _tables() -> tuple[ctypes.Array[ctypes.c_double], ...]:
    """The coefficient tables of pol/exact/polys.py, as C arrays (the same constants both paths read)."""
    def arr(values: list[float]) -> ctypes.Array[ctypes.c_double]:
        return (ctypes.c_double * len(values))(*values)

    erf_rows = polys.erf_table()  # (centres, degree + 1)
    erf_flat = [erf_rows[c][d] for d in range(polys.ERF_DEGREE + 1) for c in range(polys.ERF_CENTRES)]
    return (
        arr(polys.inv_factorials(polys.EXP_DEGREE)),
        arr([0.0] + polys.inv_factorials(polys.EXPM1_DEGREE)[1:]),
        arr(polys.log_coefficients()),
        arr(erf_flat),
    )


class _Tables(ctypes.Structure):
    _fields_ = [("exp_c", ctypes.c_void_p), ("expm1_c", ctypes.c_void_p), ("log_c", ctypes.c_void_p), ("erf_t", ctypes.c_void_p)]


@cache
def _table_struct() -> _Tables:
    return _Tables(*(ctypes.cast(t, ctypes.c_void_p) for t in _tables()))


def _check_constants(dll: ctypes.CDLL) -> None:
    """Raise OSError unless the kernels' polynomial degrees are those of pol/exact/polys.py."""
    got = (ctypes.c_int64 * 5)()
    dll.kernel_constants(got)
    want = (polys.EXP_DEGREE, polys.EXPM1_DEGREE, polys.LOG_TERMS, polys.ERF_DEGREE, polys.ERF_CENTRES)
    if tuple(got) != want:
        raise OSError(f"kernel constants {tuple(got)} differ from pol.exact.polys's {want}")


def unary(op: str, x: torch.Tensor) -> torch.Tensor | None:
    """The exact transcendental `op` (one of UNARY_OPS) of float32 `x`; None where the kernel does not apply."""
    dll = _library()
    if dll is None or not _cpu_f32(x):
        return None
    src = x.contiguous()
    out = torch.empty_like(src)
    fn, px, po, tables = getattr(dll, f"{op}_f32"), _ptr(src), _ptr(out), ctypes.byref(_table_struct())
    _parallel(src.numel(), 8, lambda lo, hi: fn(px + 4 * lo, po + 4 * lo, hi - lo, tables))
    return out.view(x.shape) if out.shape == x.shape else out.reshape(x.shape)


class _AdamW(ctypes.Structure):
    _fields_ = [
        ("decay", ctypes.c_float), ("has_decay", ctypes.c_int32),
        ("w1", ctypes.c_float), ("w1c", ctypes.c_float), ("w1_small", ctypes.c_int32),
        ("beta2", ctypes.c_float), ("w2", ctypes.c_float), ("w2_one", ctypes.c_int32),
        ("bias2_sqrt", ctypes.c_float), ("eps", ctypes.c_float), ("value", ctypes.c_float), ("value_one", ctypes.c_int32),
    ]  # fmt: skip


def adamw(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: float | None,
    lerp_weight: float,
    beta2: float,
    sq_weight: float,
    bias2_sqrt: float,
    eps: float,
    value: float,
) -> bool:
    """pol.optim's AdamW step for one float32 CPU parameter in one pass, as exact mode routes it (same bits);
    False, touching nothing, where the kernel does not apply. Python floats are rounded to float32 here, as torch
    rounds a Python scalar used with a float32 tensor."""
    dll = _library()
    ts = (p, g, m, v)
    if dll is None or not _cpu_f32(*ts) or not all(t.is_contiguous() and t.shape == p.shape for t in ts):
        return False
    h = _AdamW(
        decay if decay is not None else 1.0, decay is not None,
        lerp_weight, 1.0 - lerp_weight, abs(lerp_weight) < 0.5,
        beta2, sq_weight, sq_weight == 1,
        bias2_sqrt, eps, value, value == 1,
    )  # fmt: skip
    pp, pg, pm, pv, ph = _ptr(p), _ptr(g), _ptr(m), _ptr(v), ctypes.byref(h)
    _parallel(p.numel(), 4, lambda lo, hi: dll.adamw_f32(pp + 4 * lo, pg + 4 * lo, pm + 4 * lo, pv + 4 * lo, hi - lo, ph))
    for t in (p, m, v):  # written behind autograd's back: tell it, as an in-place torch op would
        torch.autograd.graph.increment_version(t)
    return True


def _opt_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Exact mode's layer norm over the last dims (n elements per row) of contiguous float32 `x`, one pass per row:
    (out, mean, rstd), mean and rstd one per row (flat); None where it does not apply."""
    dll = _library()
    ts = [t for t in (x, weight, bias) if t is not None]
    if dll is None or not _cpu_f32(*ts) or not all(t.is_contiguous() for t in ts) or x.numel() == 0:
        return None
    rows = x.numel() // n
    out = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32)
    rstd = torch.empty(rows, dtype=torch.float32)
    px, pw, pb, po, pm, pr = _ptr(x), _opt_ptr(weight), _opt_ptr(bias), _ptr(out), _ptr(mean), _ptr(rstd)

    def rows_of(lo: int, hi: int) -> None:
        scratch = torch.empty(n, dtype=torch.float32)
        dll.layer_norm_f32(px + 4 * lo * n, pw, pb, hi - lo, n, eps, po + 4 * lo * n, pm + 4 * lo, pr + 4 * lo, _ptr(scratch))

    _parallel(rows, n, rows_of)
    return out, mean, rstd


def layer_norm_backward(
    go: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    n: int,
    want_dx: bool,
    want_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The row part of exact mode's layer-norm backward: (dx, go * x_hat), each None unless wanted; None where the
    kernel does not apply."""
    dll = _library()
    ts = [t for t in (go, x, mean, rstd, weight) if t is not None]
    if dll is None or not _cpu_f32(*ts) or not all(t.is_contiguous() for t in ts) or x.numel() == 0:
        return None
    rows = x.numel() // n
    if mean.numel() != rows or rstd.numel() != rows:
        return None
    dx = torch.empty_like(x) if want_dx else None
    goxhat = torch.empty_like(x) if want_dw else None
    pg, px, pm, pr, pw = _ptr(go), _ptr(x), _ptr(mean), _ptr(rstd), _opt_ptr(weight)
    pdx, pgx = _opt_ptr(dx), _opt_ptr(goxhat)

    def rows_of(lo: int, hi: int) -> None:
        scratch = torch.empty(2 * n, dtype=torch.float32)
        off = 4 * lo * n
        dll.layer_norm_bwd_f32(
            pg + off, px + off, pm + 4 * lo, pr + 4 * lo, pw, hi - lo, n,
            None if pdx is None else pdx + off, None if pgx is None else pgx + off, _ptr(scratch),
        )  # fmt: skip

    _parallel(rows, n, rows_of)
    return dx, goxhat


def _rows_ok(dll: ctypes.CDLL | None, *ts: torch.Tensor) -> bool:
    return dll is not None and _cpu_f32(*ts) and all(t.is_contiguous() and t.shape == ts[0].shape for t in ts) and ts[0].numel() > 0


def _rows_forward(kernel: str, x: torch.Tensor) -> torch.Tensor | None:
    """A row-wise kernel(x_rows, rows, n, out_rows, tables) over the last dim of contiguous float32 `x`, returning
    how many rows it left to the torch path; None where it does not apply or left any."""
    dll = _library()
    if not _rows_ok(dll, x) or x.dim() == 0:
        return None
    fn = getattr(dll, kernel)
    n = x.shape[-1]
    out = torch.empty_like(x)
    px, po, tables = _ptr(x), _ptr(out), ctypes.byref(_table_struct())
    return None if any(_parallel(x.numel() // n, 8 * n, lambda lo, hi: fn(px + 4 * lo * n, hi - lo, n, po + 4 * lo * n, tables))) else out


def softmax(x: torch.Tensor) -> torch.Tensor | None:
    """Exact mode's softmax over the last dim of contiguous float32 `x`; None where the kernel does not apply
    (including a NaN anywhere: the torch path decides which NaN)."""
    return _rows_forward("softmax_f32", x)


def _rows_backward(kernel: str, grad: torch.Tensor, out: torch.Tensor, *extra: Any) -> torch.Tensor | None:
    """A row-wise backward kernel(grad_rows, out_rows, rows, n, result_rows, *extra) over the last dim of contiguous
    float32 tensors of one shape; None where it does not apply."""
    dll = _library()
    if not _rows_ok(dll, grad, out) or out.dim() == 0:
        return None
    fn = getattr(dll, kernel)
    n = out.shape[-1]
    res = torch.empty_like(out)
    pg, po, pr = _ptr(grad), _ptr(out), _ptr(res)
    _parallel(out.numel() // n, 8 * n, lambda lo, hi: fn(pg + 4 * lo * n, po + 4 * lo * n, hi - lo, n, pr + 4 * lo * n, *extra))
    return res


def softmax_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """Exact mode's softmax backward over the last dim (contiguous float32); None where it does not apply."""
    return _rows_backward("softmax_bwd_f32", grad, out)


def log_softmax(x: torch.Tensor) -> torch.Tensor | None:
    """Exact mode's log-softmax over the last dim of contiguous float32 `x`; None where the kernel does not apply
    (a NaN or an infinite maximum in some row: the torch path decides those)."""
    return _rows_forward("log_softmax_f32", x)


def log_softmax_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """Exact mode's log-softmax backward over the last dim (contiguous float32); None where it does not apply."""
    return _rows_backward("log_softmax_bwd_f32", grad, out, ctypes.byref(_table_struct()))


def gelu(x: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """Exact mode's GELU (erf form) of contiguous float32 `x`; None where the kernel does not apply."""
    dll = _library()
    if not _rows_ok(dll, x):
        return None
    out = torch.empty_like(x)
    px, po, tables = _ptr(x), _ptr(out), ctypes.byref(_table_struct())
    _parallel(x.numel(), 8, lambda lo, hi: dll.gelu_f32(px + 4 * lo, po + 4 * lo, hi - lo, alpha, tables))  # type: ignore[union-attr]
    return out


def gelu_backward(grad: torch.Tensor, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor | None:
    """Exact mode's GELU backward (erf form); None where the kernel does not apply."""
    dll = _library()
    if not _rows_ok(dll, grad, x):
        return None
    out = torch.empty_like(x)
    pg, px, po, tables = _ptr(grad), _ptr(x), _ptr(out), ctypes.byref(_table_struct())
    _parallel(x.numel(), 12, lambda lo, hi: dll.gelu_bwd_f32(pg + 4 * lo, px + 4 * lo, po + 4 * lo, hi - lo, alpha, beta, tables))  # type: ignore[union-attr]
    return out
