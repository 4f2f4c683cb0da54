"""float16 Genred and LazyTensor on every backend (CPU ones widen to float32 at the run boundary and round the
result back, as the cuda backend does inside its kernels), against dense float64 numpy / torch written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kred.numpy as kn
import kred.torch as kt

RNG = np.random.default_rng(16)
X = RNG.standard_normal((6, 3)).astype(np.float16)
Y = RNG.standard_normal((2000, 3)).astype(np.float16)
B = RNG.uniform(0.5, 1.5, (2000, 1)).astype(np.float16)


def dense(x, y, b):
    x, y, b = (a.astype(np.float64) for a in (x, y, b))
    return np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b


def test_genred_float16_accumulates_wider_than_float16(backend):
    op = kn.Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
    got = op(X, Y, B, backend=backend)
    assert got.dtype == np.float16
    # 2000 terms: a float16 accumulator would be off by far more than one float16 rounding of the total
    np.testing.assert_allclose(got.astype(np.float64), dense(X, Y, B), rtol=2e-3)


def test_lazytensor_float16_numpy_and_torch():
    d2 = ((X.astype(np.float64)[:, None] - Y.astype(np.float64)[None]) ** 2).sum(-1)
    x_i, y_j = kn.LazyTensor(X[:, None]), kn.LazyTensor(Y[None])
    got = x_i.sqdist(y_j).argmin(dim=1, backend="reference")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got[:, 0], d2.argmin(1))
    x = torch.tensor(X, requires_grad=True)
    K = (-kt.LazyTensor(x[:, None]).sqdist(kt.LazyTensor(torch.tensor(Y)[None]))).exp()
    got = (K * kt.LazyTensor(torch.tensor(B)[None])).sum(dim=1, backend="reference")
    assert got.dtype == torch.float16
    np.testing.assert_allclose(got.detach().double().numpy(), dense(X, Y, B), rtol=2e-3)
    (grad,) = torch.autograd.grad(got.sum(), x)
    assert grad.dtype == torch.float16
    x64 = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    want = torch.exp(-((x64[:, None] - torch.tensor(Y, dtype=torch.float64)[None]) ** 2).sum(-1)) \
        @ torch.tensor(B, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(want.sum(), x64)
    np.testing.assert_allclose(grad.double().numpy(), want_grad.numpy(), rtol=5e-3, atol=5e-3)


def test_mixed_float16_is_still_refused():
    op = kn.Genred("x * y", ["x = Vi(1)", "y = Vj(1)"], axis=1)
    with pytest.raises(Exception, match="dtype float16 is not supported"):
        op(np.ones((2, 1), np.float16), np.ones((2, 1)), backend="reference")
