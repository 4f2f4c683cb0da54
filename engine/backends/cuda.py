"""The CUDA backend: generated kernels (engine/codegen/cuda.py) compiled with NVRTC and launched through CuPy.

- Compilation: `engine.backends.nvrtc` builds a cubin for the device's architecture (sm_90 on H100/H200); cubins are
  cached on disk under the kernel cache directory (`KRED_CACHE_DIR`), keyed by the source, the architecture and the
  NVRTC version, written atomically under a file lock; loaded modules are memoised per device in the process.
- Inputs: numpy arrays are copied to the device and the results copied back (numpy in, numpy out). CuPy arrays and
  torch CUDA tensors are used in place (`__cuda_array_interface__`, no copy) and the results are CuPy arrays on the
  same device (the torch front end wraps them as tensors through DLPack, again without a copy).
- Device and stream: the device of the inputs, else `device_id`, else the current device; kernels are launched on
  the caller's current stream — torch's when the inputs are torch tensors, CuPy's otherwise.
- Nothing touches CUDA at import time, so `import engine` is safe in forked processes and Ray workers. Whether a GPU
  is visible is asked of NVML (`gpu_count`), which does not initialise CUDA either.
- `partial` returns the reduction's state as numpy arrays in the layout of `engine.reductions` (what the cluster and
  block-sparse `ranges` merge); `reduce` finalizes on the device. Every copy back to the host is made on the
  caller's stream, after the kernels (`cupy.asnumpy(..., stream=)`, which waits for that stream).
- Launches: `schedule` turns (program, rows, columns, SM count) into kernel launches (1D or 2D scheme) and
  `execute` runs them through an `allocate` and a `launch` function, slicing a state too large for registers into
  component groups (`component_groups`). They touch no device, so tests/cuda_emulation.py runs the same schedule on
  the CPU. Each device's SM count and opt-in shared memory are queried once and passed to the generator.
- `prepare(plan, dtype)` generates and compiles a plan's modules ahead of the first call (the service's compile
  limit). Generated programs and loaded modules are kept in bounded LRU caches (the cubins stay on disk).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import cachetools
import numpy as np

from ..codegen import cuda as template
from ..errors import ArgumentError, BackendError
from ..formula import J, make
from ..plan import DTYPES, Plan
from ..reductions import bind
from . import nvrtc
from .base import Backend

INSTALL_HINT = "install the CUDA extra: pip install 'kred[cuda]' (CuPy for CUDA 12 and NVRTC)"


# Finding GPUs without initialising CUDA --------------------------------------------------------------------------

@functools.cache
def gpu_count() -> int:
    """How many GPUs this process may use, asked of NVML (which does not initialise CUDA), capped by
    CUDA_VISIBLE_DEVICES. 0 when there is no NVIDIA driver. Decided once per process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return 0
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return 0
        total = count.value
    finally:
        nvml.nvmlShutdown()
    if visible is not None:
        total = min(total, len([v for v in visible.split(",") if v.strip()]))
    return total


def on_gpu(value) -> bool:
    """Is `value` an array in GPU memory (a torch CUDA tensor, a CuPy array, anything with
    `__cuda_array_interface__`)? Looks at the type only: never initialises CUDA."""
    if type(value).__module__.split(".")[0] == "torch":
        return bool(getattr(value, "is_cuda", False))
    return hasattr(type(value), "__cuda_array_interface__")


@functools.cache
def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise BackendError(f"the CUDA backend needs CuPy ({e}); {INSTALL_HINT}") from None
    return cupy


# Compiled modules -------------------------------------------------------------------------------------------

# Bounded: a long-lived service sees many formulas; an evicted module is reloaded from the disk cache.
_MODULES: cachetools.LRUCache = cachetools.LRUCache(maxsize=256)
_MODULES_LOCK = threading.Lock()


