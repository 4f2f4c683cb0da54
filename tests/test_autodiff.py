"""Symbolic gradients (`Grad`, `Diff`, `Divergence`, `Laplacian` inside formulas), through `engine.numpy.Genred`.

Oracles: central finite differences of the dense numpy rows of tests/test_ops.py (one per op of the table, so every
op's gradient rule is checked), and torch autograd on dense computations written here for kernels and the
derivative operators.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.engine.errors import DimensionError, FormulaError
from kred.engine.formula import parse, parse_aliases
from kred.engine.numpy import Genred
from test_ops import ROWS, _sample

N, M = 5, 4
STEP = 1e-5


# Every op row: Grad against finite differences ---------------------------------------------------------------

def _fd_domain(domain: str) -> str:
    """Exact zeros sit on kinks (Sign, Step, Rsqrt, XLogX), ties on the jumps of comparisons: differentiate away
    from them."""
    return {"with_zeros": "normal", "nonneg_zeros": "positive", "ties": "normal"}.get(domain, domain)


def _concat(parts: list[str]) -> str:
    text = parts[0]
    for part in parts[1:]:
        text = f"Concat({text}, {part})"
    return text


def _dense_loss(row, data: dict, cot: np.ndarray) -> float:
    """sum_ij <cot_i, f(x_i, y_j, p)>, with the dense formula of tests/test_ops.py."""
    shaped = {}
    for name, (cat, _, _) in row.variables.items():
        value = data[name]
        shaped[name] = value[None, None, :] if cat == "p" else value[:, None, :] if cat == "i" else value[None]
    values = np.asarray(row.dense(**shaped), dtype=np.float64)
    has_j = any(cat == "j" for cat, _, _ in row.variables.values())
    values = np.broadcast_to(values, (N, M if has_j else 1, values.shape[-1]))
    return float((values * cot[:, None, :]).sum())


def _finite_difference(row, data: dict, cot: np.ndarray, name: str) -> np.ndarray:
    out = np.zeros_like(data[name])
    for index in np.ndindex(*data[name].shape):
        shifted = {k: v.copy() for k, v in data.items()}
        shifted[name][index] += STEP
        up = _dense_loss(row, shifted, cot)
        shifted[name][index] -= 2 * STEP
        down = _dense_loss(row, shifted, cot)
        out[index] = (up - down) / (2 * STEP)
    return out


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.op}:{r.formula}" for r in ROWS])
def test_op_gradient_matches_finite_differences(row, backend):
    rng = np.random.default_rng(7)
    sizes = {"i": N, "j": M}
    data = {name: _sample(rng, _fd_domain(domain), (sizes[cat], dim) if cat in sizes else (dim,))
            for name, (cat, dim, domain) in row.variables.items()}
    aliases = [f"{name} = V{cat}({dim})" if cat != "p" else f"{name} = Pm({dim})"
               for name, (cat, dim, _) in row.variables.items()]
    fdim = parse(row.formula, parse_aliases(aliases)).dim
    aliases.append(f"cot = Vi({fdim})")
    cot = rng.standard_normal((N, fdim))
    args = [*data.values(), cot]
    # One reduction per group of targets: over j for the i-variables and parameters, over i for the j-variables.
    for cats, axis in ((("i", "p"), 1), (("j",), 0)):
        targets = [name for name, (cat, _, _) in row.variables.items() if cat in cats]
        if not targets:
            continue
        formula = _concat([f"Grad({row.formula}, {name}, cot)" for name in targets])
        got = Genred(formula, aliases, axis=axis)(*args, backend=backend)
        start = 0
        for name in targets:
            cat, dim, _ = row.variables[name]
            part = got[:, start:start + dim]
            start += dim
            if cat == "p":
                part = part.sum(0)
            want = _finite_difference(row, data, cot, name)
            scale = 1 + np.abs(want).max()
            np.testing.assert_allclose(part, want, rtol=0, atol=1e-6 * scale,
                                       err_msg=f"d/d{name} of {row.formula}")


# Kernels: first, second and third order against torch autograd ------------------------------------------------

KERNELS = {
    "gaussian": ("Exp(-SqDist(x, y)) * b", lambda x, y, b: torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b),
    "laplace": ("Exp(-Norm2(x - y)) * b",
                lambda x, y, b: torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1).sqrt()) @ b),
}
ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "e1 = Vi(1)", "e2 = Vi(3)", "e3 = Vi(3)"]


def _kernel_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, 1, generator=g, dtype=torch.float64)
    e1 = torch.randn(7, 1, generator=g, dtype=torch.float64)
    e2, e3 = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    return x, y, b, e1, e2, e3


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_derivatives_to_third_order(kernel, backend):
    formula, dense = KERNELS[kernel]
    x, y, b, e1, e2, e3 = _kernel_data()
    args = [t.numpy() for t in (x, y, b, e1, e2, e3)]
    first = f"Grad({formula}, x, e1)"
    second = f"Grad({first}, x, e2)"
    third = f"Grad({second}, x, e3)"
    # The same contractions by autograd: L1 = sum_i e1_i a_i, L2 = <e2, dL1/dx>, L3 = <e3, dL2/dx>.
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    l1 = (dense(xr, yr, b) * e1).sum()
    g1, = torch.autograd.grad(l1, xr, create_graph=True)
    g2, = torch.autograd.grad((g1 * e2).sum(), xr, create_graph=True)
    g3, = torch.autograd.grad((g2 * e3).sum(), xr, create_graph=True)
    for text, want in ((first, g1), (second, g2), (third, g3)):
        got = Genred(text, ALIASES, axis=1)(*args, backend=backend)
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-9, atol=1e-11, err_msg=text)
    # Mixed: the second derivative with respect to y, reduced over i (one row per y_j).
    gy, = torch.autograd.grad((g1 * e2).sum(), yr)
    got = Genred(f"Grad({first}, y, e2)", ALIASES, axis=0)
    np.testing.assert_allclose(got(*args, backend=backend), gy.numpy(), rtol=1e-9, atol=1e-11)


def test_gaussian_derivatives_stay_small():
    names = parse_aliases(ALIASES)
    f = "Exp(-SqDist(x, y)) * b"
    sizes = [len(parse(text, names).postorder()) for text in (
        f"Grad({f}, x, e1)", f"Grad(Grad({f}, x, e1), x, e2)", f"Grad(Grad(Grad({f}, x, e1), x, e2), x, e3)")]
    # Distinct nodes after simplification and sharing; unsimplified reverse mode gives 16, 27 and 44+.
    assert sizes[0] <= 16 and sizes[1] <= 25 and sizes[2] <= 40, sizes


# Diff, Divergence, Laplacian ---------------------------------------------------------------------------------

def _jacobian_rows(fn, x):
    """Per-row Jacobians d fn(x)_i / d x_i, shape (N, out, in), for fn acting row by row."""
    return torch.func.vmap(torch.func.jacrev(lambda row: fn(row[None])[0]))(x)


def test_diff_divergence_laplacian(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    u = torch.randn(6, 3, generator=g, dtype=torch.float64)
    aliases = ["x = Vi(3)", "y = Vj(3)", "u = Vi(3)"]
    args = [x.numpy(), y.numpy(), u.numpy()]

    def gaussian(xs):                                        # sum_j exp(-|x - y_j|^2), one value per row
        return torch.exp(-((xs[:, None] - y[None]) ** 2).sum(-1)).sum(1, keepdim=True)

    def field(xs):                                           # sum_j (x - y_j) exp(-|x - y_j|^2), in R^3
        d = xs[:, None] - y[None]
        return (d * torch.exp(-(d ** 2).sum(-1, keepdim=True))).sum(1)

    jac = _jacobian_rows(gaussian, x)                        # (N, 1, 3)
    want = (jac[:, 0, :] * u).sum(-1, keepdim=True)
    got = Genred("Diff(Exp(-SqDist(x, y)), x, u)", aliases, axis=1)(*args, backend=backend)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)

    jac = _jacobian_rows(field, x)                           # (N, 3, 3)
    want = jac.diagonal(dim1=1, dim2=2).sum(-1, keepdim=True)
    got = Genred("Divergence((x - y) * Exp(-SqDist(x, y)), x)", aliases, axis=1)(*args, backend=backend)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)

    hess = torch.func.vmap(torch.func.hessian(lambda row: gaussian(row[None])[0, 0]))(x)
    want = hess.diagonal(dim1=1, dim2=2).sum(-1, keepdim=True)
    got = Genred("Laplacian(Exp(-SqDist(x, y)), x)", aliases, axis=1)(*args, backend=backend)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


def test_grad_with_respect_to_a_parameter_and_unused_variable(backend):
    aliases = ["x = Vi(2)", "y = Vj(2)", "s = Pm(1)", "e = Vi(1)"]
    rng = np.random.default_rng(1)
    x, y, s, e = rng.standard_normal((4, 2)), rng.standard_normal((3, 2)), np.array([0.3]), rng.standard_normal((4, 1))
    got = Genred("Grad(Exp(-s * SqDist(x, y)), s, e)", aliases, axis=1)(x, y, s, e, backend=backend)
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    want = (e * (-d2 * np.exp(-s * d2))).sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # A formula that does not depend on the variable: the gradient is zero, of the variable's dimension.
    got = Genred("Grad(Exp(-SqDist(x, x)) * s, y, e)", aliases, axis=1)(x, y, s, e, backend=backend)
    assert got.shape == (4, 2) and not got.any()


@pytest.mark.parametrize("text, error, message", [
    ("Grad(Exp(x), Exp(x), e)", FormulaError, "must be a variable"),
    ("Grad(SqNorm2(x), x, y)", DimensionError, "cotangent has dimension 3"),
    ("Grad(Exp(x), x)", FormulaError, "Grad takes 3 formulas"),
    ("Diff(SqNorm2(x), x, e)", DimensionError, "direction has dimension 1"),
    ("Laplacian(x, x)", DimensionError, "must be scalar"),
    ("Divergence(SqNorm2(x), x)", DimensionError, "dimension 1 but the variable has dimension 3"),
])
def test_derivative_errors_name_the_problem(text, error, message):
    names = parse_aliases(["x = Vi(3)", "y = Vj(3)", "e = Vi(1)"])
    with pytest.raises(error, match=message):
        parse(text, names)
