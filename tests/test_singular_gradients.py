"""Gradients at singular points (coinciding points, zeros) follow pykeops's conventions, documented per op in the op
table (engine/formula/ops.py): finite where pykeops's are. Each case is checked on every backend against a dense
float64 torch oracle written here: torch's own op where torch takes the same convention (torch.cdist, abs, sinc,
pow), else the convention written out with a guarded `torch.where` (the value pykeops documents)."""
from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS

from kred.torch import Genred, LazyTensor

# Two coinciding points and one apart: every pair (i, i) has x_i - y_i = 0, the singular point.
X = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, -2.0]]


def _safe_rsqrt(s):
    """pykeops's Rsqrt: 0 at 0 (the double where keeps torch's gradient finite there)."""
    positive = s > 0
    return torch.where(positive, torch.where(positive, s, torch.ones_like(s)).rsqrt(), torch.zeros_like(s))


def _diff(x, y):
    return x[:, None, :] - y[None, :, :]


def _atan2_oracle(x, y):
    # 1/(a^2+b^2) taken as 0 at the origin: d atan2 = (b da - a db) * Rsqrt(a^2+b^2)^2
    d = _diff(x, y)
    a, b = d[..., :1], d[..., 1:2]
    value = torch.atan2(a.detach(), b.detach())
    inv = _safe_rsqrt((a * a + b * b).detach()) ** 2
    return (value + (b.detach() * (a - a.detach()) - a.detach() * (b - b.detach())) * inv).sum(1)


CASES = {
    # formula (x = Vi(3), y = Vj(3)), dense oracle (x, y) -> (N, 1)
    "Sqrt(SqDist)": ("Sqrt(SqDist(x, y))", lambda x, y: torch.cdist(x, y).sum(1, keepdim=True)),
    "Norm2": ("Norm2(x - y)", lambda x, y: torch.cdist(x, y).sum(1, keepdim=True)),
    "Exp(-Norm2)": ("Exp(-Norm2(x - y))", lambda x, y: torch.exp(-torch.cdist(x, y)).sum(1, keepdim=True)),
    "Rsqrt": ("Rsqrt(SqDist(x, y))", lambda x, y: _safe_rsqrt((_diff(x, y) ** 2).sum(-1)).sum(1, keepdim=True)),
    "Normalize": ("Sum(Normalize(x - y))",
                  lambda x, y: (_diff(x, y) * _safe_rsqrt((_diff(x, y) ** 2).sum(-1, keepdim=True))).sum((1, 2))[:, None]),
    "Abs": ("Sum(Abs(x - y))", lambda x, y: _diff(x, y).abs().sum((1, 2))[:, None]),
    "SinXDivX": ("Sum(SinXDivX(x - y))", lambda x, y: torch.sinc(_diff(x, y) / torch.pi).sum((1, 2))[:, None]),
    "Powf": ("Powf(SqDist(x, y), IntCst(3) / IntCst(2))",
             lambda x, y: ((_diff(x, y) ** 2).sum(-1) ** 1.5).sum(1, keepdim=True)),
    "Sign": ("Sum(Sign(x - y) * x)", lambda x, y: (torch.sign(_diff(x, y)).detach() * x[:, None]).sum((1, 2))[:, None]),
    "Atan2": ("Atan2(Elem(x - y, 0), Elem(x - y, 1))", _atan2_oracle),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_at_coinciding_points(case, backend):
    formula, dense = CASES[case]
    x = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    op = Genred(formula, ["x = Vi(3)", "y = Vj(3)"], reduction_op="Sum", axis=1)
    got = op(x, x, backend=backend)
    (gx,) = torch.autograd.grad(got.sum(), x)
    want = dense(x, x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    assert torch.isfinite(gx).all(), gx
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_repro_lazytensor_sqrt(backend):
    """The issue's minimal repro: the LazyTensor spelling of sum_j |x_i - x_j| at x = [[0,0,0],[1,0,0]]."""
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
    got = ((xi - xj) ** 2).sum(-1).sqrt().sum(1, backend=backend)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(torch.cdist(x, x).sum(), x)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gx, torch.tensor([[-2.0, 0, 0], [2.0, 0, 0]], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_powf_exponent_gradient_at_zero_base(backend):
    """d/dp x^p at x = 0 is 0 (torch's mask), not 0 * log(0) = NaN; d/dx is torch's p x^(p-1)."""
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[2.5], [0.5]], dtype=torch.float64, requires_grad=True)
    op = Genred("Powf(x, p)", ["x = Vi(1)", "p = Vj(1)"], reduction_op="Sum", axis=1)
    got = op(x, p, backend=backend)
    gx, gp = torch.autograd.grad(got.sum(), (x, p))
    want = torch.pow(x, p.T).sum(1, keepdim=True)
    wx, wp = torch.autograd.grad(want.sum(), (x, p))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gp, wp)
    torch.testing.assert_close(gx, wx)      # +inf at x = 0 from p = 0.5, as torch: a pole, not a kink