def cubin_path(source: str, arch: str) -> Path:
    """The cubin for `source` on `arch`, from the disk cache (checked against its recorded size and hash) or compiled
    now (once per machine, under a lock)."""
    from . import cache

    major, minor = nvrtc.version()
    options = nvrtc.DEFAULT_OPTIONS
    key = hashlib.sha256("\0".join([source, arch, f"nvrtc {major}.{minor}", *options]).encode()).hexdigest()
    directory = cache.cache_dir() / "cuda"

    def build(target: Path) -> None:
        image = nvrtc.compile_source(source, arch)
        (directory / f"{key}.cu").write_text(source)          # for reading; the cubin is the cache entry
        cache.atomic_write(target, image)

    return cache.entry(directory, f"{key}.{arch}.cubin", build)


def _module(program: template.Program, device) -> object:
    """The loaded CuPy module of `program` on `device` (a cupy.cuda.Device)."""
    arch = f"sm_{device.compute_capability}"
    key = (program.source, arch, device.id)
    with _MODULES_LOCK:
        module = _MODULES.get(key)
    if module is None:                  # compiled at most once per machine: cubin_path holds a file lock
        module = _cupy().RawModule(path=str(cubin_path(program.source, arch)))
        with _MODULES_LOCK:
            _MODULES[key] = module
    return module


_PROGRAMS: cachetools.LRUCache = cachetools.LRUCache(maxsize=1024)
_PROGRAMS_LOCK = threading.Lock()


def _program(plan: Plan, dtype, acc, shared_limit: int = template.SHARED_BUDGET) -> template.Program:
    """The generated module for (plan, dtype, acc) within `shared_limit` bytes of shared memory per block, memoised
    by the plan's key (or the plan itself)."""
    key = (plan.key or plan, np.dtype(dtype).name, np.dtype(acc).name, shared_limit)
    with _PROGRAMS_LOCK:
        program = _PROGRAMS.get(key)
    if program is None:
        program = template.build(plan, dtype, acc, shared_limit)
        with _PROGRAMS_LOCK:
            _PROGRAMS[key] = program
    return program


# Launch plan: device-independent, so the CPU emulation in CI runs the same schedule --------------------------

# When to split (`choose_splits`, the documented rule): with R = ceil(rows / block) row-blocks and S streaming
# multiprocessors, the 1D scheme keeps every SM busy when R >= 4 S. Otherwise columns are split into the fewest spans
# that give about 4 S blocks in total, each span at least `MIN_SPAN_TILES` tiles long (so the state round trip stays
# small next to the work), and the partial states at most `MAX_STATE_BYTES`.
#
BLOCKS_PER_SM = 4               # the 2D rule aims at this many blocks per SM
MIN_SPAN_TILES = 4              # a split column span holds at least this many tiles
MAX_STATE_BYTES = 256 << 20     # bound on the 2D scheme's partial states


