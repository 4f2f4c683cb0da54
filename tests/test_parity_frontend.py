"""pykeops 2.3 call forms of the front ends (issue 13): reduction keywords, tuning options, generic_* helpers,
LazyTensor attributes, solve(call=False), scipy operators on torch LazyTensors.

Oracles are dense numpy / torch computations written here, in float64, on the reference backend (no compiles).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator

import kred.numpy as kn
import kred.torch as kt
from kred.engine.errors import ArgumentError

N, M = 8, 6
RNG = np.random.default_rng(13)
X = RNG.standard_normal((N, 3))
Y = RNG.standard_normal((M, 3))
B = RNG.standard_normal((M, 2))
W = RNG.uniform(0.5, 2.0, (M, 1))


def gauss(x, y):
    return np.exp(-((x[:, None] - y[None]) ** 2).sum(-1))


def kernel(binding, x, y):
    x_i, y_j = binding.LazyTensor(x[:, None, :]), binding.LazyTensor(y[None, :, :])
    return (-((x_i - y_j) ** 2).sum(-1)).exp()


# Reduction keywords ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["auto", "direct_sum", "block_sum", "kahan_scheme"])
def test_matmul_takes_reduction_keywords_numpy(scheme):
    K = kernel(kn, X, Y)
    out = np.empty((N, 2))
    got = K.__matmul__(B, sum_scheme=scheme, out=out, backend="reference")
    assert got is out
    np.testing.assert_allclose(out, gauss(X, Y) @ B, rtol=1e-12)
    out1 = np.empty(N)                                  # a vector: out has the vector's shape
    assert K.__matmul__(B[:, 0], out=out1, backend="reference") is out1
    np.testing.assert_allclose(out1, gauss(X, Y) @ B[:, 0], rtol=1e-12)


def test_matmul_takes_reduction_keywords_torch():
    x, y, b = map(torch.tensor, (X, Y, B))
    K = kernel(kt, x, y)
    out = torch.empty(N, 2, dtype=torch.float64)
    got = K.__matmul__(b, sum_scheme="block_sum", out=out, backend="reference", enable_chunks=False)
    assert got is out
    torch.testing.assert_close(out, torch.tensor(gauss(X, Y) @ B))


def test_tuning_options_are_accepted_and_sum_scheme_is_checked():
    K = kernel(kn, X, Y)
    options = dict(sum_scheme="kahan_scheme", enable_chunks=False, use_fast_math=False, optional_flags=["-O2"],
                   rec_multVar_highdim=True, backend="reference")
    np.testing.assert_allclose(K.sum(dim=1, **options), gauss(X, Y).sum(1, keepdims=True), rtol=1e-12)
    with pytest.raises(ArgumentError, match="sum_scheme must be one of"):
        K.sum(dim=1, sum_scheme="fast", backend="reference")
    op = kn.Genred("Exp(-SqDist(x,y))", ["x = Vi(3)", "y = Vj(3)"], axis=1, sum_scheme="block_sum",
                   enable_chunks=False, rec_multVar_highdim=True, use_fast_math=False)
    np.testing.assert_allclose(op(X, Y, backend="reference"), gauss(X, Y).sum(1, keepdims=True), rtol=1e-12)
    with pytest.raises(ArgumentError, match="sum_scheme"):
        kn.Genred("Exp(-SqDist(x,y))", ["x = Vi(3)", "y = Vj(3)"], axis=1, sum_scheme="fast")
    for solver in (kn.KernelSolve, kt.KernelSolve):
        with pytest.raises(ArgumentError, match="sum_scheme"):
            solver("Exp(-SqDist(x,y))*b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], "b", axis=1, sum_scheme="x")


def test_logsumexp_weight_under_torch_func():
    x, y, w = map(torch.tensor, (X, Y, W))

    def lazy(x):
        x_i, y_j, w_j = kt.LazyTensor(x[:, None]), kt.LazyTensor(y[None]), kt.LazyTensor(w[None])
        return (-((x_i - y_j) ** 2).sum(-1)).logsumexp(dim=1, weight=w_j, backend="reference").sum()

    def dense(x):
        f = -((x[:, None] - y[None]) ** 2).sum(-1)
        return torch.log((f.exp() * w[:, 0]).sum(1)).sum()

    torch.testing.assert_close(torch.func.grad(lazy)(x), torch.func.grad(dense)(x))


def test_genred_logsumexp_reads_formula2_as_the_weight():
    op = kn.Genred("-SqDist(x,y)", ["x = Vi(3)", "y = Vj(3)", "w = Vj(1)"], reduction_op="LogSumExp", axis=1,
                   formula2="w")
    want = np.log((gauss(X, Y) * W[:, 0]).sum(1, keepdims=True))
    np.testing.assert_allclose(op(X, Y, W, backend="reference"), want, rtol=1e-12)


def test_solve_with_call_false_solves_when_called():
    K = kernel(kn, X, X)
    K.backend = "reference"
    rhs = RNG.standard_normal((N, 2))
    later = K.solve(rhs, alpha=0.5, eps=1e-12, call=False)
    want = np.linalg.solve(gauss(X, X) + 0.5 * np.eye(N), rhs)
    np.testing.assert_allclose(later(), want, rtol=1e-8, atol=1e-10)
    with pytest.raises(ArgumentError, match="takes no arrays"):
        later(rhs)


def test_solve_with_call_false_builds_its_kernel_solve_once(monkeypatch):
    built = []
    original = kn.LazyTensor._kernel_solve_class()

    class Counted(original):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kn.LazyTensor, "_kernel_solve_class", staticmethod(lambda: Counted))
    K = kernel(kn, X, X)
    K.backend = "reference"
    rhs = RNG.standard_normal((N, 2))
    later = K.solve(rhs, alpha=0.5, eps=1e-12, call=False)
    for alpha in (0.5, 2.0, 0.5):               # a call's options override the ones given before
        want = np.linalg.solve(gauss(X, X) + alpha * np.eye(N), rhs)
        np.testing.assert_allclose(later(alpha=alpha), want, rtol=1e-8, atol=1e-10)
    assert len(built) == 1
    assert later.callfun is later.callfun
    np.testing.assert_allclose(later(dtype_acc="float64"), np.linalg.solve(gauss(X, X) + 0.5 * np.eye(N), rhs),
                               rtol=1e-8, atol=1e-10)
    assert len(built) == 2                      # an option that shapes the plan builds another


# generic_* helpers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binding", [kn, kt], ids=["numpy", "torch"])
def test_generic_helpers(binding):
    convert = (lambda a: a) if binding is kn else torch.tensor
    x, y = convert(X), convert(Y)
    d2 = ((X[:, None] - Y[None]) ** 2).sum(-1)

    def value(a):
        return a.numpy() if isinstance(a, torch.Tensor) else a

    total = binding.generic_sum("Exp(-SqDist(x,y))", "a = Vi(1)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_allclose(value(total(x, y, backend="reference")), np.exp(-d2).sum(1, keepdims=True), rtol=1e-12)
    over_i = binding.generic_sum("Exp(-SqDist(x,y))", "a = Vj(1)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_allclose(value(over_i(x, y, backend="reference")), np.exp(-d2).sum(0)[:, None], rtol=1e-12)
    lse = binding.generic_logsumexp("-SqDist(x,y)", "a = Vi(1)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_allclose(value(lse(x, y, backend="reference")), np.log(np.exp(-d2).sum(1, keepdims=True)),
                               rtol=1e-12)
    argmin = binding.generic_argmin("SqDist(x,y)", "a = Vi(1)", "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_array_equal(value(argmin(x, y, backend="reference"))[:, 0], d2.argmin(1))
    argkmin = binding.generic_argkmin("SqDist(x,y)", "a = Vi(3)", 3, "x = Vi(3)", "y = Vj(3)")
    np.testing.assert_array_equal(value(argkmin(x, y, backend="reference")), np.argsort(d2, 1)[:, :3])
    with pytest.raises(Exception, match="indexed by i"):
        binding.generic_sum("x", "a = Pm(3)", "x = Vi(3)")


# Attributes, symbolic calls, scipy ---------------------------------------------------------------------------

def test_lazytensor_attributes():
    x_i, y_j = kn.LazyTensor(X[:, None, :]), kn.LazyTensor(Y[None, :, :])
    K = (-((x_i - y_j) ** 2).sum(-1)).exp() * kn.Pm(np.array([2.0]))
    assert (K.ni, K.nj, K.axis, K.formula2, K.ranges, K.backend) == (N, M, None, None, None, None)
    assert [v.shape for v in K.variables] == [(N, 3), (M, 3), (1,)]
    assert K.symbolic_variables == ()
    u, v = kn.Vi(0, 3), kn.Vj(2, 3)
    assert (u - v).sqnorm2().symbolic_variables == ((0, 3, 0), (2, 3, 1))
    K.backend = "reference"
    assert (K * 1).backend == "reference"


def test_calling_a_torch_reduction_on_symbolic_variables():
    u, v = kt.Vi(0, 3), kt.Vj(1, 3)
    gaussian = (-((u - v) ** 2).sum(-1)).exp().sum(dim=1)
    got = gaussian(torch.tensor(X), torch.tensor(Y), backend="reference")
    torch.testing.assert_close(got, torch.tensor(gauss(X, Y).sum(1, keepdims=True)))


def test_scipy_aslinearoperator_on_a_torch_lazytensor():
    K = kernel(kt, torch.tensor(X), torch.tensor(Y))
    K.backend = "reference"
    operator = aslinearoperator(K)
    assert operator.shape == (N, M) and operator.dtype == np.float64
    np.testing.assert_allclose(operator.matvec(B[:, 0]), gauss(X, Y) @ B[:, 0], rtol=1e-12)
    np.testing.assert_allclose(operator.rmatvec(X[:, 0]), gauss(X, Y).T @ X[:, 0], rtol=1e-12)
    np.testing.assert_allclose(operator.matmat(B), gauss(X, Y) @ B, rtol=1e-12)


# Values that TorchDR passes (found by running its own tests on kred) ----------------------------------------------

@pytest.mark.parametrize("k", [torch.tensor(3), np.int64(3), torch.tensor([3])[0]], ids=["tensor", "numpy", "item"])
def test_k_may_be_any_integer_kind(k):
    """TorchDR's sparse affinities call `argKmin(K=torch.tensor(90))`: pykeops takes any integer."""
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    values, indices = kt.LazyTensor(x[:, None, :]).sqdist(kt.LazyTensor(y[None, :, :])).Kmin_argKmin(
        K=k, dim=1, backend="reference")
    want = torch.topk(d2, 3, dim=1, largest=False)
    assert torch.equal(indices, want.indices)
    torch.testing.assert_close(values, want.values, rtol=1e-12, atol=0)
    got = kn.Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="ArgKMin", axis=1, opt_arg=k)(
        X, Y, backend="reference")
    assert np.array_equal(got, want.indices.numpy())


