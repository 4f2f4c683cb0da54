"""The GPU check's first, bounded selection (benchmarks/gpu_check.py): one case per kernel family, dtype and scheme,
each against dense float64 numpy written here, run on the `cuda` backend. On a lent GPU these run before anything
else, so a short lease still answers whether every kernel computes the right thing; in CI the check's dry run runs
them through the CPU emulation (tests/cuda_emulation.py's FakeCupy). Sizes stay small: the emulation runs one OS
thread per CUDA thread."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import float_rtol
from kred.engine.numpy import Genred

pytestmark = pytest.mark.gpu

# (rows, columns): many row blocks and few columns (1D scheme), or few rows and many columns (2D split + merge)
SHAPES = {"1D": (600, 200), "2D": (40, 3000)}


def data(n, m, dim, dtype, seed=0, centre=0.0):
    rng = np.random.default_rng(seed)
    x = (centre + rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(dtype)
    y = (centre + rng.standard_normal((m, dim)) / np.sqrt(dim)).astype(dtype)
    b = rng.standard_normal((m, 1)).astype(dtype)
    return x, y, b


def sqdist(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    return ((x[:, None] - y[None]) ** 2).sum(-1)


def aliases(dim):
    return [f"x = Vi({dim})", f"y = Vj({dim})", "b = Vj(1)"]


@pytest.mark.parametrize("scheme", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["f16", "f32", "f64"])
def test_gaussian_sum(dtype, scheme):
    x, y, b = data(*SHAPES[scheme], 3, dtype)
    got = Genred("Exp(-SqDist(x, y)) * b", aliases(3), "Sum", 1)(x, y, b, backend="cuda")
    want = np.exp(-sqdist(x, y)) @ b.astype(np.float64)
    assert got.dtype == dtype
    rtol = 1e-2 if dtype == np.float16 else float_rtol("cuda", dtype)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("fast", [True, False], ids=["fast_math", "exact"])
@pytest.mark.parametrize("scheme", sorted(SHAPES))
def test_logsumexp(scheme, fast):
    x, y, _ = data(*SHAPES[scheme], 3, np.float32, seed=1)
    got = Genred("-SqDist(x, y)", aliases(3)[:2], "LogSumExp", 1, use_fast_math=fast)(x, y, backend="cuda")
    g = -sqdist(x, y)
    top = g.max(1, keepdims=True)
    want = top + np.log(np.exp(g - top).sum(1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=0, atol=float_rtol("cuda", np.float32, fast) * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_argkmin(dtype):
    x, y, _ = data(300, 500, 3, dtype, seed=2)
    got = Genred("SqDist(x, y)", aliases(3)[:2], "ArgKMin", 1, opt_arg=5)(x, y, backend="cuda")
    d2 = sqdist(x, y)
    kth = np.sort(d2, 1)[:, 4:5]
    rows = np.arange(len(x))[:, None]
    assert (np.sort(got, 1)[:, 1:] != np.sort(got, 1)[:, :-1]).all()
    assert (d2[rows, got] <= kth * (1 + 1e-5) + 1e-6).all()


def test_min_argmin_and_softmax_weight():
    x, y, b = data(*SHAPES["2D"], 3, np.float64, seed=3)
    values, index = Genred("SqDist(x, y)", aliases(3)[:2], "Min_ArgMin", 1)(x, y, backend="cuda")
    d2 = sqdist(x, y)
    np.testing.assert_array_equal(index[:, 0], d2.argmin(1))
    np.testing.assert_allclose(values[:, 0], d2.min(1), rtol=1e-12)
    got = Genred("-SqDist(x, y)", aliases(3), "SumSoftMaxWeight", 1, formula2="b")(x, y, b, backend="cuda")
    p = np.exp(-d2 + d2.min(1, keepdims=True))
    np.testing.assert_allclose(got, (p @ b) / p.sum(1, keepdims=True), rtol=1e-10)


def test_chunked_large_dimension():
    dim = 200
    x, y, b = data(300, 400, dim, np.float32, seed=4)
    got = Genred("Exp(-SqDist(x, y)) * b", aliases(dim), "Sum", 1)(x, y, b, backend="cuda")
    want = np.exp(-sqdist(x, y)) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_block_sparse_ranges():
    x, y, _ = data(40, 50, 2, np.float64, seed=5)
    kept = {(0, 20): [(0, 10), (30, 50)], (20, 40): [(5, 25)]}
    ranges = (np.array(list(kept)), np.array([2, 3]), np.array([c for cols in kept.values() for c in cols]),
              np.array([[0, 50]]), np.array([1]), np.array([[0, 40]]))
    got = Genred("SqDist(x, y)", aliases(2)[:2], "Sum", 1)(x, y, backend="cuda", ranges=ranges)
    mask = np.zeros((40, 50), bool)
    for (r0, r1), cols in kept.items():
        for c0, c1 in cols:
            mask[r0:r1, c0:c1] = True
    np.testing.assert_allclose(got[:, 0], np.where(mask, sqdist(x, y), 0).sum(1), rtol=1e-12)


def test_clustered_far_from_the_origin():
    """Issue 22 row 1 on the device: a cluster of spread 0.1 at distance 1000, column 0 at the origin, within the
    fast path's bound (engine/codegen/affine.py)."""
    rng = np.random.default_rng(6)
    centre = 1000 * np.ones(3) / np.sqrt(3)
    x, y = ((centre + 0.1 * rng.standard_normal((n, 3))).astype(np.float32) for n in (40, 300))
    y[0] = 0
    got = Genred("SqDist(x, y)", aliases(3)[:2], "Min", 1)(x, y, backend="cuda")[:, 0]
    d2 = sqdist(x, y)
    delta2 = sqdist(x, x).max()
    assert (np.abs(got - d2.min(1)) <= 9 * 2.0 ** -24 * (3 * delta2 + 2 * d2.min(1))).all()


def test_gaussian_gradient():
    torch = pytest.importorskip("torch")
    from kred.engine.torch import Genred as TorchGenred

    x, y, b = (torch.from_numpy(a).requires_grad_() for a in data(200, 300, 3, np.float32, seed=7))
    out = TorchGenred("Exp(-SqDist(x, y)) * b", aliases(3), "Sum", 1)(x, y, b, backend="cuda")
    (gx,) = torch.autograd.grad(out.sum(), [x])
    x64, y64, b64 = (t.detach().double() for t in (x, y, b))
    k = torch.exp(-((x64[:, None] - y64[None]) ** 2).sum(-1))
    want = -2 * ((k * b64[:, 0][None])[..., None] * (x64[:, None] - y64[None])).sum(1)
    np.testing.assert_allclose(gx.numpy(), want.numpy(), rtol=1e-4, atol=1e-4 * want.abs().max().item())
