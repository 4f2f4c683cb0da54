"""The CUDA backend on a real GPU (every test is marked `gpu`: it runs whenever a GPU is visible, and is skipped only
when none is). The shared suites (tests/test_ops.py, tests/test_reductions.py, ...) already run over "cuda" through
the `backend` fixture; this file covers what is specific to GPUs, always against dense float64 numpy or torch
autograd written here: GPU-resident inputs without copies, the caller's stream, device_id, float16, the 2D scheme,
chunked large dimensions, large states, partial states, autograd on the device, fork safety and the kernel cache.

float16 tolerance: inputs are rounded to float16 (relative error 2^-11 ~ 4.9e-4), the formula runs in float32 and
the result is rounded to float16 again; for the Gaussian sums below that bounds the error by 1e-2 of the largest
output (|x - y|^2 up to ~20 amplifies the input rounding by up to ~40x in the worst pair).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import float_rtol

pytestmark = pytest.mark.gpu

GAUSSIAN = ("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"])


@pytest.fixture(scope="module")
def cp():
    import cupy             # with a GPU visible, CuPy is required: a missing one fails here rather than skipping
    return cupy


@pytest.fixture(scope="module")
def torch_cuda():
    import torch
    assert torch.cuda.is_available(), "a GPU is visible but torch has no CUDA: install a CUDA build of torch"
    return torch


def gaussian_dense(x, y, b):
    x, y, b = (np.asarray(a, np.float64) for a in (x, y, b))
    return np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b


def data(rng, n, m, dtype=np.float32):
    return (rng.standard_normal((n, 3)).astype(dtype), rng.standard_normal((m, 3)).astype(dtype),
            rng.standard_normal((m, 2)).astype(dtype))


def genred(formula=GAUSSIAN[0], aliases=GAUSSIAN[1], **kw):
    from kred.engine.numpy import Genred
    return Genred(formula, aliases, axis=kw.pop("axis", 1), **kw)


FAST = float_rtol("cuda", np.float32)      # the float32 fast path's documented bound (engine/codegen/affine.py)


def close(got, want, rtol):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_auto_prefers_cuda_and_numpy_round_trips():
    from kred.engine.backends import auto_choice
    assert auto_choice() == "cuda"
    x, y, b = data(np.random.default_rng(0), 500, 700)
    got = genred()(x, y, b)                      # backend="auto"
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    close(got, gaussian_dense(x, y, b), FAST)


def test_cupy_arrays_stay_on_the_gpu(cp):
    x, y, b = data(np.random.default_rng(1), 300, 900)
    got = genred()(*(cp.asarray(a) for a in (x, y, b)))
    assert isinstance(got, cp.ndarray)
    close(got.get(), gaussian_dense(x, y, b), FAST)


def test_torch_cuda_tensors_are_read_in_place(cp, torch_cuda):
    torch = torch_cuda
    from kred.engine.backends import get_backend
    x = torch.randn(400, 3, device="cuda")
    plan = genred("SqNorm2(x - y)", ["x = Vi(3)", "y = Vj(3)"]).plan
    engine = get_backend("cuda").bind([x, x])
    arrays, *_ = plan.check_args([x, x], xp=engine.xp, dtypes=engine.dtypes)
    assert arrays[0].data.ptr == x.data_ptr()                  # the same memory: no copy
    from kred.engine.torch import Genred
    y, b = torch.randn(800, 3, device="cuda"), torch.randn(800, 2, device="cuda")
    out = Genred(*GAUSSIAN, axis=1)(x, y, b)
    assert out.is_cuda and out.dtype == torch.float32 and out.device == x.device
    close(out.cpu().numpy(), gaussian_dense(x.cpu(), y.cpu(), b.cpu()), FAST)


def test_launches_on_the_callers_torch_stream(torch_cuda):
    """Inputs written on a side stream are read by the reduction on that stream, without synchronising first."""
    torch = torch_cuda
    from kred.engine.torch import Genred
    op = Genred(*GAUSSIAN, axis=1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(20_000, 3, device="cuda")
        y = torch.randn(20_000, 3, device="cuda") * 0.5
        b = torch.ones(20_000, 2, device="cuda").cumsum(0)        # a few kernels on the side stream
        out = op(x, y, b)
    stream.synchronize()
    close(out.cpu().numpy(), gaussian_dense(x.cpu(), y.cpu(), b.cpu()), FAST)


def test_launches_on_the_current_cupy_stream(cp):
    x, y, b = data(np.random.default_rng(2), 200, 5000)
    with cp.cuda.Stream(non_blocking=True) as stream:
        args = [cp.asarray(a) for a in (x, y, b)]
        got = genred()(*args)
        stream.synchronize()
    close(got.get(), gaussian_dense(x, y, b), FAST)


def test_device_id(cp):
    from kred.engine.errors import ArgumentError
    x, y, b = data(np.random.default_rng(3), 100, 100)
    count = cp.cuda.runtime.getDeviceCount()
    last = count - 1
    got = genred()(x, y, b, device_id=last, backend="cuda")
    close(got, gaussian_dense(x, y, b), FAST)
    with cp.cuda.Device(last):
        on_last = [cp.asarray(a) for a in (x, y, b)]
    got = genred()(*on_last)
    assert got.device.id == last
    with pytest.raises(ArgumentError, match="device_id"):
        genred()(x, y, b, device_id=count, backend="cuda")
    if count > 1:
        with pytest.raises(ArgumentError, match="GPU"):
            genred()(*on_last, device_id=0)


@pytest.mark.parametrize("shape", [(1, 100_000), (64, 50_000), (3000, 3000)], ids=["2D-N1", "2D-N64", "1D"])
def test_schemes_against_dense(shape):
    n, m = shape
    x, y, b = data(np.random.default_rng(4), n, m)
    close(genred()(x, y, b, backend="cuda"), gaussian_dense(x, y, b), FAST)


def test_float16(cp):
    x, y, b = data(np.random.default_rng(5), 2000, 3000, np.float16)
    got = genred()(*(cp.asarray(a) for a in (x, y, b)))
    assert got.dtype == np.float16
    close(got.get(), gaussian_dense(x, y, b), 1e-2)
    got = genred()(x, y, b, backend="cuda")                       # numpy float16 too
    assert got.dtype == np.float16
    close(got, gaussian_dense(x, y, b), 1e-2)


def sqdist64(x, y):
    """Squared distances in float64 without the (N, M, D) difference array: cancellation of |x|^2 + |y|^2 - 2 x.y
    in float64 is ~1e-16 * 4D, far below the gaps between neighbours of random data."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x ** 2).sum(1)[:, None] + (y ** 2).sum(1)[None] - 2 * x @ y.T


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dim", [100, 257, 1000, 4096])
def test_large_dimension_nearest_neighbours(dim, dtype):
    """Chunked j-tiles: any D within the device's shared memory. float64: indices exact; float32: the distances."""
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((700, dim)).astype(dtype), rng.standard_normal((3000, dim)).astype(dtype)
    d2 = sqdist64(x, y)
    order = np.argsort(d2, axis=1, kind="stable")[:, :10]
    op = genred("SqDist(x, y)", [f"x = Vi({dim})", f"y = Vj({dim})"], reduction_op="KMin_ArgKMin", opt_arg=10)
    values, index = op(x, y, backend="cuda")
    close(values, np.take_along_axis(d2, order, 1), 1e-12 if dtype == np.float64 else 5e-5)   # float32: ~sqrt(D) eps
    if dtype == np.float64:
        np.testing.assert_array_equal(index, order)


