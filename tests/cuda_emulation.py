"""Run the CUDA backend's generated kernels on the CPU, so CI checks what they compute without a GPU.

The generated module is compiled as C++ by the system compiler with a small header that stands in for the CUDA
execution model. It is stricter than a GPU where a CPU can be, so that what a GPU might forgive by luck fails here:

- each block runs as `blockDim.x` POSIX threads that take turns: one runs at a time until it reaches a barrier
  (`__syncthreads`), so a missing barrier lets one thread race through data the others have not staged yet, every
  time (not once in a while, as on a GPU);
- blocks run in a random order (seeded: `KRED_EMULATION_SEED`, reported on failure), two at a time, each with its
  own shared memory, freshly poisoned (every byte 0xFF: NaN as a float, -1 as an integer), so a tile read before it
  is written, or a value kept from another block, shows up as NaN;
- outputs and states are allocated uninitialised and poisoned the same way (as `cp.empty` leaves them: garbage);
- global arrays are guarded: every pointer parameter is a bounds-checked view of its buffer, and the first read or
  write outside one (a read past M, a write past N) fails the launch with the kernel, the array and the index;
- in fast-math modules (KRED_FAST_EXP), exp2 has the error ex2.approx.ftz documents (2^-22 relative, either sign,
  subnormal inputs and results flushed to 0).

The launch schedule is the backend's own (`engine.backends.cuda.execute`), so tiling, the 2D split and its merge
kernel, block sums, chunked large dimensions and float16 conversions all run as they do on a GPU; what it cannot
emulate is NVIDIA's math library beyond exp2 (expf, ... are the C library's), FMA contraction and the hardware's own
timing.

This is a test tool: it is slow (one OS thread per CUDA thread), so tests keep sizes small.
"""
from __future__ import annotations

import ctypes
import os
import re

import numpy as np
import pytest
from kred.engine.backends import cache
from kred.engine.backends import cuda as runtime
from kred.engine.codegen import cuda as template

