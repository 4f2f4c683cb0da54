"""The CUDA kernels' launch plans and source (issue 22 rows 4 and 6), and a chunked large-D run in the emulation.

No GPU needed: the generated module is inspected as the backend builds it (engine/codegen/cuda.py), and run by
tests/cuda_emulation.py against dense float64 numpy.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from kred.engine.codegen import cuda as template
from kred.engine.numpy import Genred

SM90_SHARED = 227 * 1024        # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90


def gaussian(dim: int, reduction: str = "Sum", **options) -> Genred:
    return Genred(f"Exp(-SqDist(x, y) / {dim}) * b", [f"x = Vi({dim})", f"y = Vj({dim})", "b = Vj(1)"], reduction, 1,
                  **options)


@pytest.mark.parametrize("dim", [200, 1000])
def test_chunked_kernels_stage_only_what_the_chunk_reads(dim):
    """Row 4: y is read only inside the chunked SqDist, so it is staged chunk by chunk, never whole: blocks of >= 128
    threads within 100 KB of shared memory in float32 (was: block 32 and 136,704 B at D = 1000)."""
    program = template.build(gaussian(dim).plan, np.float32, np.float64, shared_limit=SM90_SHARED)
    assert program.chunked
    assert program.block >= 128 and program.shared_bytes <= 100_000, (program.block, program.shared_bytes)
    assert program.column_bytes == 4            # the staged tile holds b alone


@pytest.mark.parametrize("emulated_gpu", [SM90_SHARED], indirect=True)
def test_chunked_kernel_with_a_large_block_matches_dense(emulated_gpu):
    """The D = 200 Gaussian sum through the CUDA runtime at its sm_90 launch plan (128 threads, opted in above
    48 KiB), against float64."""
    rng = np.random.default_rng(5)
    dim = 200
    x, y = rng.standard_normal((150, dim)).astype(np.float32), rng.standard_normal((300, dim)).astype(np.float32)
    b = rng.standard_normal((300, 1)).astype(np.float32)
    got = gaussian(dim)(x, y, b, backend="cuda")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = np.exp(-((x64[:, None] - y64[None]) ** 2).sum(-1) / dim) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    (_, _, block, shared, opted_in), *_ = emulated_gpu.launches
    assert block == (128,) and 48 * 1024 < shared <= 100_000 and opted_in == shared


def _kernels(source: str):
    kernel = r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?\w+\(\n(.*?)\)\n\{(.*?)\n\}\n'
    for params, body in re.findall(kernel, source, re.DOTALL):
        names = {re.sub(r"\[.*", "", p.split()[-1]) for p in params.split(",\n")}
        yield names, body


@pytest.mark.parametrize("dim", [3, 200])
def test_no_local_shadows_a_kernel_parameter(dim):
    """Row 6: no local declaration reuses a parameter's name (the chunk registers were `c{pos}`, hiding c0, c1)."""
    source = template.build(gaussian(dim).plan, np.float32, np.float64).source
    declared = re.compile(r"^\s*(?:const\s+)?(?:kred_\w+|float|double|int|long long|unsigned)\s+(\w+)\s*[\[=;]", re.MULTILINE)
    kernels = list(_kernels(source))
    assert len(kernels) == len(template.KERNELS)
    for params, body in kernels:
        assert {"rows", "splits"} <= params or {"r0", "c0", "c1"} <= params
        assert not params & set(declared.findall(body)), params & set(declared.findall(body))


def test_grid_kernel_indexes_units_in_64_bits():
    """Row 6: block u reads units[4u ..]: 4 * blockIdx.x in 32 bits wraps from 2^30 units."""
    source = template.build(gaussian(3).plan, np.float32, np.float64).source
    grid = source[source.index("kred_grid_final("):]
    indexing = re.findall(r"\[([^\]]*blockIdx[^\]]*)\]", grid) + re.findall(r"=\s*([^;]*blockIdx\.x[^;]*);", grid)
    assert indexing and all("(long long)blockIdx" in expression for expression in indexing), indexing
