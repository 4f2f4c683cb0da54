"""Run the CUDA backend's generated kernels on the CPU, so CI checks what they compute without a GPU.

The generated module is compiled as C++ by the system compiler with a small header that stands in for the CUDA
execution model: each block runs as `blockDim.x` POSIX threads sharing one buffer (the block's shared memory) and
one barrier (`__syncthreads`); blocks run one after another. A wrapper per kernel unpacks the launch arguments.
The launch schedule is the backend's own (`engine.backends.cuda.execute`), so tiling, the 2D split and its merge
kernel, block sums, chunked large dimensions and float16 conversions all run as they do on a GPU — only the NVIDIA
math library (expf, ...) is replaced by the C library's.

This is a test tool: it is slow (one OS thread per CUDA thread), so tests keep sizes small.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from kred.engine.backends import cache
from kred.engine.backends import cuda as runtime
from kred.engine.codegen import cuda as template

HEADER = r"""
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#define KRED_EMULATION 1
struct kred_dim3 { unsigned x, y, z; };
static thread_local kred_dim3 threadIdx, blockIdx;
static kred_dim3 blockDim;
static unsigned char* kred_emulated_shared;
static pthread_barrier_t kred_barrier;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __syncthreads() pthread_barrier_wait(&kred_barrier)
#define KRED_SHARED_MEMORY(name) unsigned char* const name = kred_emulated_shared
template <class T> static inline T __ldg(const T* p) { return *p; }
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }

/* Run `body()` on every thread of every block, block after block (blocks share nothing but global memory). */
template <class F> struct kred_thread { F* body; unsigned t, bx, by; };
template <class F> static void* kred_thread_main(void* p) {
    kred_thread<F>* a = (kred_thread<F>*)p;
    threadIdx = {a->t, 0, 0};
    blockIdx = {a->bx, a->by, 0};
    (*a->body)();
    return 0;
}
template <class F> static void kred_launch(unsigned gx, unsigned gy, unsigned block, size_t shared, F body) {
    double* memory = (double*)calloc(shared / sizeof(double) + 2, sizeof(double));
    pthread_t* threads = (pthread_t*)malloc(block * sizeof(pthread_t));
    kred_thread<F>* args = (kred_thread<F>*)malloc(block * sizeof(kred_thread<F>));
    kred_emulated_shared = (unsigned char*)memory;
    blockDim = {block, 1, 1};
    for (unsigned by = 0; by < gy; by++)
        for (unsigned bx = 0; bx < gx; bx++) {
            pthread_barrier_init(&kred_barrier, 0, block);
            for (unsigned t = 0; t < block; t++) {
                args[t] = {&body, t, bx, by};
                pthread_create(&threads[t], 0, kred_thread_main<F>, &args[t]);
            }
            for (unsigned t = 0; t < block; t++) pthread_join(threads[t], 0);
            pthread_barrier_destroy(&kred_barrier);
        }
    free(args); free(threads); free(memory);
}
"""

FLAGS = ("-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-x", "c++", "-w")


def _wrapper(name: str, params: list[str]) -> str:
    """`emulate_<name>(gx, gy, block, shared, args)`: args[k] is a pointer to scalar k, or buffer k's address."""
    unpacked = []
    for k, param in enumerate(params):
        declared = re.sub(r"\b(\w+)$", "", param).strip()           # the type: drop the parameter's name
        if "*" in declared:
            unpacked.append(f"({declared.replace('__restrict__', '')})args[{k}]")
        else:
            unpacked.append(f"*({declared.replace('const ', '')}*)args[{k}]")
    call = f"{name}({', '.join(unpacked)})"
    return (f'extern "C" void emulate_{name}(unsigned gx, unsigned gy, unsigned block, size_t shared, void** args)'
            f" {{ kred_launch(gx, gy, block, shared, [&] {{ {call}; }}); }}\n")


def load(program: template.Program) -> ctypes.CDLL:
    """The emulated module (built once per source through the kernel cache)."""
    source = HEADER + program.source + "\n" + "".join(_wrapper(n, p) for n, p in program.signatures.items())
    return cache.load(source.replace("__restrict__", "__restrict"), FLAGS)


def execute(plan, arrays: list[np.ndarray], rows, cols, final: bool, splits: int | None = None, grid=None):
    """What the CUDA backend computes for `plan` on `arrays` (as given by Plan.check_args): the finalized outputs
    (`final`) or the state slots, as numpy arrays. `splits` forces the 2D scheme's number of column spans; with `grid`
    (engine.grid, rows = grid.rows), the block-sparse kernel reduces the grid's rows in one launch."""
    dtype = arrays[0].dtype
    inputs = {f"arg{spec.pos}": np.ascontiguousarray(a) for spec, a in zip(plan.args, arrays)}

    def launch(program: template.Program, step: runtime.Launch, buffers: dict) -> None:
        keep, pointers = [], []
        for kind, value in step.args:
            if kind == "buffer":
                array = buffers[value]
                pointers.append(array.ctypes.data if array.size else 0)
            else:
                scalar = (ctypes.c_longlong if kind == "int64" else ctypes.c_int)(value)
                keep.append(scalar)
                pointers.append(ctypes.addressof(scalar))
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        getattr(load(program), f"emulate_{step.kernel}")(
            ctypes.c_uint(step.grid[0]), ctypes.c_uint(step.grid[1]), ctypes.c_uint(step.block),
            ctypes.c_size_t(step.shared_bytes), argv)

    return runtime.execute(plan, dtype, inputs, rows, cols, sm_count=1, final=final,
                            allocate=lambda shape, dt: np.zeros(shape, dt), launch=launch, splits=splits, grid=grid)


