"""torch.func.vmap over kred.torch.Genred with pykeops's batch shapes (the mapped axis outside the arguments' own
batch axes), and Genred with aliases its formula does not use; against dense torch written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.engine.errors import ArgumentError
from kred.numpy import Genred as NumpyGenred
from kred.torch import Genred

torch.manual_seed(13)
OP = Genred("Exp(-SqDist(x, y) * s) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "s = Pm(1)"], axis=1)
B = torch.randn(7, 1, dtype=torch.float64)


def dense(x, y, b, s):
    return torch.exp(-((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1) * s[..., None]) @ b


def test_vmap_over_arguments_with_their_own_batch_axes():
    xs = torch.randn(5, 6, 3, dtype=torch.float64)          # mapped, no batch axis of its own
    ys = torch.randn(5, 4, 7, 3, dtype=torch.float64)       # mapped, batch axis (4,) of its own
    s = torch.rand(5, 1, dtype=torch.float64)                # a mapped parameter
    got = torch.func.vmap(lambda x, y, s: OP(x, y, B, s, backend="reference"))(xs, ys, s)
    want = torch.func.vmap(lambda x, y, s: dense(x, y, B, s))(xs, ys, s)
    assert got.shape == (5, 4, 6, 1)
    torch.testing.assert_close(got, want)
    # an unmapped argument with its own batch axes, and a gradient under vmap
    y4 = torch.randn(4, 7, 3, dtype=torch.float64)
    got = torch.func.vmap(torch.func.grad(lambda x: OP(x, y4, B, s[0], backend="reference").sum()))(xs)
    want = torch.func.vmap(torch.func.grad(lambda x: dense(x, y4, B, s[0]).sum()))(xs)
    torch.testing.assert_close(got, want)


def test_genred_accepts_aliases_the_formula_does_not_use():
    rng = np.random.default_rng(0)
    x, y, b, p = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 1)), np.ones(2)
    op = NumpyGenred("SqNorm2(x)", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "p = Pm(2)"], axis=1)
    got = op(x, y, b, p, backend="reference")
    np.testing.assert_allclose(got, 4 * (x ** 2).sum(1, keepdims=True), rtol=1e-12)   # M = 4 columns, from y


# Weighted LogSumExp of a LazyTensor under every torch.func transform (pykeops's test_torch_func_logsumexp: it spells
# the weight `other=`, the keyword of pykeops's `reduction`; `weight=` is the documented one), against torch's own
# dense logsumexp with the weight's log added.
X = torch.randn(2, 3, 5, 1, 2, dtype=torch.float64) * 0.5
Y = torch.randn(2, 1, 1, 4, 2, dtype=torch.float64) * 0.5
W = torch.rand(2, 3, 1, 4, 1, dtype=torch.float64) + 0.5
TANGENTS = tuple(torch.randn_like(t) for t in (X, Y, W))


def dense_weighted_logsumexp(x, y, w):
    d2 = ((x - y) ** 2).sum(-1, keepdim=True)
    return torch.logsumexp(d2 + w.log(), dim=2).norm()


def lazy_weighted_logsumexp(keyword):
    from kred.torch import LazyTensor

    def f(x, y, w):
        d2 = ((LazyTensor(x) - LazyTensor(y)) ** 2).sum(-1)
        return d2.logsumexp(axis=2, **{keyword: LazyTensor(w)}).norm()
    return f


TRANSFORMS = {
    "vmap": lambda f: torch.func.vmap(f)(X, Y, W),
    "grad": lambda f: torch.func.grad(f, (0, 1, 2))(X, Y, W),
    "vjp": lambda f: torch.func.vjp(f, X, Y, W)[1](torch.tensor(1.0, dtype=torch.float64)),
    "jvp": lambda f: torch.func.jvp(f, (X, Y, W), TANGENTS),
    "jacrev": lambda f: torch.func.jacrev(f, (0, 1, 2))(X, Y, W),
    "jacfwd": lambda f: torch.func.jacfwd(f, (0, 1, 2))(X, Y, W),
    "hessian": lambda f: torch.func.hessian(f)(X[:1, :1], Y[:1], W[:1, :1]),
}


@pytest.mark.parametrize("keyword", ["weight", "other"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_weighted_logsumexp_under_torch_func(transform, keyword):
    got = TRANSFORMS[transform](lazy_weighted_logsumexp(keyword))
    want = TRANSFORMS[transform](dense_weighted_logsumexp)
    torch.testing.assert_close(got, want)


def test_weighted_logsumexp_refuses_two_weights():
    from kred.torch import LazyTensor
    d2 = ((LazyTensor(X) - LazyTensor(Y)) ** 2).sum(-1)
    with pytest.raises(ArgumentError, match="weight"):
        d2.logsumexp(axis=2, weight=LazyTensor(W), other=LazyTensor(W))
