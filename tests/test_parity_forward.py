"""Forward-mode autodiff through kred.torch (torch.func.jvp, jacfwd, hessian), against torch.func on dense torch
code written here (float64, reference backend)."""
from __future__ import annotations

import pytest
import torch

from kred.engine.errors import FormulaError
from kred.torch import Genred, LazyTensor

torch.manual_seed(13)
X = torch.randn(5, 2, dtype=torch.float64)
Y = torch.randn(4, 2, dtype=torch.float64)
B = torch.randn(4, 1, dtype=torch.float64)
S = torch.tensor([0.7], dtype=torch.float64)


def lazy_sum(x, y, s):
    K = (-LazyTensor(x[:, None]).sqdist(LazyTensor(y[None])) * LazyTensor(s)).exp()
    return (K * LazyTensor(B[None])).sum(dim=1, backend="reference")


def dense_sum(x, y, s):
    return torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) * s) @ B


def lazy_lse(x, y, s):
    return (-LazyTensor(x[:, None]).sqdist(LazyTensor(y[None])) * LazyTensor(s)).logsumexp(dim=0, backend="reference")


def dense_lse(x, y, s):
    return torch.logsumexp(-((x[:, None] - y[None]) ** 2).sum(-1) * s, 0)[:, None]


def lazy_lse_weight(x, y, s):
    f = -LazyTensor(x[:, None]).sqdist(LazyTensor(y[None])) * LazyTensor(s)
    w = (LazyTensor(y[None]) ** 2).sum(-1).exp()            # a positive weight that depends on y
    return f.logsumexp(dim=1, weight=w, backend="reference")


def dense_lse_weight(x, y, s):
    f = -((x[:, None] - y[None]) ** 2).sum(-1) * s
    return torch.log((f.exp() * (y ** 2).sum(-1).exp()).sum(1))[:, None]


def lazy_softmax(x, y, s):
    f = -LazyTensor(x[:, None]).sqdist(LazyTensor(y[None])) * LazyTensor(s)
    return f.sumsoftmaxweight(LazyTensor(y[None]).sin() * LazyTensor(s), dim=1, backend="reference")


def dense_softmax(x, y, s):
    weights = torch.softmax(-((x[:, None] - y[None]) ** 2).sum(-1) * s, 1)
    return weights @ (torch.sin(y) * s)


@pytest.mark.parametrize("lazy, dense", [(lazy_sum, dense_sum), (lazy_lse, dense_lse),
                                         (lazy_lse_weight, dense_lse_weight), (lazy_softmax, dense_softmax)],
                         ids=["sum", "logsumexp", "logsumexp-weight", "sumsoftmaxweight"])
def test_jvp_and_jacfwd_match_dense(lazy, dense):
    tangents = (torch.randn_like(X), torch.randn_like(Y), torch.randn_like(S))
    got = torch.func.jvp(lazy, (X, Y, S), tangents)
    want = torch.func.jvp(dense, (X, Y, S), tangents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for argnums in (0, 1, 2, (0, 1)):
        got = torch.func.jacfwd(lazy, argnums=argnums)(X, Y, S)
        want = torch.func.jacfwd(dense, argnums=argnums)(X, Y, S)
        torch.testing.assert_close(got, want)


def test_hessian_matches_dense():
    got = torch.func.hessian(lambda x: lazy_sum(x, Y, S).sum())(X)
    want = torch.func.hessian(lambda x: dense_sum(x, Y, S).sum())(X)
    torch.testing.assert_close(got, want)
    got = torch.func.hessian(lambda y: lazy_lse(X, y, S).square().sum())(Y)
    want = torch.func.hessian(lambda y: dense_lse(X, y, S).square().sum())(Y)
    torch.testing.assert_close(got, want)


def test_genred_jvp_and_a_refusal_naming_reverse_mode():
    op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)"], axis=1)
    u = torch.randn_like(B)
    _, got = torch.func.jvp(lambda b: op(X, Y, b, backend="reference"), (B,), (u,))
    torch.testing.assert_close(got, torch.exp(-((X[:, None] - Y[None]) ** 2).sum(-1)) @ u)
    minimum = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op="Min", axis=1)
    with pytest.raises(FormulaError, match="use reverse mode"):
        torch.func.jvp(lambda x: minimum(x, Y, backend="reference"), (X,), (torch.randn_like(X),))


def test_jvp_along_an_argument_the_formula_does_not_read_is_zero():
    op = Genred("Exp(-SqDist(x, y))", ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)"], axis=1)
    value, tangent = torch.func.jvp(lambda b: op(X, Y, b, backend="reference"), (B,), (torch.randn_like(B),))
    torch.testing.assert_close(value, torch.exp(-((X[:, None] - Y[None]) ** 2).sum(-1)).sum(1, keepdims=True))
    torch.testing.assert_close(tangent, torch.zeros_like(value))