# A stand-in for CuPy, so that the CUDA runtime (engine/backends/cuda.py) runs end to end on the CPU ---------------

class FakeCupy:
    """Just enough of CuPy for engine.backends.cuda: "device" arrays are numpy arrays, the one "device" reports
    compute capability 9.0, `sm_count` multiprocessors and `shared_limit` bytes of opt-in shared memory per block,
    and `RawModule(path=cubin)` — the cubin NVRTC really built — runs the kernels of the source cached next to it
    through the emulation above. A launch is refused as CUDA refuses it: more than 48 KiB of dynamic shared memory
    without the kernel's opt-in attribute, or more than the device has."""

    def __init__(self, sm_count: int = 4, shared_limit: int = 48 * 1024):
        import contextlib
        import types

        self.launches: list[tuple] = []
        self.copies: list[object] = []          # the stream each copy to the host was ordered on
        self.stream = contextlib.nullcontext()

        def asnumpy(array, stream=None):
            self.copies.append(stream)
            return np.asarray(array)

        self.asnumpy = asnumpy
        self.asarray, self.ascontiguousarray, self.empty = np.asarray, np.ascontiguousarray, np.empty
        self.ndarray = np.ndarray
        attributes = {97: shared_limit}       # cudaDevAttrMaxSharedMemoryPerBlockOptin
        runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1,
                                        getDeviceProperties=lambda device: {"multiProcessorCount": sm_count},
                                        deviceGetAttribute=lambda attribute, device: attributes[attribute])
        device = types.SimpleNamespace(id=0, compute_capability="90")
        self.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda index: contextlib.nullcontext(device),
                                          get_current_stream=lambda: self.stream)
        self.RawModule = lambda path: _FakeModule(path, self.launches, shared_limit)


class _FakeModule:
    def __init__(self, path, launches, shared_limit):
        self.shared_limit = shared_limit
        from pathlib import Path
        path = Path(path)
        assert path.suffix == ".cubin" and path.stat().st_size > 0
        self.source = (path.parent / (path.name.split(".")[0] + ".cu")).read_text()
        self.launches = launches

    def get_function(self, name):
        return _FakeKernel(self, name)


class _FakeKernel:
    max_dynamic_shared_size_bytes = 0

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, grid, block, args, shared_mem=0):
        if shared_mem > max(48 * 1024, self.max_dynamic_shared_size_bytes) or shared_mem > self.module.shared_limit:
            raise RuntimeError(f"cudaErrorInvalidValue: {shared_mem} bytes of dynamic shared memory (opted in: "
                               f"{self.max_dynamic_shared_size_bytes}, device: {self.module.shared_limit})")
        keep, pointers = [], []
        for arg in args:
            if isinstance(arg, np.ndarray):
                pointers.append(arg.ctypes.data if arg.size else 0)
            else:
                scalar = (ctypes.c_longlong if arg.dtype == np.int64 else ctypes.c_int)(int(arg))
                keep.append(scalar)
                pointers.append(ctypes.addressof(scalar))
        self.module.launches.append((self.name, tuple(grid), tuple(block), shared_mem,
                                     self.max_dynamic_shared_size_bytes))
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        getattr(_load_source(self.module.source), f"emulate_{self.name}")(
            ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block[0]), ctypes.c_size_t(shared_mem), argv)


_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(\n(.*?)\)\n\{', re.S)


def _load_source(source: str) -> ctypes.CDLL:
    """The emulated module of a generated source, its kernels' parameters read back from the source."""
    signatures = {name: [p.strip() for p in params.split(",\n")] for name, params in _KERNEL.findall(source)}
    text = HEADER + source + "\n" + "".join(_wrapper(n, p) for n, p in signatures.items())
    return cache.load(text.replace("__restrict__", "__restrict"), FLAGS)


@pytest.fixture
def emulated_gpu(monkeypatch, tmp_path, request):
    """The CUDA runtime over the emulation; `@pytest.mark.parametrize("emulated_gpu", [bytes], indirect=True)` sets
    the device's opt-in shared memory (48 KiB by default)."""
    from kred.engine import backends
    from kred.engine.backends import cuda

    fake = FakeCupy(sm_count=4, shared_limit=getattr(request, "param", 48 * 1024))
    monkeypatch.setenv("KRED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda, "_cupy", lambda: fake)
    monkeypatch.setattr(cuda, "gpu_count", lambda: 1)
    monkeypatch.setattr(cuda, "_MODULES", cuda.cachetools.LRUCache(maxsize=4))
    monkeypatch.setattr(cuda, "_PROGRAMS", cuda.cachetools.LRUCache(maxsize=16))
    for cached in (cuda._sm_count, cuda._shared_limit, backends._instance):
        cached.cache_clear()
    yield fake
    for cached in (cuda._sm_count, cuda._shared_limit, backends._instance):
        cached.cache_clear()