HEADER = r"""
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define KRED_EMULATION 1
struct kred_dim3 { unsigned x, y, z; };
/* One block: its shared memory and the turn-taking of its threads (one runs at a time, between barriers). */
struct kred_block { pthread_mutex_t run; pthread_cond_t wake; unsigned arrived, generation, size; unsigned char* shared; };
static thread_local kred_dim3 threadIdx, blockIdx;
static thread_local kred_block* kred_current;
static kred_dim3 blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __syncthreads() kred_sync()
#define KRED_SHARED_MEMORY(name) unsigned char* const name = kred_current->shared
static void kred_sync() {
    kred_block* b = kred_current;
    unsigned generation = b->generation;
    if (++b->arrived == b->size) { b->arrived = 0; b->generation++; pthread_cond_broadcast(&b->wake); return; }
    while (b->generation == generation) pthread_cond_wait(&b->wake, &b->run);    /* gives the turn away */
}
template <class T> static inline T __ldg(const T* p) { return *p; }
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }

/* Guarded global memory: the first access outside a buffer is recorded (and served from a poisoned dummy). */
static int kred_violations = 0;      /* (no C++ library: the module is linked as C) */
static char kred_violation[256];
template <class T> struct kred_checked {
    T* data; long long size; const char* name;
    T& operator[](long long k) const {
        if (k < 0 || k >= size) {
            if (__atomic_fetch_add(&kred_violations, 1, __ATOMIC_SEQ_CST) == 0)
                snprintf(kred_violation, sizeof kred_violation, "%s[%lld] outside its %lld elements", name, k, size);
            static thread_local unsigned char dummy[16];
            memset(dummy, 0xFF, sizeof dummy);
            return *(T*)dummy;
        }
        return data[k];
    }
};
extern "C" const char* kred_emulation_violation() {
    return __atomic_load_n(&kred_violations, __ATOMIC_SEQ_CST) ? kred_violation : 0;
}
extern "C" void kred_emulation_reset() { __atomic_store_n(&kred_violations, 0, __ATOMIC_SEQ_CST); }

/* ex2.approx.ftz.f32 at its documented worst: 2^-22 relative error (the sign from the input's bits), FTZ. */
static inline float kred_ex2_approx_ftz(float x) {
    if (fabsf(x) < 1.17549435e-38f) x = 0.0f;
    unsigned bits; memcpy(&bits, &x, 4);
    double y = exp2((double)x) * (1.0 + ((bits * 2654435761u) >> 31 ? 1.0 : -1.0) * 0x1p-22);
    float r = (float)y;
    return fabsf(r) < 1.17549435e-38f ? 0.0f : r;
}

template <class F> struct kred_thread { F* body; kred_block* block; unsigned t, bx, by; };
template <class F> static void* kred_thread_main(void* p) {
    kred_thread<F>* a = (kred_thread<F>*)p;
    threadIdx = {a->t, 0, 0};
    blockIdx = {a->bx, a->by, 0};
    kred_current = a->block;
    pthread_mutex_lock(&a->block->run);
    (*a->body)();
    pthread_mutex_unlock(&a->block->run);
    return 0;
}
/* Every block of the grid, in a random order (`seed`), `KRED_CONCURRENT` at a time. */
#define KRED_CONCURRENT 2
template <class F> static void kred_launch(unsigned gx, unsigned gy, unsigned block, size_t shared, unsigned seed,
                                           F body) {
    size_t blocks_in_grid = (size_t)gx * gy;
    unsigned* order = (unsigned*)malloc(2 * blocks_in_grid * sizeof(unsigned));
    for (size_t k = 0; k < blocks_in_grid; k++) { order[2 * k] = k % gx; order[2 * k + 1] = k / gx; }
    unsigned long long state = seed * 6364136223846793005ull + 1442695040888963407ull;
    for (size_t k = blocks_in_grid; k > 1; k--) {           /* Fisher-Yates with a 64-bit LCG */
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        size_t other = (state >> 33) % k;
        unsigned x = order[2 * (k - 1)], y = order[2 * (k - 1) + 1];
        order[2 * (k - 1)] = order[2 * other]; order[2 * (k - 1) + 1] = order[2 * other + 1];
        order[2 * other] = x; order[2 * other + 1] = y;
    }
    blockDim = {block, 1, 1};
    pthread_t* threads = (pthread_t*)malloc(KRED_CONCURRENT * block * sizeof(pthread_t));
    kred_thread<F>* args = (kred_thread<F>*)malloc(KRED_CONCURRENT * block * sizeof(kred_thread<F>));
    kred_block blocks[KRED_CONCURRENT];
    for (size_t first = 0; first < blocks_in_grid; first += KRED_CONCURRENT) {
        size_t count = blocks_in_grid - first < KRED_CONCURRENT ? blocks_in_grid - first : KRED_CONCURRENT;
        for (size_t b = 0; b < count; b++) {
            pthread_mutex_init(&blocks[b].run, 0);
            pthread_cond_init(&blocks[b].wake, 0);
            blocks[b].arrived = blocks[b].generation = 0;
            blocks[b].size = block;
            blocks[b].shared = (unsigned char*)malloc(shared + 16);
            memset(blocks[b].shared, 0xFF, shared + 16);        /* poisoned: NaN, -1 */
            for (unsigned t = 0; t < block; t++) {
                args[b * block + t] = {&body, &blocks[b], t, order[2 * (first + b)], order[2 * (first + b) + 1]};
                pthread_create(&threads[b * block + t], 0, kred_thread_main<F>, &args[b * block + t]);
            }
        }
        for (size_t k = 0; k < count * block; k++) pthread_join(threads[k], 0);
        for (size_t b = 0; b < count; b++) {
            free(blocks[b].shared);
            pthread_mutex_destroy(&blocks[b].run);
            pthread_cond_destroy(&blocks[b].wake);
        }
    }
    free(order); free(threads); free(args);
}
"""

