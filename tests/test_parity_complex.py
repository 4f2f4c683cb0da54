"""Complex LazyTensors (numpy and torch): complex64 / complex128 in and out, the complex operators and methods, the
real <-> complex conversions, K @ v with complex v, and torch gradients; against numpy / torch complex arithmetic on
dense arrays written here (reference backend)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kred.numpy as kn
import kred.torch as kt
from kred.engine.errors import ArgumentError

RNG = np.random.default_rng(21)
N, M = 5, 4
Z = RNG.standard_normal((N, 3)) + 1j * RNG.standard_normal((N, 3))
W = RNG.standard_normal((M, 3)) + 1j * RNG.standard_normal((M, 3))
X = RNG.standard_normal((N, 1))
Y = RNG.standard_normal((M, 1))


def lazies():
    return kn.ComplexLazyTensor(Z[:, None]), kn.ComplexLazyTensor(W[None])


CASES = [  # (name, LazyTensor expression of (z_i, w_j), dense (N, M, D) complex expression of (z, w))
    ("add", lambda z, w: z + w, lambda z, w: z + w),
    ("sub", lambda z, w: z - w, lambda z, w: z - w),
    ("mult", lambda z, w: z * w, lambda z, w: z * w),
    ("divide", lambda z, w: z / w, lambda z, w: z / w),
    ("exp", lambda z, w: (z - w).exp(), lambda z, w: np.exp(z - w)),
    ("conj", lambda z, w: z.conj() * w, lambda z, w: np.conj(z) * w),
    ("number", lambda z, w: 2 * z + (1 - 2j) - w * 0.5, lambda z, w: 2 * z + (1 - 2j) - w * 0.5),
    ("rdiv", lambda z, w: 1 / (z + w), lambda z, w: 1 / (z + w)),
    ("square", lambda z, w: (z - w) ** 2, lambda z, w: (z - w) ** 2),
    ("vector sum", lambda z, w: (z * w).sum(-1), lambda z, w: (z * w).sum(-1, keepdims=True)),
    ("real scalar", lambda z, w: z * (z - w).abs().sum(-1), lambda z, w: z * np.abs(z - w).sum(-1, keepdims=True)),
]


@pytest.mark.parametrize("name, lazy, dense", CASES, ids=[c[0] for c in CASES])
def test_complex_lazytensor_sums_match_numpy(name, lazy, dense):
    want = np.broadcast_to(dense(Z[:, None], W[None]), (N, M, 3 if name not in ("vector sum",) else 1)).sum(1)
    got = lazy(*lazies()).sum(dim=1, backend="reference")
    assert got.dtype == np.complex128
    np.testing.assert_allclose(got, want, rtol=1e-12)
    got0 = lazy(*lazies()).sum(dim=0, backend="reference")
    np.testing.assert_allclose(got0, np.broadcast_to(dense(Z[:, None], W[None]), (N, M, want.shape[-1])).sum(0),
                               rtol=1e-12)


def test_real_parts_and_conversions():
    z, w = lazies()
    d = Z[:, None] - W[None]
    for lazy, dense in ((lambda: (z - w).real, d.real), (lambda: (z - w).imag, d.imag),
                        (lambda: abs(z - w), np.abs(d)), (lambda: (z - w).angle(), np.angle(d))):
        got = lazy().sum(dim=1, backend="reference")
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, dense.sum(1), rtol=1e-12)
    x_i, y_j = kn.LazyTensor(X[:, None]), kn.LazyTensor(Y[None])
    for lazy, dense in (((x_i - y_j).real2complex(), X[:, None] - Y[None] + 0j),
                        ((x_i - y_j).imag2complex(), 1j * (X[:, None] - Y[None])),
                        ((x_i - y_j).exp1j(), np.exp(1j * (X[:, None] - Y[None])))):
        assert lazy.is_complex and not x_i.is_complex
        np.testing.assert_allclose(lazy.sum(dim=1, backend="reference"), dense.sum(1), rtol=1e-12)


def test_fourier_matvec_with_complex64():
    K = (kn.LazyTensor(X[:, None].astype(np.float32)) * kn.LazyTensor(Y[None].astype(np.float32))).exp1j()
    v = W[:, 0].astype(np.complex64)
    got = K.__matmul__(v, backend="reference")
    assert got.dtype == np.complex64 and got.shape == (N,)
    np.testing.assert_allclose(got, np.exp(1j * X * Y.T) @ W[:, 0], rtol=1e-5)
    assert K.dtype == np.complex64 and K.shape == (N, M)


def test_torch_complex_values_and_gradients():
    z = torch.tensor(Z, requires_grad=True)
    w = torch.tensor(W, requires_grad=True)
    got = (kt.ComplexLazyTensor(z[:, None]) * kt.ComplexLazyTensor(w[None])).exp().sum(dim=1, backend="reference")
    want = torch.exp(z[:, None] * w[None]).sum(1)
    assert got.dtype == torch.complex128
    torch.testing.assert_close(got, want)
    g = torch.randn(N, 3, dtype=torch.complex128)
    grads = torch.autograd.grad((got * g.conj()).real.sum(), (z, w))
    wants = torch.autograd.grad((want * g.conj()).real.sum(), (z, w))
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b)


def test_refusals_name_the_way():
    with pytest.raises(ArgumentError, match="expected a complex array"):
        kn.ComplexLazyTensor(X[:, None])
    with pytest.raises(ArgumentError, match="complex already"):
        lazies()[0].real2complex()


def test_complex_data_makes_complex_lazytensors_and_real_ones_are_promoted():
    assert isinstance(kn.LazyTensor(Z[:, None]), kn.ComplexLazyTensor)
    assert isinstance(kn.Vi(Z), kn.ComplexLazyTensor) and isinstance(kt.Vj(torch.tensor(W)), kt.ComplexLazyTensor)
    assert not kn.LazyTensor(X[:, None]).is_complex
    x_i, w_j = kn.Vi(X), kn.Vj(W)
    got = (x_i * 1j + w_j - 2).sum(dim=1, backend="reference")
    np.testing.assert_allclose(got, (X[:, None] * 1j + W[None] - 2).sum(1), rtol=1e-12)
    got = (2 / (x_i + 3) * w_j - w_j / (x_i + 3)).sum(dim=1, backend="reference")
    np.testing.assert_allclose(got, (2 / (X[:, None] + 3) * W[None] - W[None] / (X[:, None] + 3)).sum(1), rtol=1e-12)


def test_remote_lazytensors_refuse_complex_numbers_instead_of_running_them_here():
    from kred.client.numpy import LazyTensor as RemoteLazyTensor
    with pytest.raises(ArgumentError, match="in-process only"):
        RemoteLazyTensor(X[:, None]).exp1j()
