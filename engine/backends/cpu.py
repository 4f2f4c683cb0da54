"""The compiled CPU backend: the plan's C source (engine.codegen.cpu) built by the system compiler, run by ctypes.

Kernels are compiled once per (plan, dtype) and machine (engine.backends.cache) and memoised per process, so a warm
call costs a dictionary lookup, the output allocation and one ctypes call. The plan compiled is the lifted one
(`Plan.kernel_inputs`): float constants are run-time arguments, so plans that differ only in them share a kernel. Threads: KRED_NUM_THREADS, else every CPU
this process may run on.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import weakref

import numpy as np

from .. import limits
from ..limits import env_int
from ..codegen.cpu import TILE_BYTES, LANES, SMALL_WORK, column_bytes, cpu_source
from ..errors import BackendError
from ..formula import J
from ..reductions import INDEX_DTYPE
from . import cache
from .base import Backend

# -O3 and the host's vector units; fast-math pieces that keep IEEE NaN/Inf semantics (Min/Max/LogSumExp need them):
# no errno (lets sqrt vectorize), no trapping, fused multiply-add contraction. No IPA-CP cloning: it compiles the
# block loop once per call site for a third of the compile time and no speed (benchmarks/bench_compile.py).
OPTIMISE = ("-O3", "-fno-ipa-cp-clone")
FLAGS = (*OPTIMISE, "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu99", "-fno-math-errno",
         "-fno-trapping-math", "-ffp-contract=fast", "-w")
LIBS = ("-lm",)
ROW_BLOCK = 32
_CHAR = ctypes.c_char
_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
_ARGTYPES = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong,
             ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_GRID_ARGTYPES = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                  ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong]
TASK_PAIRS = 1 << 16   # a block-sparse task batches small blocks up to about this many pairs (~20-60 us of work)
UNIT_PAIRS = 512       # what a unit costs beyond its pairs (states set up, finalized, stored), in pairs


def num_threads() -> int:
    configured = env_int("KRED_NUM_THREADS", None, BackendError)
    if configured is not None:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


class _Kernel:
    """One compiled plan for one dtype, with what a call needs precomputed."""

    def __init__(self, plan, dtype: np.dtype):
        acc = plan.acc_dtype(dtype)
        source = cpu_source(plan, _NAMES[dtype], _NAMES[acc])
        self.library = cache.load(source, FLAGS, LIBS)      # kept: the library is closed when its last user goes
        self.run = self.library["kred_run"]
        self.run.argtypes = _ARGTYPES
        self.run.restype = ctypes.c_int
        self.run_grid = self.library["kred_grid"]
        self.run_grid.argtypes = _GRID_ARGTYPES
        self.run_grid.restype = ctypes.c_int
        self.dtype, self.acc = dtype, acc
        reduction = plan.reduction
        kinds = {"acc": acc, "value": dtype, "index": np.dtype(INDEX_DTYPE)}
        self.state_specs = [(width, kinds[kind]) for _, width, kind in reduction.layout()]
        self.output_specs = [(width, dtype if kind == "value" else np.dtype(INDEX_DTYPE))
                             for kind, width in reduction.outputs]
        # the numpy monoid's shape of each state slot (e.g. (K, dim) for KMin): the kernel writes them flat
        self.state_shapes = [like.shape[1:] for like in reduction.identity(0, dtype, acc)]
        self.tile = max(LANES, TILE_BYTES // column_bytes(plan, dtype.itemsize) // LANES * LANES)
        self.nargs = plan.nargs
        self.pointers = ctypes.c_void_p * max(1, plan.nargs)
        self.out_pointers = {False: ctypes.c_void_p * len(self.state_specs), True: ctypes.c_void_p * len(self.output_specs)}

    def __call__(self, arrays, rows, cols, finalize: bool, threads: int, parts: int | None = None):
        (r0, r1), (c0, c1) = rows, cols
        n, m = r1 - r0, c1 - c0
        specs = self.output_specs if finalize else self.state_specs
        outs = [np.empty((n, width), dtype) for width, dtype in specs]
        if n == 0:
            return outs
        if _pool.forked:
            threads = 1
        elif threads > 1 and n * m > SMALL_WORK:
            _pool.started = True
        if parts is None:
            parts = 1 if threads == 1 or n * m <= SMALL_WORK else split_columns(n, m, threads)
        args = self.pointers(*map(_address, arrays))
        out_pointers = self.out_pointers[finalize](*map(_address, outs))
        failed = self.run(args, r0, r1, c0, c1, out_pointers, int(finalize), parts, threads, ROW_BLOCK, self.tile)
        if failed:
            raise MemoryError("the CPU kernel could not allocate its work buffers")
        return outs

    def grid(self, arrays, grid, m: int, finalize: bool, threads: int) -> list[np.ndarray]:
        """The grid's rows (engine.grid) reduced in one kernel call: its CSR pattern goes to the kernel whole."""
        r0, r1 = grid.rows
        specs = self.output_specs if finalize else self.state_specs
        outs = [np.empty((r1 - r0, width), dtype) for width, dtype in specs]
        units, tasks, work = grid_tasks(grid)
        if not len(units):
            return outs
        if _pool.forked:
            threads = 1
        elif threads > 1 and work > SMALL_WORK:
            _pool.started = True
        ranges = np.ascontiguousarray(grid.col_ranges, np.int64)
        failed = self.run_grid(self.pointers(*map(_address, arrays)), r0, r1, m, units.ctypes.data, tasks.ctypes.data,
                               len(tasks) - 1, ranges.ctypes.data if ranges.size else None,
                               self.out_pointers[finalize](*map(_address, outs)), int(finalize), threads, ROW_BLOCK,
                               self.tile, work)
        if failed:
            raise MemoryError("the CPU kernel could not allocate its work buffers")
        return outs

    def states(self, arrays, rows, cols, threads: int) -> tuple:
        """The partial state of rows x cols, shaped like the numpy monoid's."""
        outs = self(arrays, rows, cols, False, threads)
        return tuple(out.reshape((len(out),) + shape) for out, shape in zip(outs, self.state_shapes))