@pytest.mark.parametrize("k", [torch.tensor(3.0), 3.0, torch.tensor(True), True])
def test_k_that_is_not_an_integer_is_refused_by_name(k):
    with pytest.raises(ArgumentError, match="the number K of neighbours"):
        kt.LazyTensor(torch.from_numpy(X)[:, None, :]).sqdist(
            kt.LazyTensor(torch.from_numpy(Y)[None, :, :])).argKmin(K=k, dim=1, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "CPU"])
def test_infinite_numbers_are_parameters(backend):
    """TorchDR's doubly stochastic affinity clamps with `clamp(0, float("inf"))`: a formula constant is finite, so
    an infinite (or nan) number is a parameter, as pykeops makes every number. Values and gradients against torch."""
    x = torch.from_numpy(X).requires_grad_()
    y = torch.from_numpy(Y)
    d = (x[:, None] - y[None]).sum(-1)
    want = (d.clamp(0, float("inf")) + d.clamp(float("-inf"), 0.5)).sum(1, keepdim=True)
    lazy = (kt.LazyTensor(x[:, None, :]) - kt.LazyTensor(y[None, :, :])).sum(-1)
    got = (lazy.clamp(0, float("inf")) + lazy.clamp(float("-inf"), 0.5)).sum(1, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    assert torch.isinf((lazy * float("inf")).max(1, backend=backend)).all()
    assert torch.isnan((lazy + float("nan")).sum(1, backend=backend)).all()
