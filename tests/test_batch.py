"""Batch dimensions (pykeops semantics): leading axes broadcast against each other, for Genred and LazyTensor, numpy
and torch, against dense einsum-style computations written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.engine.errors import ArgumentError
from kred.engine.numpy import Genred, LazyTensor
from kred.engine.torch import Genred as TorchGenred
from kred.engine.torch import LazyTensor as TorchLazyTensor

RNG = np.random.default_rng(5)
B, N, M, D = 3, 6, 5, 2


def gaussian(x, y):
    """exp(-|x_i - y_j|^2) for x (..., N, D) and y (..., M, D): shape (..., N, M)."""
    return np.exp(-((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1))


def test_genred_batch_broadcasts_like_numpy(backend):
    x = RNG.standard_normal((B, N, D))
    y = RNG.standard_normal((1, M, D))            # one set of j points for every batch item
    b = RNG.standard_normal((B, M, 3))
    s = RNG.uniform(0.5, 2, size=(B, 1))          # a batched Pm(1) parameter
    op = Genred("Exp(-s * SqDist(x, y)) * b", ["x = Vi(2)", "y = Vj(2)", "b = Vj(3)", "s = Pm(1)"], axis=1)
    out = op(x, y, b, s, backend=backend)
    kernel = np.exp(-s[:, :, None] * ((x[:, :, None] - y[:, None]) ** 2).sum(-1))
    assert out.shape == (B, N, 3)
    np.testing.assert_allclose(out, kernel @ b, rtol=1e-12)
    # over i: one output per j point and batch item
    op0 = Genred("Exp(-s * SqDist(x, y)) * x", ["x = Vi(2)", "y = Vj(2)", "s = Pm(1)"], axis=0)
    np.testing.assert_allclose(op0(x, y, s, backend=backend), kernel.transpose(0, 2, 1) @ x, rtol=1e-12)


def test_genred_two_batch_axes_tuples_and_out():
    x = RNG.standard_normal((2, 1, N, D))
    y = RNG.standard_normal((1, 3, M, D))
    p = RNG.standard_normal((2, 3, D))
    op = Genred("SqDist(x, y) + (p | y)", ["x = Vi(2)", "y = Vj(2)", "p = Pm(2)"], "Min_ArgMin", axis=1)
    values, index = op(x, y, p, backend="reference")
    dense = ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1) + (p[..., None, :] * y).sum(-1)[..., None, :]
    assert values.shape == index.shape == (2, 3, N, 1)
    np.testing.assert_allclose(values[..., 0], dense.min(-1), rtol=1e-12)
    np.testing.assert_array_equal(index[..., 0], dense.argmin(-1))
    kmin = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], "KMin", axis=1, opt_arg=2)
    out = np.empty((2, 3, N, 2))
    assert kmin(x, y, backend="reference", out=out) is out
    np.testing.assert_allclose(out, np.sort(dense - (p[..., None, :] * y).sum(-1)[..., None, :], -1)[..., :2],
                               rtol=1e-12)


def test_lazytensor_batch_dims_count_before_the_reduction_axes():
    x = RNG.standard_normal((B, N, 1, D))
    y = RNG.standard_normal((B, 1, M, D))
    w = RNG.standard_normal((B, 1, 1, 1))         # a batched parameter
    x_i, y_j, w_p = LazyTensor(x), LazyTensor(y), LazyTensor(w)
    K = (-((x_i - y_j) ** 2).sum(-1) * w_p.abs()).exp()
    assert K.shape == (B, N, M) and K.nbatchdims == 1 and K.dim() == 4
    dense = np.exp(-((x - y) ** 2).sum(-1) * np.abs(w[..., 0]))           # (B, N, M)
    np.testing.assert_allclose(K.sum(dim=2, backend="reference"), dense.sum(2)[..., None], rtol=1e-12)
    np.testing.assert_allclose(K.sum(dim=1, backend="reference"), dense.sum(1)[..., None], rtol=1e-12)
    np.testing.assert_allclose(K.sum(dim=-2, backend="reference"), dense.sum(2)[..., None], rtol=1e-12)
    v = RNG.standard_normal((B, M, 4))
    K.backend = "reference"
    np.testing.assert_allclose(K @ v, dense @ v, rtol=1e-12)
    np.testing.assert_allclose(K.t() @ np.ones((B, N, 1)), dense.transpose(0, 2, 1).sum(-1, keepdims=True),
                               rtol=1e-12)
    d = ((x_i - y_j) ** 2).sum(-1)
    np.testing.assert_array_equal(d.argKmin(2, dim=2, backend="reference"),
                                  np.argsort(((x - y) ** 2).sum(-1), -1)[..., :2])
    assert (x_i - y_j).sum(dim=-1).shape == (B, N, M)     # the vector axis: a formula, not a reduction
    with pytest.raises(ArgumentError, match="use 1 \\(over i\\) or 2 \\(over j\\)"):
        K.sum(dim=0)


def test_lazytensor_batch_broadcasting():
    x = RNG.standard_normal((2, 1, N, 1, D))
    y = RNG.standard_normal((M, D))
    z = RNG.standard_normal((1, 3, 1, M, D))
    x_i, y_j, z_j = LazyTensor(x), LazyTensor(y[None]), LazyTensor(z)
    out = ((x_i - y_j).sqnorm2() * (x_i | z_j)).sum(dim=3, backend="reference")
    dense = (((x - y) ** 2).sum(-1) * (x * z).sum(-1)).sum(-1)
    assert out.shape == (2, 3, N, 1)
    np.testing.assert_allclose(out[..., 0], dense, rtol=1e-12)
    with pytest.raises(ArgumentError, match="do not broadcast"):
        x_i + LazyTensor(RNG.standard_normal((5, 4, 1, M, D)))


def test_torch_batch_with_autograd_matches_dense():
    x = torch.randn(B, N, 1, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 1, M, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(B, 1, M, 1, dtype=torch.float64, requires_grad=True)
    x_i, y_j, b_j = TorchLazyTensor(x), TorchLazyTensor(y), TorchLazyTensor(b)
    for lazy in (x_i, y_j, b_j):
        lazy.backend = "reference"
    d = ((x_i - y_j) ** 2).sum(-1)
    out = ((-d).exp() * b_j).sum(dim=2) + d.min(dim=2) + (-d).logsumexp(dim=1).sum(1)[:, None]
    dense_d = ((x - y) ** 2).sum(-1, keepdim=True)                       # (B, N, M, 1)
    expected = ((-dense_d).exp() * b).sum(2) + dense_d.min(2).values + (-dense_d).logsumexp(1).sum(1)[:, None]
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sin().sum(), (x, y, b), create_graph=True)
    dense_grads = torch.autograd.grad(expected.sin().sum(), (x, y, b), create_graph=True)
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want)
    second, = torch.autograd.grad(grads[0].sum(), y)
    second_dense, = torch.autograd.grad(dense_grads[0].sum(), y)
    torch.testing.assert_close(second, second_dense)


def test_torch_genred_batch():
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, M, D, dtype=torch.float64)
    op = TorchGenred("Exp(-SqDist(x, y))", ["x = Vi(2)", "y = Vj(2)"], axis=1)
    out = op(x, y, backend="reference")
    expected = torch.exp(-((x[:, :, None] - y[:, None]) ** 2).sum(-1)).sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


def test_batch_errors():
    op = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], axis=1)
    with pytest.raises(ArgumentError, match="do not broadcast"):
        op(RNG.standard_normal((2, N, D)), RNG.standard_normal((3, M, D)))
    with pytest.raises(ArgumentError, match="empty"):
        op(RNG.standard_normal((0, N, D)), RNG.standard_normal((M, D)))
    with pytest.raises(ArgumentError, match="expected shape"):
        op(RNG.standard_normal((2, N, D)), RNG.standard_normal((2, M, 1)))
