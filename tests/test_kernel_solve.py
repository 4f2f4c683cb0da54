"""KernelSolve (numpy and torch): residual of (alpha I + K) a = b, and gradients against dense torch.linalg.solve."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.engine.errors import ArgumentError, FormulaError
from kred.engine.kernel_solve import conjugate_gradient
from kred.engine.numpy import KernelSolve as NumpyKernelSolve
from kred.engine.torch import KernelSolve

ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)", "s = Pm(1)"]
FORMULA = "Exp(-SqDist(x, y) * s) * b"


def _dense_kernel(x, y, s):
    return torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) * s)


def _data(n=60, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)).astype(dtype), rng.standard_normal((n, 2)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [0, 1])
def test_numpy_residual(axis, dtype, backend):
    x, b = _data(dtype=dtype)
    aliases = ALIASES if axis == 1 else ["x = Vj(3)", "y = Vi(3)", "b = Vi(2)", "s = Pm(1)"]
    s = np.array([0.5], dtype)
    a = NumpyKernelSolve(FORMULA, aliases, "b", axis=axis)(x, x, b, s, alpha=0.1, backend=backend)
    assert a.dtype == dtype and a.shape == b.shape
    K = _dense_kernel(torch.from_numpy(x).double(), torch.from_numpy(x).double(), 0.5).numpy()
    residual = 0.1 * a + K @ a - b
    assert np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(b)


def test_torch_solution_and_gradients_match_dense_solve(backend):
    x, b = (torch.from_numpy(t) for t in _data(n=40, seed=1))
    s = torch.tensor([0.7], dtype=torch.float64)
    alpha = 0.2
    solve = KernelSolve(FORMULA, ALIASES, "b", axis=1)
    results = []
    for fn in (lambda x, b, s: solve(x, x, b, s, alpha=alpha, eps=1e-10, backend=backend),
               lambda x, b, s: torch.linalg.solve(alpha * torch.eye(len(x), dtype=x.dtype) + _dense_kernel(x, x, s),
                                                  b)):
        inputs = [t.clone().requires_grad_() for t in (x, b, s)]
        a = fn(*inputs)
        weight = torch.linspace(-1, 1, a.numel(), dtype=a.dtype).reshape(a.shape)
        grads = torch.autograd.grad((a * weight).sum(), inputs, create_graph=True)
        second = torch.autograd.grad((grads[0] ** 2).sum(), inputs)          # differentiable backward
        results.append([a, *grads, *second])
    for k, (got, want) in enumerate(zip(*results)):
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-6, atol=1e-8,
                                   err_msg=f"output {k}")


def test_non_symmetric_system_uses_the_transpose(backend):
    """K(x_i, y_j) with different x and y: the gradient with respect to b solves with K^T."""
    rng = np.random.default_rng(2)
    x, y = torch.from_numpy(rng.standard_normal((30, 3))), torch.from_numpy(rng.standard_normal((30, 3)))
    b = torch.from_numpy(rng.standard_normal((30, 2)))
    s = torch.tensor([0.3], dtype=torch.float64)
    # (alpha I + K) is not symmetric, so CG is not guaranteed; alpha = 30 makes it diagonally dominant.
    inputs = [t.clone().requires_grad_() for t in (x, y, b)]
    a = KernelSolve(FORMULA, ALIASES, "b", axis=1)(*inputs, s, alpha=30.0, eps=1e-12, backend=backend)
    dense_inputs = [t.clone().requires_grad_() for t in (x, y, b)]
    want = torch.linalg.solve(30.0 * torch.eye(30, dtype=torch.float64) + _dense_kernel(*dense_inputs[:2], s),
                              dense_inputs[2])
    np.testing.assert_allclose(a.detach().numpy(), want.detach().numpy(), rtol=1e-7, atol=1e-9)
    weight = torch.ones_like(want)
    for got, ref in zip(torch.autograd.grad((a * weight).sum(), inputs),
                        torch.autograd.grad((want * weight).sum(), dense_inputs)):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-8)


def test_gradcheck():
    x, b = (torch.from_numpy(t) for t in _data(n=6, seed=3))
    s = torch.tensor([0.9], dtype=torch.float64)
    solve = KernelSolve(FORMULA, ALIASES, "b", axis=1)
    inputs = tuple(t.clone().requires_grad_() for t in (x, b, s))
    assert torch.autograd.gradcheck(lambda x, b, s: solve(x, x, b, s, alpha=0.5, eps=1e-12), inputs)


def test_conjugate_gradient_per_column_and_vector():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((8, 8))
    spd = q @ q.T
    b = rng.standard_normal((8, 3))
    b[:, 1] = 0                                       # a zero column stays zero
    a = conjugate_gradient(lambda v: spd @ v, b, alpha=1.0, eps=1e-12)
    np.testing.assert_allclose(a, np.linalg.solve(np.eye(8) + spd, b), atol=1e-10)
    vector = conjugate_gradient(lambda v: spd @ v, b[:, 0], alpha=1.0, eps=1e-12)
    assert vector.shape == (8,)
    np.testing.assert_allclose(vector, a[:, 0], atol=1e-10)


@pytest.mark.parametrize("formula, varinv, error, message", [
    (FORMULA, "c", ArgumentError, "varinvalias 'c' is not one of the aliases"),
    ("Exp(-SqDist(x, y)) * Square(b)", "b", FormulaError, "must be linear in b"),
    ("Exp(-SqDist(x, y)) * x", "x", FormulaError, "must be indexed by j"),
    ("Exp(-SqDist(x, y)) * Elem(b, 0)", "b", FormulaError, "dimension 1 but b has dimension 2"),
])
def test_errors_name_the_problem(formula, varinv, error, message):
    with pytest.raises(error, match=message):
        KernelSolve(formula, ALIASES, varinv, axis=1)


def test_pykeops_constructor_arguments_positionally():
    # numpy order: formula, aliases, varinvalias, axis, dtype, opt_arg, dtype_acc, use_double_acc, ...;
    # torch order: formula, aliases, varinvalias, axis, dtype_acc, use_double_acc, sum_scheme, ...
    x, b = _data(n=30, seed=3)
    s = np.array([0.5])
    K = _dense_kernel(torch.from_numpy(x), torch.from_numpy(x), 0.5).numpy()
    want = np.linalg.solve(0.1 * np.eye(30) + K, b)
    a = NumpyKernelSolve(FORMULA, ALIASES, "b", 1, "float64", None, "float64", True, "block_sum", True, None, True)(
        x, x, b, s, alpha=0.1, eps=1e-12)
    np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-8)
    t = KernelSolve(FORMULA, ALIASES, "b", 1, "float64", True, "block_sum", True, None, "float64", None, True)(
        *(torch.from_numpy(v) for v in (x, x, b, s)), alpha=0.1, eps=1e-12)
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-6, atol=1e-8)