def test_wide_tile_opts_in_above_48_kib():
    """SqNorm2(y) reads y (D = 500, float32) outside the chunked SqDist: 64 KB of staged tile per block of 32, so
    the launch opts in to more than 48 KiB of shared memory (sm_80+)."""
    from kred.engine.backends import cuda
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((900, 500)).astype(np.float32), rng.standard_normal((2000, 500)).astype(np.float32)
    op = genred("Exp(-SqDist(x, y) / 500) * SqNorm2(y)", ["x = Vi(500)", "y = Vj(500)"])
    program = cuda.template.build(op.plan, np.float32, op.plan.acc_dtype(np.float32), cuda._shared_limit(0))
    assert program.shared_bytes > 48 * 1024
    want = np.exp(-sqdist64(x, y) / 500) @ (y.astype(np.float64) ** 2).sum(1, keepdims=True)
    close(op(x, y, backend="cuda"), want, 1e-4)


def test_large_output_dimension():
    rng = np.random.default_rng(7)
    x, y, v = rng.standard_normal((700, 3)), rng.standard_normal((900, 3)), rng.standard_normal((900, 150))
    op = genred("Exp(-SqDist(x, y)) * v", ["x = Vi(3)", "y = Vj(3)", "v = Vj(150)"])
    close(op(x, y, v, backend="cuda"), gaussian_dense(x, y, v), 1e-10)
    op = genred("-SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)", "v = Vj(150)"], reduction_op="SumSoftMaxWeight",
                formula2="v")
    f = -((x[:, None] - y[None]) ** 2).sum(-1)
    e = np.exp(f - f.max(1, keepdims=True))
    close(op(x, y, v, backend="cuda"), e @ v / e.sum(1, keepdims=True), 1e-10)


