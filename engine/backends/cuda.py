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
- `prepare(plan, dtype)` generates and compiles a plan's modules ahead of the first call (the service's compile
  limit). Generated programs and loaded modules are kept in bounded LRU caches (the cubins stay on disk).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
from pathlib import Path

import cachetools
import numpy as np

from ..codegen import cuda as template
from ..errors import ArgumentError, BackendError
from ..plan import DTYPES, Plan
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
    """The cubin for `source` on `arch`, from the disk cache or compiled now (once per machine, under a lock)."""
    from filelock import FileLock

    from .cache import atomic_write, cache_dir

    major, minor = nvrtc.version()
    options = nvrtc.DEFAULT_OPTIONS
    key = hashlib.sha256("\0".join([source, arch, f"nvrtc {major}.{minor}", *options]).encode()).hexdigest()
    directory = cache_dir() / "cuda"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{key}.{arch}.cubin"
    if target.exists() and target.stat().st_size > 0:
        return target
    with FileLock(str(directory / f"{key}.lock"), timeout=600):
        if not (target.exists() and target.stat().st_size > 0):
            image = nvrtc.compile_source(source, arch)
            (directory / f"{key}.cu").write_text(source)          # for reading; the cubin is the cache entry
            atomic_write(target, image)
    return target


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
        acc = plan.acc_dtype(np.dtype(dtype))
        with cp.cuda.Device(self.device_id if self.device_id is not None else cp.cuda.runtime.getDevice()) as device:
            for group in template.component_groups(plan, dtype, acc):
                program = _program(group, dtype, acc, _shared_limit(device.id))
                cubin_path(program.source, f"sm_{device.compute_capability}")

    def partial(self, plan, arrays, rows, cols):
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        acc = plan.acc_dtype(dtype)
        states = self._run(plan, arrays, rows, cols, final=False, host=True)
        template_state = plan.reduction.identity(0, dtype, acc)
        return tuple(s.reshape((-1,) + like.shape[1:]).astype(like.dtype, copy=False)
                     for s, like in zip(states, template_state))

    def reduce(self, plan, arrays, n, m):
        results = self._run(plan, arrays, (0, n), (0, m), final=True, host=self.xp is np)
        return results[0] if len(results) == 1 else tuple(results)

    # Running ------------------------------------------------------------------------------------------------
    def _run(self, plan: Plan, arrays, rows, cols, final: bool, host: bool) -> list:
        """The outputs (`final`) or state slots; copied to numpy (`host`) on the caller's stream, after the kernels."""
        cp = _cupy()
        if self.device_id is None:          # not bound: called directly (cluster workers, ranges, tests)
            return self.bind(arrays)._run(plan, arrays, rows, cols, final, host)
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        with cp.cuda.Device(self.device_id) as device:
            stream = self.stream if self.stream is not None else cp.cuda.get_current_stream()
            with stream:
                inputs = {f"arg{spec.pos}": cp.ascontiguousarray(cp.asarray(a)) for spec, a in zip(plan.args, arrays)}

                def launch(program: template.Program, step: template.Launch, buffers: dict) -> None:
                    kernel = _module(program, device).get_function(step.kernel)
                    if step.shared_bytes > template.SHARED_DEFAULT:
                        kernel.max_dynamic_shared_size_bytes = step.shared_bytes
                    kernel(step.grid, (step.block,), tuple(_argument(a, buffers) for a in step.args),
                           shared_mem=step.shared_bytes)

                limit = _shared_limit(self.device_id)
                results = template.execute(plan, dtype, inputs, rows, cols, _sm_count(self.device_id), final,
                                           allocate=cp.empty, launch=launch,
                                           programs=lambda *key: _program(*key, shared_limit=limit))
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