class _Pool:
    """GNU OpenMP's thread pool does not survive fork(): a child process that enters a parallel region hangs. So
    after a fork of a process that has started the pool, the child runs its kernels on one thread."""
    started = False
    forked = False


_pool = _Pool()


def _after_fork_in_child() -> None:
    if _pool.started:
        _pool.forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _address(array: np.ndarray) -> int:
    """The data pointer of a contiguous array (c_char.from_buffer is 3x faster than array.ctypes.data)."""
    try:
        return ctypes.addressof(_CHAR.from_buffer(array))
    except (TypeError, ValueError):        # read-only or empty
        return array.ctypes.data


def grid_tasks(grid) -> tuple[np.ndarray, np.ndarray, int]:
    """(units (U, 5), task offsets (T + 1,), pairs) for kred_grid: each row block cut into units of at most ROW_BLOCK
    rows (i0, i1, first range, end range, part 0), and consecutive units batched into tasks of about TASK_PAIRS pairs,
    so that many small blocks make few tasks and a large block many. numpy only: no Python loop per block."""
    rows, offsets, ranges = grid.csr()
    sizes = rows[:, 1] - rows[:, 0]
    counts = -(-sizes // ROW_BLOCK)
    block = np.repeat(np.arange(len(rows)), counts)
    piece = np.arange(len(block)) - np.repeat(np.cumsum(counts) - counts, counts)
    i0 = rows[block, 0] + piece * ROW_BLOCK
    i1 = np.minimum(i0 + ROW_BLOCK, rows[block, 1])
    units = np.ascontiguousarray(np.stack([i0, i1, offsets[block], offsets[block + 1], np.zeros_like(i0)], 1),
                                 np.int64)
    widths = np.concatenate([[0], np.cumsum(ranges[:, 1] - ranges[:, 0])])
    pairs = (i1 - i0) * (widths[offsets[block + 1]] - widths[offsets[block]])
    group = np.cumsum(pairs + UNIT_PAIRS) // TASK_PAIRS
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else np.zeros(0, np.int64)
    tasks = np.ascontiguousarray(np.r_[starts, len(units)], np.int64)
    return units, tasks, int(pairs.sum())


def split_columns(n: int, m: int, threads: int) -> int:
    """How many column parts (the 2D split): enough tasks to keep every thread busy when N is small."""
    if threads == 1:
        return 1
    blocks = -(-n // ROW_BLOCK)
    if blocks >= 4 * threads:
        return 1
    return max(1, min(-(-4 * threads // blocks), m // 2048))


_PROBE = "int kred_probe(void) { int s = 0;\n#pragma omp parallel reduction(+:s)\n s += 1;\n return s; }\n"


@functools.cache
def compiler_problem() -> str | None:
    """Why kernels cannot be built here (no compiler, or it fails on OpenMP C), or None. Checked once."""
    try:
        cache.load(_PROBE, FLAGS, LIBS)["kred_probe"]()
    except BackendError as e:
        return str(e)
    return None


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        problem = compiler_problem()
        if problem is not None:
            raise BackendError(f"the cpu backend needs a working C compiler with OpenMP: {problem}")
        # loaded kernels, least recently used dropped first (their libraries are closed when no call uses them)
        self._kernels = limits.BoundedLRU(limits.LOADED_KERNELS, limits.LOADED_KERNEL_BYTES,
                                          getsizeof=lambda kernel: kernel.library.size)
        self._unkeyed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # plans built without a key
        self._lock = threading.Lock()
        self.threads = num_threads()

    def prepare(self, plan, dtype) -> None:
        self.kernel(plan.kernel_inputs([], dtype)[0], np.dtype(dtype))

    def kernel(self, plan, dtype) -> _Kernel:
        key = (plan.key, dtype)
        kernel = self._kernels.get(key) if plan.key else self._unkeyed.get(plan, {}).get(dtype)
        if kernel is None:
            with self._lock:
                kernel = _Kernel(plan, np.dtype(dtype))
                if plan.key:
                    self._kernels[key] = kernel
                else:
                    self._unkeyed.setdefault(plan, {})[dtype] = kernel
        return kernel

    def partial(self, plan, arrays, rows, cols):
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        plan, arrays = plan.kernel_inputs(arrays, dtype)     # float constants: run-time arguments
        return self.kernel(plan, dtype).states(arrays, rows, cols, self.threads)

    def grid_state(self, plan, arrays, grid):
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        plan, arrays = plan.kernel_inputs(arrays, dtype)     # float constants: run-time arguments
        kernel = self.kernel(plan, dtype)
        outs = kernel.grid(arrays, grid, _columns(plan, arrays), False, self.threads)
        return tuple(out.reshape((len(out),) + shape) for out, shape in zip(outs, kernel.state_shapes))

    def reduce_grid(self, plan, arrays, grid):
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        plan, arrays = plan.kernel_inputs(arrays, dtype)     # float constants: run-time arguments
        outs = self.kernel(plan, dtype).grid(arrays, grid, _columns(plan, arrays), True, self.threads)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def reduce(self, plan, arrays, n, m):
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        plan, arrays = plan.kernel_inputs(arrays, dtype)     # float constants: run-time arguments
        outs = self.kernel(plan, dtype)(arrays, (0, n), (0, m), True, self.threads)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _columns(plan, arrays) -> int:
    """M, the number of columns (j points) of the arrays that Plan.check_args gave."""
    return next((len(array) for spec, array in zip(plan.args, arrays) if spec.role == J), 0)
