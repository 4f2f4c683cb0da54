"""The pykeops LazyTensor methods of the ops added for issue 13, and the new rows' gradients, against torch autograd
on dense torch code written here (float64, reference backend). Values of every row on every backend are in
tests/test_ops.py; here the LazyTensor spelling and differentiation are checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kred.torch as kt
from kred.engine.errors import ArgumentError, FormulaError

N, M = 5, 4
torch.manual_seed(13)


def data(*dims):
    return [torch.randn(n, d, dtype=torch.float64, requires_grad=True) for n, d in dims]


def check(lazy_fn, dense_fn, *tensors):
    """sum_j of the LazyTensor expression (and its gradients) against the dense (N, M, D) torch expression."""
    got = lazy_fn(*[kt.LazyTensor(t[:, None] if k == 0 else t[None]) for k, t in enumerate(tensors)])
    got = got.sum(dim=1, backend="reference")
    want = dense_fn(*[t[:, None] if k == 0 else t[None] for k, t in enumerate(tensors)]).sum(1)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    grads = torch.autograd.grad((got * g).sum(), tensors)
    wants = torch.autograd.grad((want * g).sum(), tensors)
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b)


def test_keops_tensordot_and_kron():
    a, b = data((N, 6), (M, 6))

    def dense_dot(a, b):
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return torch.einsum("...ik,...kl->...il", a.expand(shape + (6,)).reshape(shape + (2, 3)),
                            b.expand(shape + (6,)).reshape(shape + (3, 2))).reshape(shape + (4,))

    check(lambda a, b: a.keops_tensordot(b, (2, 3), (3, 2), (1,), (0,)), dense_dot, a, b)

    def dense_kron(a, b):
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return torch.einsum("...ij,...kl->...ikjl", a.expand(shape + (6,)).reshape(shape + (2, 3)),
                            b.expand(shape + (6,)).reshape(shape + (3, 2))).reshape(shape + (36,))

    check(lambda a, b: a.keops_kron(b, [2, 3], [3, 2]), dense_kron, a, b)
    with pytest.raises(FormulaError, match="differ in size"):
        kt.LazyTensor(a[:, None]).keops_tensordot(kt.LazyTensor(b[None]), (2, 3), (3, 2), (0,), (0,))


def test_difference_matrix():
    x, y = data((N, 3), (M, 2))
    check(lambda x, y: x.difference_matrix(y) * 1.5,
          lambda x, y: (x[..., :, None] - y[..., None, :]).reshape(N, M, 6) * 1.5, x, y)


def test_softdtw_sqdist():
    x, y = data((N, 3), (M, 2))        # small series: the gradient formula grows with n * m
    check(lambda x, y: x.softdtw_sqdist(y, 0.5), lambda x, y: softdtw(x.expand(N, M, 3), y.expand(N, M, 2), 0.5),
          x, y)


def softdtw(x, y, gamma):
    """The textbook recursion with infinite borders, in torch (differentiable)."""
    n, m = x.shape[-1], y.shape[-1]
    inf = torch.full(x.shape[:-1], float("inf"), dtype=x.dtype)
    R = {(0, 0): torch.zeros(x.shape[:-1], dtype=x.dtype)}
    for i in range(1, n + 1):
        R[i, 0] = inf
    for j in range(1, m + 1):
        R[0, j] = inf
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            r = torch.stack([R[i - 1, j - 1], R[i - 1, j], R[i, j - 1]], -1)
            R[i, j] = (x[..., i - 1] - y[..., j - 1]) ** 2 - gamma * torch.logsumexp(-r / gamma, -1)
    return R[n, m][..., None]


def test_bspline_values():
    from scipy.interpolate import BSpline
    knots = np.sort(np.random.default_rng(1).uniform(-2, 2, 7))
    x = torch.linspace(-1.9, 1.9, N, dtype=torch.float64)[:, None]
    lazy = kt.LazyTensor(torch.tensor(knots)[None, None, :]).bspline(kt.LazyTensor(x[:, None]), 2)
    got = (lazy * kt.LazyTensor(torch.ones(M, 1, dtype=torch.float64)[None])).sum(dim=1, backend="reference")
    want = np.stack([[np.nan_to_num(BSpline.basis_element(knots[k:k + 4], extrapolate=False)(v))
                      for k in range(4)] for v in x[:, 0].numpy()]) * M
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_grad_matrix_trace_operator_and_factorize():
    x, y = data((N, 3), (M, 3))
    check(lambda x, y: (x * (x * y).sum()).grad_matrix(x),
          lambda x, y: ((x * y).sum(-1)[..., None, None] * torch.eye(3, dtype=x.dtype)
                        + x[..., :, None] * y[..., None, :]).reshape(N, M, 9), x, y)
    A = torch.randn(N, 9, dtype=torch.float64)
    v = kt.Vj(1, 3)             # symbolic: the trace no longer reads it, so the reduction asks for A alone
    trace = kt.LazyTensor(A[:, None]).matvecmult(v).trace_operator(v).sum(dim=1)
    torch.testing.assert_close(trace, A[:, [0, 4, 8]].sum(-1, keepdims=True))
    K = (-(kt.LazyTensor(x[:, None]).sqdist(kt.LazyTensor(y[None])))).exp()
    assert K.factorize(kt.LazyTensor(x[:, None])).formula == K.formula == K.auto_factorize().formula
    with pytest.raises(ArgumentError, match="variable"):
        kt.LazyTensor(x[:, None]).grad_matrix(kt.LazyTensor(x[:, None]) * 2)


def test_gradient_of_a_dynamic_programme_builds_in_linear_size():
    """Regression: the gradient of SoftDTW_SqDist (a DAG whose shared nodes expand, as text, into exponentially
    many paths) made the plan key (once the formula's text) exhaust memory; the key is now linear in the DAG."""
    from kred.engine.formula import fingerprint, to_text
    from kred.numpy import Genred

    op = Genred("Grad(SoftDTW_SqDist(x, y, g), x, c)", ["x = Vi(6)", "y = Vj(6)", "g = Pm(1)", "c = Vi(1)"], axis=1)
    nodes = len(op.plan.formula.postorder())
    assert len(fingerprint(op.plan.formula)) < 100 * nodes
    small = Genred("Grad(SoftDTW_SqDist(x, y, g), x, c)", ["x = Vi(3)", "y = Vj(2)", "g = Pm(1)", "c = Vi(1)"],
                   axis=1).plan.formula
    assert len(to_text(small)) > len(fingerprint(small))       # the tree text repeats shared nodes
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    got = op(x, y, np.array([0.5]), np.ones((4, 1)), backend="reference")
    xt = torch.tensor(x, requires_grad=True)
    want = torch.autograd.grad(softdtw(xt[:, None].expand(4, 3, 6), torch.tensor(y)[None].expand(4, 3, 6), 0.5)
                               .sum(), xt)[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-9)


@pytest.mark.parametrize("formula, aliases", [
    ("GradMatrix(SumT(Sum(Exp(x) * Sin(x)), 4096), x)", ["x = Vi(8)"]),
    ("ComplexMult(z, z)", ["z = Vi(40000)"]),
    ("ComplexSumT(z, 20000)", ["z = Vi(2)"]),
    ("Real2Complex(x)", ["x = Vi(9000)"]),
    ("TensorDot(a, b, Ind(256,256), Ind(256,256), Ind(1), Ind(0))", ["a = Vi(65536)", "b = Vj(65536)"]),
    ("SoftDTW_SqDist(x, y, g)", ["x = Vi(200)", "y = Vj(200)", "g = Pm(1)"]),
])
def test_composites_refuse_to_expand_past_their_bound(formula, aliases):
    """Every byte of a formula may come from a client: no composite may expand without bound."""
    from kred.engine.numpy import Genred
    with pytest.raises(FormulaError, match="limit"):
        Genred(formula, aliases, axis=1)