def choose_splits(rows: int, cols: int, block: int, sm_count: int, state_bytes_per_row: int) -> int:
    """How many column spans the 2D scheme uses (1 = the 1D scheme). See the module docstring."""
    row_blocks = max(1, math.ceil(rows / block))
    target = BLOCKS_PER_SM * max(1, sm_count)
    if row_blocks >= target:
        return 1
    by_work = math.ceil(target / row_blocks)
    by_length = max(1, cols // (MIN_SPAN_TILES * block))
    by_memory = max(1, MAX_STATE_BYTES // max(1, rows * state_bytes_per_row))
    return max(1, min(by_work, by_length, by_memory, 65535))


def span_of(cols: int, splits: int, block: int) -> int:
    """Columns per span: a whole number of tiles, so only the last span has a partial tile."""
    tiles = math.ceil(max(cols, 1) / block)
    return math.ceil(tiles / splits) * block



@dataclass(frozen=True)
class Buffer:
    """An array a launch reads or writes: `arg{pos}` (inputs), `out{o}` (finalized results), `state{s}` (a partial
    state, the reduction's layout) or `part{s}` (the 2D scheme's per-span states). `kind` is its element type:
    "store" (the input dtype), "index" (int64), "acc" or "real" (the accumulator and formula dtypes)."""
    name: str
    shape: tuple[int, ...]
    kind: str


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int]
    block: int
    shared_bytes: int
    args: tuple                 # ("int64" | "int32", value) or ("buffer", name), in the kernel's parameter order


MERGE_BLOCK = 128


def schedule(program: template.Program, plan: Plan, rows: tuple[int, int], cols: tuple[int, int], sm_count: int,
             final: bool, splits: int | None = None) -> tuple[list[Launch], list[Buffer]]:
    """The kernel launches computing rows [r0, r1) over columns [c0, c1): finalized outputs when `final`, else the
    partial state. Returns the launches and the buffers they write (inputs are `arg{pos}`, supplied by the caller);
    the results come first. `splits` overrides the 2D rule (tests use it)."""
    (r0, r1), (c0, c1) = rows, cols
    n = r1 - r0
    if n <= 0:
        return [], _results(program, 0, final)
    if splits is None:
        splits = choose_splits(n, c1 - c0, program.block, sm_count, program.state_bytes_per_row())
    span = span_of(c1 - c0, splits, program.block)
    splits = max(1, math.ceil((c1 - c0) / span))        # rounding spans up to whole tiles can leave fewer
    inputs = tuple(("buffer", f"arg{a.pos}") for a in plan.args)
    head = (("int64", r0), ("int64", n), ("int64", c0), ("int64", c1), ("int64", span))
    grid = (math.ceil(n / program.block), splits)
    results = _results(program, n, final)
    if splits == 1:
        kernel = "kred_final" if final else "kred_state"
        names = tuple(("buffer", b.name) for b in results)
        return [Launch(kernel, grid, program.block, program.shared_bytes, head + inputs + names)], results
    parts = [Buffer(f"part{s}", (splits, n, slot.width), template.NUMPY_STATE[slot.ctype])
             for s, slot in enumerate(program.slots)]
    first = Launch("kred_state", grid, program.block, program.shared_bytes,
                   head + inputs + tuple(("buffer", b.name) for b in parts))
    merge = Launch("kred_merge_final" if final else "kred_merge_state", (math.ceil(n / MERGE_BLOCK), 1),
                   MERGE_BLOCK, 0, (("int64", n), ("int32", splits)) + tuple(("buffer", b.name) for b in parts)
                   + tuple(("buffer", b.name) for b in results))
    return [first, merge], results + parts


def grid_units(grid, block: int) -> np.ndarray:
    """The units of a grid's CUDA launch (kred_grid_*), one block of threads each: (i0, i1, o0, o1) = each row block
    of the grid's CSR pattern cut into pieces of at most `block` rows, with the row block's column ranges o0 .. o1 - 1
    of `grid.csr()`. numpy only: no Python loop per block."""
    rows, offsets, _ = grid.csr()
    counts = -(-(rows[:, 1] - rows[:, 0]) // block)
    owner = np.repeat(np.arange(len(rows)), counts)
    piece = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    i0 = rows[owner, 0] + piece * block
    i1 = np.minimum(i0 + block, rows[owner, 1])
    return np.ascontiguousarray(np.stack([i0, i1, offsets[owner], offsets[owner + 1]], 1), np.int64).reshape(-1, 4)


def schedule_grid(program: template.Program, plan: Plan, grid, m: int, final: bool) -> tuple[list[Launch], list[Buffer]]:
    """The one launch computing a grid's rows (engine.grid) block-sparsely: a block of threads per unit
    (`grid_units`), each looping over its column ranges. Needs the buffers `units` and `ranges` (the grid's column
    ranges, int64 (R, 2)) besides the inputs."""
    r0, r1 = grid.rows
    results = _results(program, r1 - r0, final)
    count = len(grid_units(grid, program.block))
    if count == 0:
        return [], results
    head = (("int64", r0), ("int64", 0), ("int64", m), ("buffer", "units"), ("buffer", "ranges"))
    inputs = tuple(("buffer", f"arg{a.pos}") for a in plan.args)
    names = tuple(("buffer", b.name) for b in results)
    kernel = "kred_grid_final" if final else "kred_grid_state"
    return [Launch(kernel, (count, 1), program.block, program.shared_bytes, head + inputs + names)], results


def _results(program: template.Program, n: int, final: bool) -> list[Buffer]:
    if final:
        return [Buffer(f"out{o}", (n, width), "store" if kind == "value" else "index")
                for o, (kind, width) in enumerate(program.outputs)]
    return [Buffer(f"state{s}", (n, slot.width), template.NUMPY_STATE[slot.ctype]) for s, slot in enumerate(program.slots)]


def execute(plan: Plan, dtype, inputs: dict, rows: tuple[int, int], cols: tuple[int, int], sm_count: int,
            final: bool, allocate, launch, programs=None, splits: int | None = None, grid=None,
            upload=np.ascontiguousarray) -> list:
    """Compute rows [r0, r1) of `plan` over columns [c0, c1) on a device given by `allocate(shape, dtype)` and
    `launch(program, Launch, buffers)` — the CUDA runtime passes CuPy's, the CI emulation its own — with `programs(plan,
    dtype, acc)` building (or fetching) the modules. Returns the outputs (`final`) or the state slots, as arrays.

    A plan whose state is too large for registers runs as several plans over slices of its components (see
    `component_groups`); their states are joined in the reduction's layout and finalized by the reduction itself.

    With `grid` (engine.grid; `rows` = grid.rows, `cols` = (0, m)), the grid's rows are reduced block-sparsely in one
    launch (`schedule_grid`), its CSR pattern copied to the device by `upload`."""
    programs = programs or template.build
    acc = plan.acc_dtype(dtype)
    groups = component_groups(plan, dtype, acc)
    if len(groups) == 1:
        return _execute(programs(plan, dtype, acc), plan, inputs, rows, cols, sm_count, final, allocate, launch,
                        splits, grid, upload)
    parts = [_execute(programs(group, dtype, acc), group, inputs, rows, cols, sm_count, False, allocate, launch,
                      splits, grid, upload) for group in groups]
    n = rows[1] - rows[0]
    state = []
    for s, like in enumerate(plan.reduction.identity(0, dtype, acc)):
        slots = [part[s].reshape((n,) + shaped.shape[1:]) for part, shaped in
                 zip(parts, (g.reduction.identity(0, dtype, acc)[s] for g in groups))]
        if slots[0].shape[1:] == like.shape[1:]:        # not split: the same in every group (LSE's max of weights)
            state.append(slots[0])
        else:                                           # components are the last axis of every layout
            state.append(np.concatenate(slots, axis=-1))
    if not final:
        return [slot.reshape(n, -1) for slot in state]
    result = plan.reduction.finalize(tuple(state), np.dtype(dtype))
    return list(result) if isinstance(result, tuple) else [result]


def _execute(program: template.Program, plan: Plan, inputs, rows, cols, sm_count, final, allocate, launch, splits,
             grid=None, upload=np.ascontiguousarray) -> list:
    arrays = dict(inputs)
    if grid is None:
        launches, buffers = schedule(program, plan, rows, cols, sm_count, final, splits)
    else:
        launches, buffers = schedule_grid(program, plan, grid, cols[1], final)
        arrays["units"] = upload(grid_units(grid, program.block))
        arrays["ranges"] = upload(np.ascontiguousarray(grid.col_ranges, np.int64).reshape(-1, 2))
    for buffer in buffers:
        arrays[buffer.name] = allocate(buffer.shape, program.dtype_of(buffer.kind))
    for step in launches:
        launch(program, step, arrays)
    count = len(program.outputs) if final else len(program.slots)
    return [arrays[buffer.name] for buffer in buffers[:count]]


# Large states ----------------------------------------------------------------------------------------------

STATE_REGISTERS = 64            # 32-bit registers a thread may spend on reduction state (running + tile)


def state_registers(plan: Plan, dtype, acc) -> int:
    """Registers the per-thread state of `plan` takes: the running state, plus the tile state of block sums."""
    real = np.dtype(template.REAL[np.dtype(dtype).name])
    words = {"kred_acc": np.dtype(acc).itemsize // 4, "kred_real": real.itemsize // 4, "kred_index": 2}
    slots = plan.reduction.slots()
    block_sums = np.dtype(acc) != real and any(slot.ctype == "kred_acc" for slot in slots)
    running = sum(slot.width * words[slot.ctype] for slot in slots)
    tile = sum(slot.width * (real.itemsize // 4 if slot.ctype == "kred_acc" else words[slot.ctype])
               for slot in slots) if block_sums else 0
    return running + tile


def component_groups(plan: Plan, dtype, acc) -> list[Plan]:
    """`plan` alone when its state fits in `STATE_REGISTERS`; else plans over consecutive slices of its formula's
    components (formula2's for the weighted reductions), each small enough. Every reduction works component by
    component, so the slices' states join along the component axis. The formula's shared work (the exponential of
    a Gaussian kernel...) is recomputed per slice: a few instructions, against spilling the state to memory."""
    if state_registers(plan, dtype, acc) <= STATE_REGISTERS:
        return [plan]
    weighted = plan.formula2 is not None
    whole = plan.formula2 if weighted else plan.formula
    if whole.dim == 1:
        return [plan]

    def sliced(start: int, width: int) -> Plan:
        part = make("Extract", (whole,), (start, width))
        formula, formula2 = (plan.formula, part) if weighted else (part, plan.formula2)
        reduction = bind(plan.reduction.name, formula.dim, formula2.dim if weighted else None, plan.reduction.k)
        return replace(plan, formula=formula, formula2=formula2, reduction=reduction,
                       key=f"{plan.key}|components {start}+{width}" if plan.key else "")

    one, two = (state_registers(sliced(0, w), dtype, acc) for w in (1, 2))
    per, fixed = two - one, 2 * one - two
    width = max(1, (STATE_REGISTERS - fixed) // max(per, 1))
    return [sliced(start, min(width, whole.dim - start)) for start in range(0, whole.dim, width)]


# The backend --------------------------------------------------------------------------------------------------

class CudaBackend(Backend):
    """Reductions on an NVIDIA GPU. `bind(args, device_id)` gives the instance that runs one call."""

    name = "cuda"
    dtypes = DTYPES + (np.dtype(np.float16),)       # float16 is computed in float32 and stored back as float16

    def __init__(self, device_id: int | None = None, stream=None, xp=np):
        self.device_id, self.stream, self.xp = device_id, stream, xp

    def bind(self, args, device_id: int = -1) -> "CudaBackend":
        """The backend for one call on `args`: their device (else `device_id`, else the current one) and the
        caller's stream (torch's current stream for torch tensors, else CuPy's)."""
        cp = _cupy()
        devices = {_device_of(a) for a in args if on_gpu(a)}
        if len(devices) > 1:
            raise ArgumentError(f"the arrays of one reduction are on different GPUs ({sorted(devices)})")
        device = devices.pop() if devices else (device_id if device_id is not None and device_id >= 0 else None)
        if device is None:
            device = cp.cuda.runtime.getDevice()
        if device_id is not None and device_id >= 0 and device != device_id:
            raise ArgumentError(f"device_id={device_id} but the arrays are on GPU {device}")
        if not 0 <= device < cp.cuda.runtime.getDeviceCount():
            raise ArgumentError(f"device_id={device} but only {cp.cuda.runtime.getDeviceCount()} GPU(s) are visible")
        stream = None
        torch_tensors = [a for a in args if on_gpu(a) and type(a).__module__.split(".")[0] == "torch"]
        if torch_tensors:
            import torch
            stream = cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device)
        return CudaBackend(device, stream, cp if devices else np)

    # Backend interface ------------------------------------------------------------------------------------------
    def prepare(self, plan, dtype) -> None:
        """Generate and compile (to the disk cache) the modules of `plan` for the current device's architecture."""
        cp = _cupy()
        plan = plan.kernel_inputs([], dtype)[0]     # [constants] float constants are run-time arguments
        acc = plan.acc_dtype(np.dtype(dtype))
        with cp.cuda.Device(self.device_id if self.device_id is not None else cp.cuda.runtime.getDevice()) as device:
            for group in component_groups(plan, dtype, acc):
                program = _program(group, dtype, acc, _shared_limit(device.id))
                cubin_path(program.source, f"sm_{device.compute_capability}")

    def partial(self, plan, arrays, rows, cols, on_device: bool = False):
        """The state of a block (numpy); `on_device`: left on the GPU, as CuPy arrays (a cluster worker merges the
        states of its shards there and copies them to the host once per job)."""
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        acc = plan.acc_dtype(dtype)
        states = self._run(plan, arrays, rows, cols, final=False, host=not on_device)
        template_state = plan.reduction.identity(0, dtype, acc)
        return tuple(s.reshape((-1,) + like.shape[1:]).astype(like.dtype, copy=False)
                     for s, like in zip(states, template_state))

    def grid_state(self, plan, arrays, grid):
        """The grid's rows (engine.grid) in one block-sparse launch per module: the CSR pattern goes to the kernel."""
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        m = next((len(a) for spec, a in zip(plan.args, arrays) if spec.role == J), 0)
        states = self._run(plan, arrays, grid.rows, (0, m), final=False, host=True, grid=grid)
        n = grid.rows[1] - grid.rows[0]
        return tuple(s.reshape((n,) + like.shape[1:]).astype(like.dtype, copy=False)
                     for s, like in zip(states, plan.reduction.identity(0, dtype, plan.acc_dtype(dtype))))

    def reduce(self, plan, arrays, n, m):
        results = self._run(plan, arrays, (0, n), (0, m), final=True, host=self.xp is np)
        return results[0] if len(results) == 1 else tuple(results)

    # Running ------------------------------------------------------------------------------------------------
    def _run(self, plan: Plan, arrays, rows, cols, final: bool, host: bool, grid=None) -> list:
        """The outputs (`final`) or state slots; copied to numpy (`host`) on the caller's stream, after the kernels."""
        cp = _cupy()
        if self.device_id is None:          # not bound: called directly (cluster workers, ranges, tests)
            return self.bind(arrays)._run(plan, arrays, rows, cols, final, host, grid)
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        plan, arrays = plan.kernel_inputs(arrays, dtype)    # [constants] the kernel reads them as 1-element arguments
        with cp.cuda.Device(self.device_id) as device:
            stream = self.stream if self.stream is not None else cp.cuda.get_current_stream()
            with stream:
                inputs = {f"arg{spec.pos}": cp.ascontiguousarray(cp.asarray(a)) for spec, a in zip(plan.args, arrays)}

                def launch(program: template.Program, step: Launch, buffers: dict) -> None:
                    kernel = _module(program, device).get_function(step.kernel)
                    if step.shared_bytes > template.SHARED_DEFAULT:
                        kernel.max_dynamic_shared_size_bytes = step.shared_bytes
                    kernel(step.grid, (step.block,), tuple(_argument(a, buffers) for a in step.args),
                           shared_mem=step.shared_bytes)

                limit = _shared_limit(self.device_id)
                results = execute(plan, dtype, inputs, rows, cols, _sm_count(self.device_id), final,
                                           allocate=cp.empty, launch=launch,
                                           programs=lambda *key: _program(*key, shared_limit=limit), grid=grid,
                                           upload=cp.asarray)
                return [cp.asnumpy(r, stream=stream) if host else r for r in results]


def _argument(arg, buffers):
    kind, value = arg
    if kind == "buffer":
        return buffers[value]
    return np.int64(value) if kind == "int64" else np.int32(value)


@functools.cache
def _sm_count(device_id: int) -> int:
    return int(_cupy().cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


SHARED_OPTIN = 97       # cudaDevAttrMaxSharedMemoryPerBlockOptin


@functools.cache
def _shared_limit(device_id: int) -> int:
    """Bytes of shared memory a block may use once opted in (227 KiB on sm_90, 99 KiB on sm_86, 64 KiB on sm_75)."""
    runtime = _cupy().cuda.runtime
    return int(runtime.deviceGetAttribute(SHARED_OPTIN, device_id))


def _device_of(value) -> int:
    device = getattr(value, "device", None)
    if type(value).__module__.split(".")[0] == "torch":
        return int(device.index)
    if device is not None and hasattr(device, "id"):
        return int(device.id)
    return _cupy().asarray(value).device.id


def create() -> CudaBackend:
    """The registered instance: refuses clearly when CuPy, NVRTC or a GPU is missing."""
    _cupy()
    if gpu_count() == 0:
        raise BackendError("backend 'cuda': no NVIDIA GPU is visible (NVML reports none, or CUDA_VISIBLE_DEVICES "
                           "hides them)")
    return CudaBackend()
