"""LazyTensor (numpy and torch) against dense numpy / torch computations written here, in float64.

Each expression is built twice: as a LazyTensor of x_i (N, 1, 3), y_j (1, M, 3) and parameters, and as the dense
(N, M, D) array it stands for. Reductions of the first must equal the same reductions of the second, over both axes.
The broad tables run on the reference backend (no kernel compiles); a smaller set runs on every backend present.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, eigsh

from kred.engine.errors import ArgumentError, DimensionError
from kred.engine.numpy import LazyTensor, Pm, Vi, Vj
from kred.engine.torch import LazyTensor as TorchLazyTensor

N, M = 9, 7
RNG = np.random.default_rng(4)
X = RNG.standard_normal((N, 3))
Y = RNG.standard_normal((M, 3))
X1 = RNG.standard_normal((N, 1))
Y1 = RNG.standard_normal((M, 1))
P3 = RNG.standard_normal(3)
A6 = RNG.standard_normal(6)
S = RNG.standard_normal((3, 3))
FULL = (S @ S.T + np.eye(3)).reshape(9)          # a symmetric positive weight matrix, row-major


def on_reference(*leaves):
    """Leaves whose reductions default to the reference backend (expressions built on them inherit it), so the
    broad tables need no kernel compiles; the backend tests below choose the backend per call."""
    for leaf in leaves:
        leaf.backend = "reference"
    return leaves


def lazies():
    return on_reference(LazyTensor(X[:, None, :]), LazyTensor(Y[None, :, :]), LazyTensor(X1[:, None, :]),
                        LazyTensor(Y1[None, :, :]))


def denses():
    return X[:, None, :], Y[None, :, :], X1[:, None, :], Y1[None, :, :]


def _sinxdivx(v):
    return np.where(v == 0, 1.0, np.sin(v) / np.where(v == 0, 1.0, v))


def _cat(*arrays):
    """Concatenate (N, 1, .) and (1, M, .) arrays along the vector axis, broadcast to (N, M, .)."""
    return np.concatenate([np.broadcast_to(a, (N, M, a.shape[-1])) for a in arrays], -1)


def _gauss(x, y):
    return np.exp(-((x - y) ** 2).sum(-1, keepdims=True))


# (name, LazyTensor expression of (x_i, y_j, x1_i, y1_j), the same as a dense (N, M, D) numpy expression)
EXPRESSIONS = [
    ("add", lambda x, y, a, b: x + y, lambda x, y, a, b: x + y),
    ("scalar minus product", lambda x, y, a, b: 2.5 - x * y, lambda x, y, a, b: 2.5 - x * y),
    ("divide", lambda x, y, a, b: x * y / (1 + y ** 2), lambda x, y, a, b: x * y / (1 + y ** 2)),
    ("negate and broadcast", lambda x, y, a, b: -x * b, lambda x, y, a, b: -x * b),
    ("reflected inverse", lambda x, y, a, b: 1 / (1 + (x - y) ** 2), lambda x, y, a, b: 1 / (1 + (x - y) ** 2)),
    ("reflected divide", lambda x, y, a, b: 3 / (2 + y.abs()) + 0 * x, lambda x, y, a, b: 3 / (2 + np.abs(y)) + 0 * x),
    ("integer power", lambda x, y, a, b: (x - y) ** 3, lambda x, y, a, b: (x - y) ** 3),
    ("negative power", lambda x, y, a, b: (1 + (x - y) ** 2) ** -2, lambda x, y, a, b: (1 + (x - y) ** 2) ** -2),
    ("power 0.5", lambda x, y, a, b: (1 + x ** 2 + y ** 2) ** 0.5, lambda x, y, a, b: np.sqrt(1 + x ** 2 + y ** 2)),
    ("power -0.5", lambda x, y, a, b: (1 + (x * y) ** 2) ** -0.5, lambda x, y, a, b: 1 / np.sqrt(1 + (x * y) ** 2)),
    ("float power", lambda x, y, a, b: (1 + x ** 2) ** 1.5 * y, lambda x, y, a, b: (1 + x ** 2) ** 1.5 * y),
    ("lazy power", lambda x, y, a, b: (1 + x ** 2).power(b ** 2), lambda x, y, a, b: (1 + x ** 2) ** (b ** 2)),
    ("exp", lambda x, y, a, b: (x - y).exp(), lambda x, y, a, b: np.exp(x - y)),
    ("log", lambda x, y, a, b: (1 + (x * y) ** 2).log(), lambda x, y, a, b: np.log(1 + (x * y) ** 2)),
    ("xlogx", lambda x, y, a, b: ((x - y) ** 2).xlogx(), lambda x, y, a, b: (x - y) ** 2 * np.log((x - y) ** 2)),
    ("sqrt", lambda x, y, a, b: (1 + x * x + y * y).sqrt(), lambda x, y, a, b: np.sqrt(1 + x * x + y * y)),
    ("rsqrt", lambda x, y, a, b: (1 + (x - y) ** 2).rsqrt(), lambda x, y, a, b: (1 + (x - y) ** 2) ** -0.5),
    ("sin cos", lambda x, y, a, b: x.sin() * y.cos(), lambda x, y, a, b: np.sin(x) * np.cos(y)),
    ("asin acos", lambda x, y, a, b: (x * 0.2).asin() + (y * 0.2).acos(),
     lambda x, y, a, b: np.arcsin(x * 0.2) + np.arccos(y * 0.2)),
    ("atan atan2", lambda x, y, a, b: x.atan() + x.atan2(y), lambda x, y, a, b: np.arctan(x) + np.arctan2(x, y)),
    ("sinxdivx", lambda x, y, a, b: (x - y).sinxdivx(), lambda x, y, a, b: _sinxdivx(x - y)),
    ("sinc", lambda x, y, a, b: (x - y).sinc(), lambda x, y, a, b: np.sinc(x - y)),
    ("abs", lambda x, y, a, b: abs(x - y) + (x * y).abs(), lambda x, y, a, b: np.abs(x - y) + np.abs(x * y)),
    ("relu step sign", lambda x, y, a, b: (x - y).relu() + (x - y).step() * 2 + (x + y).sign() * 3,
     lambda x, y, a, b: np.maximum(x - y, 0) + (x >= y) * 2 + np.sign(x + y) * 3),
    ("floor round", lambda x, y, a, b: (x * y * 3).floor() + (x - y).round(1),
     lambda x, y, a, b: np.floor(x * y * 3) + np.round(x - y, 1)),
    ("clamp integers", lambda x, y, a, b: (x - y).clamp(-1, 1), lambda x, y, a, b: np.clip(x - y, -1, 1)),
    ("clamp lazy", lambda x, y, a, b: x.clamp(y - 0.5, y + 0.5),
     lambda x, y, a, b: np.minimum(np.maximum(x, y - 0.5), y + 0.5)),
    ("ifelse", lambda x, y, a, b: (x - y).ifelse(x, 2 * y), lambda x, y, a, b: np.where(x - y >= 0, x, 2 * y)),
    ("mod", lambda x, y, a, b: (x * y).mod(1.5, 0.25),
     lambda x, y, a, b: x * y - 1.5 * np.floor((x * y - 0.25) / 1.5)),
    ("square", lambda x, y, a, b: (x - y).square(), lambda x, y, a, b: (x - y) ** 2),
    ("sqnorm2 norm2", lambda x, y, a, b: (x - y).sqnorm2() + (x + y).norm2() + (x * y).norm(-1),
     lambda x, y, a, b: ((x - y) ** 2).sum(-1, keepdims=True) + np.linalg.norm(x + y, axis=-1, keepdims=True)
     + np.linalg.norm(x * y, axis=-1, keepdims=True)),
    ("normalize", lambda x, y, a, b: (x - y).normalize(),
     lambda x, y, a, b: (x - y) / np.linalg.norm(x - y, axis=-1, keepdims=True)),
    ("sqdist", lambda x, y, a, b: x.sqdist(y), lambda x, y, a, b: ((x - y) ** 2).sum(-1, keepdims=True)),
    ("scalar product", lambda x, y, a, b: (x | y), lambda x, y, a, b: (x * y).sum(-1, keepdims=True)),
    ("gaussian kernel", lambda x, y, a, b: (-((x - y) ** 2).sum(-1)).exp(), lambda x, y, a, b: _gauss(x, y)),
    ("weightedsqnorm scalar", lambda x, y, a, b: (x - y).weightedsqnorm(Pm(np.array([0.7]))),
     lambda x, y, a, b: 0.7 * ((x - y) ** 2).sum(-1, keepdims=True)),
    ("weightedsqnorm diagonal", lambda x, y, a, b: (x - y).weightedsqnorm(P3 ** 2),
     lambda x, y, a, b: (P3 ** 2 * (x - y) ** 2).sum(-1, keepdims=True)),
    ("weightedsqdist full", lambda x, y, a, b: x.weightedsqdist(y, FULL),
     lambda x, y, a, b: np.einsum("...k,kl,...l->...", x - y, FULL.reshape(3, 3), x - y)[..., None]),
    ("matvecmult", lambda x, y, a, b: Pm(A6).matvecmult(x - y),
     lambda x, y, a, b: np.einsum("kl,...l->...k", A6.reshape(2, 3), x - y)),
    ("vecmatmult", lambda x, y, a, b: (x - y).vecmatmult(Pm(A6)),
     lambda x, y, a, b: np.einsum("...k,kl->...l", x - y, A6.reshape(3, 2))),
    ("tensorprod", lambda x, y, a, b: x.tensorprod(y[..., :2]),
     lambda x, y, a, b: (x[..., :, None] * y[..., None, :2]).reshape(x.shape[0], y.shape[1], 6)),
    ("concat", lambda x, y, a, b: x.concat(y[..., 0]), lambda x, y, a, b: _cat(x, y[..., :1])),
    ("cat of three", lambda x, y, a, b: LazyTensor.cat((x, y, a), dim=-1), lambda x, y, a, b: _cat(x, y, a)),
    ("elem and index", lambda x, y, a, b: x.elem(1) * y[..., 2] + x[:, :, 0] - y[-1],
     lambda x, y, a, b: x[..., 1:2] * y[..., 2:3] + x[..., 0:1] - y[..., 2:3]),
    ("slices", lambda x, y, a, b: x[..., 1:] - y[:2] + x.extract(0, 2),
     lambda x, y, a, b: x[..., 1:] - y[..., :2] + x[..., 0:2]),
    ("one_hot", lambda x, y, a, b: ((a - b).abs() * 2).one_hot(4),
     lambda x, y, a, b: (np.round(np.abs(a - b) * 2) == np.arange(4)).astype(float)),
    ("comparisons", lambda x, y, a, b: (x > y) + 2 * (x < y) + 4 * (x >= y) + 8 * (x <= y)
     + 16 * (x.floor() == y.floor()) + 32 * (x.floor() != y.floor()),
     lambda x, y, a, b: (x > y) + 2 * (x < y) + 4 * (x >= y) + 8 * (x <= y)
     + 16 * (np.floor(x) == np.floor(y)) + 32 * (np.floor(x) != np.floor(y)) * 1.0),
    ("vector sum min max", lambda x, y, a, b: (x - y).sum(-1) + (x * y).min(-1) - (x + y).max(),
     lambda x, y, a, b: (x - y).sum(-1, keepdims=True) + (x * y).min(-1, keepdims=True)
     - (x + y).max(-1, keepdims=True)),
    ("vector argmin argmax", lambda x, y, a, b: (x * y).argmin() + 3 * (x - y).argmax(dim=2),
     lambda x, y, a, b: (x * y).argmin(-1)[..., None] + 3.0 * (x - y).argmax(-1)[..., None]),
    ("numpy array and list operands", lambda x, y, a, b: P3 * x + [1.0, -2.0, 0.5] * y,
     lambda x, y, a, b: P3 * x + np.array([1.0, -2.0, 0.5]) * y),
    ("Vi Vj Pm helpers", lambda x, y, a, b: Vi(X) * Vj(Y) + Pm(P3) - Pm(2.0),
     lambda x, y, a, b: x * y + P3 - 2.0),
    ("gradient", lambda x, y, a, b: (-((x - y) ** 2).sum(-1)).exp().grad(x, b),
     lambda x, y, a, b: -2 * (x - y) * _gauss(x, y) * b),
    ("laplacian", lambda x, y, a, b: (-((x - y) ** 2).sum(-1)).exp().laplacian(x),
     lambda x, y, a, b: (4 * ((x - y) ** 2).sum(-1, keepdims=True) - 6) * _gauss(x, y)),
]


@pytest.mark.parametrize("name, lazy, dense", EXPRESSIONS, ids=[e[0] for e in EXPRESSIONS])
def test_expression_sums_match_dense(name, lazy, dense):
    expression = lazy(*lazies())
    values = dense(*denses())
    values = np.broadcast_to(values, (N, M, values.shape[-1]))
    assert expression.shape[:2] == (N, M)
    assert expression.ndim == values.shape[-1]
    np.testing.assert_allclose(expression.sum(dim=1, backend="reference"), values.sum(1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(expression.sum(axis=0, backend="reference"), values.sum(0), rtol=1e-10, atol=1e-10)


# Reductions --------------------------------------------------------------------------------------------------

def _softmax(f, axis):
    e = np.exp(f - f.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _kmin(values, k, axis):
    order = np.argsort(values, axis=axis, kind="stable")
    order = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(values, order, axis), order


def _kmax(values, k, axis):
    order = np.argsort(-values, axis=axis, kind="stable")         # largest first, ties by index
    order = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(values, order, axis), order


def _move(a, axis):
    """Dense (N, M, ...) reduced over `axis` lands with its K axis where pykeops puts it: (rows, K, D)."""
    return np.moveaxis(a, axis, 1) if axis == 0 else a


WEIGHTS = np.abs(RNG.standard_normal((M, 2))) + 0.1


def _reductions():
    f = ((X[:, None] - Y[None]) ** 2).sum(-1, keepdims=True)          # (N, M, 1)
    v = X[:, None] * Y[None]                                           # (N, M, 3)
    w = np.broadcast_to(WEIGHTS[None], (N, M, 2))
    cases = []
    for axis in (0, 1):
        k = 3
        cases += [
            ("Sum", axis, lambda F, V, W, a: F.sum(dim=a), f.sum(axis)),
            ("LogSumExp", axis, lambda F, V, W, a: (-F).logsumexp(dim=a),
             np.log(np.exp(-f).sum(axis))),
            ("LogSumExp vector", axis, lambda F, V, W, a: V.logsumexp(axis=a), np.log(np.exp(v).sum(axis))),
            ("LogSumExpWeight", axis, lambda F, V, W, a: (-F).logsumexp(dim=a, weight=W),
             np.log((np.exp(-f) * w).sum(axis))),
            ("SumSoftMaxWeight", axis, lambda F, V, W, a: (-F).sumsoftmaxweight(W, dim=a),
             (_softmax(-f, axis) * w).sum(axis)),
            ("Min", axis, lambda F, V, W, a: V.min(dim=a), v.min(axis)),
            ("Max", axis, lambda F, V, W, a: V.max(dim=a), v.max(axis)),
            ("ArgMin", axis, lambda F, V, W, a: V.argmin(dim=a), v.argmin(axis)),
            ("ArgMax", axis, lambda F, V, W, a: V.argmax(dim=a), v.argmax(axis)),
            ("Min_ArgMin", axis, lambda F, V, W, a: V.min_argmin(dim=a), (v.min(axis), v.argmin(axis))),
            ("Max_ArgMax", axis, lambda F, V, W, a: V.max_argmax(dim=a), (v.max(axis), v.argmax(axis))),
            ("KMin scalar", axis, lambda F, V, W, a: F.Kmin(k, dim=a), _move(_kmin(f, k, axis)[0], axis)[..., 0]),
            ("KMin vector", axis, lambda F, V, W, a: V.Kmin(K=k, dim=a), _move(_kmin(v, k, axis)[0], axis)),
            ("ArgKMin", axis, lambda F, V, W, a: F.argKmin(k, dim=a), _move(_kmin(f, k, axis)[1], axis)[..., 0]),
            ("KMin_ArgKMin", axis, lambda F, V, W, a: V.Kmin_argKmin(k, dim=a),
             tuple(_move(r, axis) for r in _kmin(v, k, axis))),
            ("KMax scalar", axis, lambda F, V, W, a: F.Kmax(k, dim=a), _move(_kmax(f, k, axis)[0], axis)[..., 0]),
            ("ArgKMax", axis, lambda F, V, W, a: V.argKmax(K=k, dim=a), _move(_kmax(v, k, axis)[1], axis)),
            ("KMax_ArgKMax", axis, lambda F, V, W, a: V.Kmax_argKmax(k, dim=a),
             tuple(_move(r, axis) for r in _kmax(v, k, axis))),
        ]
    return cases


REDUCTIONS = _reductions()


@pytest.mark.parametrize("name, axis, reduce, expected", REDUCTIONS,
                         ids=[f"{c[0]}-dim{c[1]}" for c in REDUCTIONS])
def test_every_reduction_over_both_axes(name, axis, reduce, expected):
    x_i, y_j, _, _ = lazies()
    F, V = ((x_i - y_j) ** 2).sum(-1), x_i * y_j
    result = reduce(F, V, LazyTensor(WEIGHTS[None]), axis)
    results, expecteds = (result, expected) if isinstance(expected, tuple) else ((result,), (expected,))
    assert isinstance(result, tuple) == isinstance(expected, tuple)
    for got, want in zip(results, expecteds):
        assert got.shape == want.shape
        if want.dtype.kind == "i":
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_pykeops_output_shapes_and_dtypes():
    x_i, y_j, _, _ = lazies()
    K = (-((x_i - y_j) ** 2).sum(-1)).exp()
    assert K.shape == (N, M) and K._shape == (N, M, 1) and K.dim() == 3
    assert (x_i - y_j).shape == (N, M, 3)
    assert K.sum(dim=1).shape == (N, 1) and K.sum(dim=0).shape == (M, 1)
    assert (x_i * y_j).Kmin(2, dim=1).shape == (N, 2, 3)
    assert K.argKmin(2, dim=0).shape == (M, 2)
    assert x_i.dtype == np.float64
    assert LazyTensor(X.astype(np.float32)[:, None]).sum(dim=1, backend="reference").dtype == np.float32
    # A parameter-only formula has one row, as in pykeops.
    assert Pm(P3).sum(dim=1, backend="reference").shape == (1, 3)
    # Pm of a (1, D) array is one parameter; of a (B, D) array, a batch of them.
    assert (x_i * Pm(P3[None])).sum(dim=1, backend="reference").shape == (N, 3)
    assert (x_i * Pm(np.stack([P3, 2 * P3]))).sum(dim=2, backend="reference").shape == (2, N, 3)


# Linear algebra ------------------------------------------------------------------------------------------------

def _kernel_dense(x, y):
    return np.exp(-((x[:, None] - y[None]) ** 2).sum(-1))


def test_matmul_transpose_and_matvec():
    x_i, y_j, _, _ = lazies()
    K = (-((x_i - y_j) ** 2).sum(-1)).exp()
    dense = _kernel_dense(X, Y)
    b = RNG.standard_normal((M, 2))
    np.testing.assert_allclose(K @ b, dense @ b, rtol=1e-12)
    np.testing.assert_allclose(K @ b[:, 0], dense @ b[:, 0], rtol=1e-12)
    assert (K @ b[:, 0]).shape == (N,)
    c = RNG.standard_normal((N, 3))
    np.testing.assert_allclose(K.t() @ c, dense.T @ c, rtol=1e-12)
    np.testing.assert_allclose(K.T @ c, dense.T @ c, rtol=1e-12)
    np.testing.assert_allclose(K.rmatvec(c[:, 0]), dense.T @ c[:, 0], rtol=1e-12)
    # The transpose swaps i and j for the variables too, so it combines with untransposed LazyTensors.
    mixed = (K.t() * LazyTensor(Y[:, None, :1])).sum(dim=1)
    np.testing.assert_allclose(mixed, dense.T @ np.ones((N, 1)) * Y[:, :1], rtol=1e-12)
    with pytest.raises(DimensionError, match="vector dimension 1"):
        (x_i - y_j) @ b


def test_scipy_linear_operator_eigsh_and_cg():
    x_i, x_j = on_reference(LazyTensor(X[:, None, :]), LazyTensor(X[None, :, :]))
    K = (-((x_i - x_j) ** 2).sum(-1) / 2).exp()
    dense = _kernel_dense(X / np.sqrt(2), X / np.sqrt(2))
    operator = aslinearoperator(K)
    assert isinstance(operator, LinearOperator) and operator.shape == (N, N) and operator.dtype == np.float64
    values = eigsh(operator, k=3, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values), np.linalg.eigvalsh(dense)[-3:], rtol=1e-8)
    b = RNG.standard_normal(N)
    shifted = aslinearoperator(K) + 0.5 * aslinearoperator(np.eye(N))
    a, info = cg(shifted, b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(a, np.linalg.solve(dense + 0.5 * np.eye(N), b), rtol=1e-6, atol=1e-9)


def test_solve_matches_dense_solve():
    x_i, x_j = on_reference(LazyTensor(X[:, None, :]), LazyTensor(X[None, :, :]))
    K = (-((x_i - x_j) ** 2).sum(-1)).exp()
    b = RNG.standard_normal((N, 2))
    a = K.solve(b, alpha=0.1, eps=1e-10)
    expected = np.linalg.solve(_kernel_dense(X, X) + 0.1 * np.eye(N), b)
    np.testing.assert_allclose(a, expected, rtol=1e-7, atol=1e-9)
    # pykeops' explicit form: solve sum_j K_ij a_j = b_i for a symbolic a_j.
    a_j = Vj(0, 2)
    np.testing.assert_allclose((K * a_j).solve(Vi(b), var=a_j, alpha=0.1, eps=1e-10), expected, rtol=1e-7,
                               atol=1e-9)


def test_symbolic_variables_give_a_callable_reduction():
    u, v = Vi(0, 3), Vj(1, 3)
    gaussian = (-((u - v) ** 2).sum(-1)).exp().sum(dim=1, backend="reference")
    assert callable(gaussian)
    np.testing.assert_allclose(gaussian(X, Y), _kernel_dense(X, Y).sum(1, keepdims=True), rtol=1e-12)
    later = LazyTensor(X[:, None]).sqnorm2().sum(dim=1, call=False)
    np.testing.assert_allclose(later(backend="reference"), (X ** 2).sum(1, keepdims=True), rtol=1e-12)
    with pytest.raises(ArgumentError, match="expected 2 array"):
        gaussian(X)


def test_formula_text_and_repr():
    x_i, y_j, _, _ = lazies()
    assert (x_i - y_j).sqnorm2().formula == "Sum(Square(Subtract(Var(0,3,0),Var(1,3,1))))"
    assert "shape=(9, 7)" in repr((x_i - y_j).sqnorm2())
    # The same leaf used twice is one argument; two views of one array used as i and j are two.
    assert "Var(2," not in (x_i * x_i + y_j).formula
    assert "Var(1,3,1)" in (x_i - LazyTensor(X[None])).formula


# Every backend ------------------------------------------------------------------------------------------------

def test_reductions_on_every_backend(backend):
    x_i, y_j, _, _ = lazies()
    w_j = LazyTensor(WEIGHTS[None])
    d = ((x_i - y_j) ** 2).sum(-1)
    dense_d = ((X[:, None] - Y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(((-d).exp() * w_j).sum(dim=1, backend=backend), np.exp(-dense_d) @ WEIGHTS,
                               rtol=1e-10)
    np.testing.assert_allclose((-d).logsumexp(dim=0, backend=backend),
                               np.log(np.exp(-dense_d).sum(0))[:, None], rtol=1e-10)
    np.testing.assert_array_equal(d.argKmin(3, dim=1, backend=backend), np.argsort(dense_d, 1)[:, :3])
    # backend= on a LazyTensor, as an attribute that later operations keep
    tagged = d * 1
    tagged.backend = backend
    np.testing.assert_allclose((tagged + 1).min(dim=1), dense_d.min(1, keepdims=True) + 1, rtol=1e-12)


def test_torch_reductions_on_every_backend(backend):
    x = torch.tensor(X, requires_grad=True)
    y = torch.tensor(Y)
    x_i, y_j = TorchLazyTensor(x[:, None, :]), TorchLazyTensor(y[None, :, :])
    a = (-((x_i - y_j) ** 2).sum(-1)).exp().sum(dim=1, backend=backend)
    dense = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)).sum(1, keepdim=True)
    torch.testing.assert_close(a, dense)
    g, = torch.autograd.grad(a.square().sum(), x)
    g_dense, = torch.autograd.grad(dense.square().sum(), x)
    torch.testing.assert_close(g, g_dense)


# Errors -------------------------------------------------------------------------------------------------------

def test_clear_errors():
    x_i, y_j, _, _ = lazies()
    with pytest.raises(ArgumentError, match="numbers of i points: 9 and 4"):
        x_i + LazyTensor(X[:4, None])
    with pytest.raises(ArgumentError, match="size-1 axis"):
        LazyTensor(np.zeros((3, 4, 2)))
    with pytest.raises(ArgumentError, match="needs axis=0"):
        LazyTensor(X)
    with pytest.raises(ArgumentError, match="dtypes"):
        x_i + LazyTensor(Y.astype(np.float32)[None])
    with pytest.raises(ArgumentError, match="float32 or float64"):
        LazyTensor(np.zeros((3, 1, 2), dtype=np.int64))
    with pytest.raises(DimensionError, match="Add"):
        x_i + LazyTensor(Y[None, :, :2])
    with pytest.raises(ArgumentError, match="last"):
        x_i[0, :, 1]
    with pytest.raises(ArgumentError, match="dim=0"):
        x_i.logsumexp()
    with pytest.raises(ArgumentError, match="not a reduction axis"):
        x_i.logsumexp(dim=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        x_i.sum(dim=1, bakend="cpu")
    with pytest.raises(TypeError, match="cannot be built"):
        LazyTensor("x")
    with pytest.raises(TypeError, match="torch"):
        x_i + TorchLazyTensor(torch.tensor(Y)[None])
    with pytest.raises(ArgumentError, match="variable"):
        (x_i * y_j).sum(-1).grad(x_i * 2, y_j[0])


# torch: values and autograd against dense torch ---------------------------------------------------------------

def _torch_data(requires_grad=True):
    x = torch.tensor(X, requires_grad=requires_grad)
    y = torch.tensor(Y, requires_grad=requires_grad)
    b = torch.tensor(WEIGHTS, requires_grad=requires_grad)
    return x, y, b


def test_torch_issue_example_to_third_order():
    x, y, _ = _torch_data()
    x_i, y_j = on_reference(TorchLazyTensor(x[:, None, :]), TorchLazyTensor(y[None, :, :]))
    a = (-((x_i - y_j) ** 2).sum(-1)).exp().sum(dim=1)
    dense = torch.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)).sum(1, keepdim=True)
    torch.testing.assert_close(a, dense)
    g, = torch.autograd.grad((a ** 2).sum(), [x], create_graph=True)
    g_dense, = torch.autograd.grad((dense ** 2).sum(), [x], create_graph=True)
    torch.testing.assert_close(g, g_dense)
    h, = torch.autograd.grad(g.sin().sum(), [y], create_graph=True)
    h_dense, = torch.autograd.grad(g_dense.sin().sum(), [y], create_graph=True)
    torch.testing.assert_close(h, h_dense)
    t, = torch.autograd.grad(h.sum(), [x])
    t_dense, = torch.autograd.grad(h_dense.sum(), [x])
    torch.testing.assert_close(t, t_dense)


TORCH_REDUCTIONS = [
    ("weighted sum dim 0", lambda F, b_j, c_i: (F * c_i).sum(dim=0), lambda F, b, c: (F * c[:, None, :]).sum(0)),
    ("logsumexp", lambda F, b_j, c_i: F.logsumexp(dim=1), lambda F, b, c: F.logsumexp(1)),
    ("logsumexp weight", lambda F, b_j, c_i: F.logsumexp(dim=1, weight=b_j),
     lambda F, b, c: (F + b[None, :, :].log()).logsumexp(1)),
    ("sumsoftmaxweight", lambda F, b_j, c_i: F.sumsoftmaxweight(b_j, dim=1),
     lambda F, b, c: (F.softmax(1) * b[None]).sum(1)),
    ("min dim 0", lambda F, b_j, c_i: F.min(dim=0), lambda F, b, c: F.min(0).values),
    ("Kmin", lambda F, b_j, c_i: F.Kmin(3, dim=1), lambda F, b, c: F[..., 0].topk(3, dim=1, largest=False).values),
    ("max_argmax values", lambda F, b_j, c_i: F.max_argmax(dim=1)[0], lambda F, b, c: F.max(1).values),
]


@pytest.mark.parametrize("name, lazy, dense", TORCH_REDUCTIONS, ids=[r[0] for r in TORCH_REDUCTIONS])
def test_torch_reduction_gradients_match_dense_autograd(name, lazy, dense):
    x, y, b = _torch_data()
    c = torch.tensor(X1, requires_grad=True)
    x_i, y_j = on_reference(TorchLazyTensor(x[:, None, :]), TorchLazyTensor(y[None, :, :]))
    F = -((x_i - y_j) ** 2).sum(-1) * 0.5 + (x_i | y_j).sin()
    dense_F = (-((x[:, None] - y[None]) ** 2).sum(-1) * 0.5 + (x[:, None] * y[None]).sum(-1).sin())[..., None]
    out = lazy(F, TorchLazyTensor(b[None]), TorchLazyTensor(c[:, None]))
    expected = dense(dense_F, b, c)
    torch.testing.assert_close(out, expected)
    cotangent = torch.randn_like(expected)
    inputs = (x, y, b, c)
    grads = torch.autograd.grad((out * cotangent).sum(), inputs, allow_unused=True)
    dense_grads = torch.autograd.grad((expected * cotangent).sum(), inputs, allow_unused=True)
    for got, want in zip(grads, dense_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)


def test_torch_gradcheck_and_gradgradcheck():
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)     # a 0-d tensor: a Pm(1) parameter

    def f(x, y, scale):
        x_i, y_j = on_reference(TorchLazyTensor(x[:, None, :]), TorchLazyTensor(y[None, :, :]))
        return (-(x_i.sqdist(y_j)) * TorchLazyTensor(scale)).exp().sum(dim=1)

    assert torch.autograd.gradcheck(f, (x, y, scale))
    assert torch.autograd.gradgradcheck(f, (x, y, scale))


def test_torch_operators_matmul_and_solve():
    x, y, b = _torch_data(requires_grad=False)
    x_i, y_j = on_reference(TorchLazyTensor(x[:, None, :]), TorchLazyTensor(y[None, :, :]))
    K = (-((x_i - y_j) ** 2).sum(-1)).exp()
    dense = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1))
    torch.testing.assert_close(K @ b, dense @ b)
    torch.testing.assert_close(K.t() @ x, dense.T @ x)
    # a torch tensor on the left hands the operation to the LazyTensor
    torch.testing.assert_close((torch.tensor(P3) * x_i - y_j).sum(dim=1), (torch.tensor(P3) * x[:, None] - y[None]).sum(1))
    assert K.dtype == "float64"          # as pykeops (a numpy dtype: scipy reads it)
    xr = x.clone().requires_grad_(True)
    rhs = torch.randn(N, 2, dtype=torch.float64, requires_grad=True)
    Kxx = (-((TorchLazyTensor(xr[:, None]) - TorchLazyTensor(xr[None])) ** 2).sum(-1)).exp()
    Kxx.backend = "reference"
    a = Kxx.solve(rhs, alpha=0.5, eps=1e-12)
    dense_xx = torch.exp(-((xr[:, None] - xr[None]) ** 2).sum(-1)) + 0.5 * torch.eye(N, dtype=torch.float64)
    expected = torch.linalg.solve(dense_xx, rhs)
    torch.testing.assert_close(a, expected)
    grads = torch.autograd.grad(a.sum(), (xr, rhs))
    dense_grads = torch.autograd.grad(expected.sum(), (xr, rhs))
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.gpu
def test_torch_cuda_tensors_stay_on_the_device():
    x = torch.tensor(X, device="cuda", requires_grad=True)
    y = torch.tensor(Y, device="cuda")
    x_i, y_j = TorchLazyTensor(x[:, None, :]), TorchLazyTensor(y[None, :, :])
    a = (-((x_i - y_j) ** 2).sum(-1)).exp().sum(dim=1, backend="cuda")
    dense = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)).sum(1, keepdim=True)
    assert a.device == x.device
    torch.testing.assert_close(a, dense)
    g, = torch.autograd.grad(a.sum(), x)
    g_dense, = torch.autograd.grad(dense.sum(), x)
    assert g.device == x.device
    torch.testing.assert_close(g, g_dense)


def test_callfun_runs_the_reduction_over_symbolic_then_fixed_arrays():
    """pykeops's `r.callfun(*args, *r.variables)` (issue 21 part 5): the fixed arrays may be given anew."""
    import torch
    from kred.torch import LazyTensor, Vi
    rng = np.random.default_rng(3)
    x, y, b = (torch.from_numpy(rng.random(s)) for s in ((20, 3), (15, 3), (15, 2)))
    r = ((-((Vi(0, 3) - LazyTensor(y[None])) ** 2).sum(-1)).exp() * LazyTensor(b[None])).sum(1, call=False)
    dense = lambda y, b: torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b       # noqa: E731
    assert [tuple(v.shape) for v in r.variables] == [(15, 3), (15, 2)]
    torch.testing.assert_close(r.callfun(x, *r.variables), dense(y, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.callfun(x, y + 1, 2 * b), dense(y + 1, 2 * b), rtol=1e-12, atol=1e-12)
    with pytest.raises(ArgumentError, match="callfun"):
        r.callfun(x)


def test_deferred_solve_has_callfun_and_its_gradient():
    """pykeops's tutorial `plot_test_invkernel_torch_helper`: `cfun = K.solve(Vi(b), alpha=a, call=False)`, then
    `cfun()`, `cfun.callfun` (the KernelSolve) and a gradient through the solve, against torch.linalg.solve."""
    import torch
    from kred.torch import LazyTensor, Vi, Vj
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.random((60, 2))).requires_grad_()
    b = torch.from_numpy(rng.random((60, 2)))
    alpha, sigma = 0.01, 0.3
    K = LazyTensor.exp(-LazyTensor.sum((Vi(x) - Vj(x)) ** 2, dim=2) / (2 * sigma ** 2))
    cfun = K.solve(Vi(b), alpha=alpha, eps=1e-12, call=False)      # CG to float64 precision
    gauss = torch.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * sigma ** 2))
    dense = alpha * torch.eye(60, dtype=torch.float64) + gauss
    want = torch.linalg.solve(dense, b)
    c = cfun()
    torch.testing.assert_close(c, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cfun.callfun(*cfun.variables, alpha=alpha, eps=1e-12), want, rtol=1e-9, atol=1e-10)
    e = torch.from_numpy(rng.random((60, 2)))
    got, = torch.autograd.grad(c, x, e)
    expected, = torch.autograd.grad(want, x, e)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-8)