def test_partial_states_merge_with_the_reference():
    """`partial` (what the cluster and block-sparse ranges call) returns the reduction's numpy state layout."""
    from kred.engine.backends import get_backend
    from kred.engine.reductions import merge_all
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((300, 2)), rng.standard_normal((5000, 2))
    op = genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op="KMin_ArgKMin", opt_arg=4)
    arrays, dtype, n, m = op.plan.check_args([x, y])
    cuda, reference = get_backend("cuda"), get_backend("reference")
    parts = [cuda.partial(op.plan, arrays, (0, n), (0, 2000)), reference.partial(op.plan, arrays, (0, n), (2000, 3000)),
             cuda.partial(op.plan, arrays, (0, n), (3000, m))]
    for part, like in zip(parts[0], reference.partial(op.plan, arrays, (0, n), (0, 1))):
        assert isinstance(part, np.ndarray) and part.dtype == like.dtype and part.shape[1:] == like.shape[1:]
    values, index = op.plan.reduction.finalize(merge_all(op.plan.reduction, parts), dtype)
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(index, order)
    close(values, np.take_along_axis(d2, order, 1), 1e-12)


def test_torch_forward_and_backward_on_the_gpu(torch_cuda):
    torch = torch_cuda
    from kred.engine.torch import Genred
    x = torch.randn(800, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    y = torch.randn(1200, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(1200, 2, device="cuda", dtype=torch.float64, requires_grad=True)
    g = torch.randn(800, 2, device="cuda", dtype=torch.float64)
    out = Genred(*GAUSSIAN, axis=1)(x, y, b)
    grads = torch.autograd.grad((out * g).sum(), (x, y, b))
    dense = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b
    want = torch.autograd.grad((dense * g).sum(), (x, y, b))
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    for got, expected in zip(grads, want):
        assert got.is_cuda
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_forked_children_use_the_gpu(tmp_path):
    """The parent imports the engine and resolves backend="auto" (NVML only) before forking: children still
    initialise CUDA themselves and compute."""
    code = """
import multiprocessing as mp, numpy as np, engine, engine.numpy
from kred.engine.backends import auto_choice
assert auto_choice() == "cuda"
def child(q):
    x = np.ones((10, 1), np.float32)
    q.put(float(engine.numpy.Genred("x * y", ["x = Vi(1)", "y = Vj(1)"], axis=1)(x, x, backend="cuda")[0, 0]))
if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start(); p.join(120)
    assert p.exitcode == 0 and q.get(timeout=5) == 10.0
"""
    script = tmp_path / "fork_child.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], check=True, timeout=300,
                   env={**os.environ, "KRED_CACHE_DIR": str(tmp_path / "cache")})


def test_cubins_are_cached_on_disk(tmp_path):
    code = """
import numpy as np, engine.numpy
x = np.ones((10, 1), np.float32)
print(engine.numpy.Genred("Exp(x * y)", ["x = Vi(1)", "y = Vj(1)"], axis=1)(x, x, backend="cuda")[0, 0])
"""
    env = {**os.environ, "KRED_CACHE_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)
    assert len(list((tmp_path / "cuda").glob("*.cubin"))) >= 1


def test_ranges_run_as_one_grid_launch_against_dense(cp):
    """A block-sparse Gaussian sum and Min_ArgMin on the GPU (kred_grid_* kernels) equal dense float64 numpy
    restricted to the kept blocks."""
    from kred.engine.numpy import Genred

    rng = np.random.default_rng(3)
    x, y, b = rng.standard_normal((700, 3)), rng.standard_normal((900, 3)), rng.standard_normal((900, 2))
    kept = {(0, 300): [(0, 100), (400, 900)], (300, 650): [(50, 350)], (650, 700): []}
    ranges = (np.array(list(kept)), np.cumsum([len(c) for c in kept.values()]),
              np.array([c for cols in kept.values() for c in cols]).reshape(-1, 2),
              np.array([[0, 900]]), np.array([1]), np.array([[0, 700]]))
    mask = np.zeros((700, 900), bool)
    for (r0, r1), cols in kept.items():
        for c0, c1 in cols:
            mask[r0:r1, c0:c1] = True
    d = ((x[:, None] - y[None]) ** 2).sum(-1)
    got = Genred(*GAUSSIAN, axis=1)(x, y, b, backend="cuda", ranges=ranges)
    np.testing.assert_allclose(got, np.where(mask, np.exp(-d), 0) @ b, rtol=1e-10, atol=1e-12)
    value, index = Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], "Min_ArgMin", axis=1)(
        x, y, backend="cuda", ranges=ranges)
    masked = np.where(mask, d, np.inf)
    np.testing.assert_allclose(value[:, 0], masked.min(1), rtol=1e-12)
    np.testing.assert_array_equal(index[:650, 0], masked[:650].argmin(1))
    assert (index[650:, 0] == -1).all()