FLAGS = ("-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-x", "c++", "-w")
_POINTER = re.compile(r"(const )?(\w+(?: \w+)?)\* __restrict__ (\w+)")
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(\n(.*?)\)\n\{', re.DOTALL)


def _seed() -> int:
    return int(os.environ.get("KRED_EMULATION_SEED", "0")) or int(np.random.default_rng().integers(1, 2 ** 31))


def _wrapper(name: str, params: list[str]) -> str:
    """`emulate_<name>(gx, gy, block, shared, seed, args, sizes)`: args[k] is a pointer to scalar k, or buffer k's
    address, and sizes[k] buffer k's number of elements."""
    unpacked = []
    for k, param in enumerate(params):
        pointer = _POINTER.fullmatch(param)
        if pointer:
            const, ctype, arg = pointer.groups()
            unpacked.append(f'kred_checked<{const or ""}{ctype}>{{({const or ""}{ctype}*)args[{k}], sizes[{k}], '
                            f'"{arg}"}}')
        else:
            declared = re.sub(r"\b(\w+)$", "", param).strip()           # the type: drop the parameter's name
            unpacked.append(f"*({declared.replace('const ', '')}*)args[{k}]")
    call = f"{name}({', '.join(unpacked)})"
    return (f'extern "C" void emulate_{name}(unsigned gx, unsigned gy, unsigned block, size_t shared, unsigned seed, '
            f"void** args, const long long* sizes) {{ kred_launch(gx, gy, block, shared, seed, [&] {{ {call}; }}); }}\n")


def _emulated(source: str) -> str:
    """The module's source as the emulation compiles it: pointer parameters bounds-checked, and under KRED_FAST_EXP
    exp2 as ex2.approx.ftz."""
    source = _KERNEL.sub(lambda m: m.group(0).replace(m.group(2), _POINTER.sub(r"kred_checked<\1\2> \3", m.group(2))),
                         source)
    source = source.replace("#define KRED_FAST_EXP 1", "#define KRED_FAST_EXP 1\n#define exp2f kred_ex2_approx_ftz")
    return source


def _module(source: str) -> ctypes.CDLL:
    """The emulated module of a generated source, its kernels' parameters read back from the source."""
    signatures = {name: [p.strip() for p in params.split(",\n")] for name, params in _KERNEL.findall(source)}
    text = HEADER + _emulated(source) + "\n" + "".join(_wrapper(n, p) for n, p in signatures.items())
    return cache.load(text, FLAGS)


def poisoned(shape, dtype) -> np.ndarray:
    """An uninitialised array as a GPU allocator leaves it, made reproducibly bad: every byte 0xFF."""
    array = np.empty(shape, dtype)
    array.view(np.uint8).fill(0xFF)
    return array


def run_kernel(module: ctypes.CDLL, kernel: str, grid, block: int, shared: int, args: list) -> None:
    """Launch `kernel` of an emulated module on `args` (numpy arrays, or (ctype, value) scalars); fail on the first
    out-of-bounds access, naming it and the seed of the block order."""
    keep, pointers, sizes = [], [], []
    for arg in args:
        if isinstance(arg, np.ndarray):
            pointers.append(arg.ctypes.data if arg.size else 0)
            sizes.append(arg.size)
        else:
            ctype, value = arg
            scalar = ctype(value)
            keep.append(scalar)
            pointers.append(ctypes.addressof(scalar))
            sizes.append(0)
    argv = (ctypes.c_void_p * len(pointers))(*pointers)
    sizev = (ctypes.c_longlong * len(sizes))(*sizes)
    seed = _seed()
    module.kred_emulation_reset()
    getattr(module, f"emulate_{kernel}")(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block),
                                         ctypes.c_size_t(shared), ctypes.c_uint(seed), argv, sizev)
    module.kred_emulation_violation.restype = ctypes.c_char_p
    violation = module.kred_emulation_violation()
    if violation:
        raise AssertionError(f"{kernel} accessed {violation.decode()} (KRED_EMULATION_SEED={seed})")


def load(program: template.Program) -> ctypes.CDLL:
    """The emulated module (built once per source through the kernel cache)."""
    return _module(program.source)


def execute(plan, arrays: list[np.ndarray], rows, cols, final: bool, splits: int | None = None, grid=None,
            mutate=None):
    """What the CUDA backend computes for `plan` on `arrays` (as given by Plan.check_args): the finalized outputs
    (`final`) or the state slots, as numpy arrays. `splits` forces the 2D scheme's number of column spans; with `grid`
    (engine.grid, rows = grid.rows), the block-sparse kernel reduces the grid's rows in one launch. `mutate` (source
    -> source) plants a bug in the generated module, for the tests of the emulation's guards."""
    dtype = arrays[0].dtype
    inputs = {f"arg{spec.pos}": np.ascontiguousarray(a) for spec, a in zip(plan.args, arrays)}

    def launch(program: template.Program, step: runtime.Launch, buffers: dict) -> None:
        args = [buffers[value] if kind == "buffer" else (ctypes.c_longlong if kind == "int64" else ctypes.c_int,
                                                          value) for kind, value in step.args]
        module = _module(mutate(program.source) if mutate else program.source)
        run_kernel(module, step.kernel, step.grid, step.block, step.shared_bytes, args)

    return runtime.execute(plan, dtype, inputs, rows, cols, sm_count=1, final=final, allocate=poisoned,
                           launch=launch, splits=splits, grid=grid)


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
        self.asarray, self.ascontiguousarray, self.empty = np.asarray, np.ascontiguousarray, poisoned
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
        self.module.launches.append((self.name, tuple(grid), tuple(block), shared_mem,
                                     self.max_dynamic_shared_size_bytes))
        args = [arg if isinstance(arg, np.ndarray) else (ctypes.c_longlong if arg.dtype == np.int64 else ctypes.c_int,
                                                         int(arg)) for arg in args]
        run_kernel(_module(self.module.source), self.name, grid, block[0], shared_mem, args)


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
