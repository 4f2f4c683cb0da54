"""Every op of the formula language, through `engine.numpy.Genred`, against dense numpy written here.

One row per case: (op, formula, variables, dense). `variables` maps each alias to (category, dimension, domain);
`dense` receives the same data in float64, i-variables shaped (N, 1, d), j-variables (1, M, d) and parameters
(1, 1, d), and returns the N x M x dim values of the formula, which the test sums over j. Adding an op to
engine/formula/ops.py without a row here fails `test_every_op_has_a_row`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

from kred.engine.formula import OPS
from kred.engine.numpy import Genred

SIZES = [(1, 1), (7, 33), (33, 7)]
RTOL = {np.float32: 1e-5, np.float64: 1e-10}


class Row(NamedTuple):
    op: str
    formula: str
    variables: dict          # name -> (category "i" | "j" | "p", dimension, domain)
    dense: Callable


def i(dim, domain="normal"):
    return ("i", dim, domain)


def j(dim, domain="normal"):
    return ("j", dim, domain)


def p(dim, domain="normal"):
    return ("p", dim, domain)


# Domains: each op gets inputs where it is defined and well conditioned.
def _sample(rng, domain, shape):
    if domain == "normal":
        return rng.standard_normal(shape)
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "unit":                        # inside (-1, 1), for Asin / Acos of products
        return rng.uniform(-0.9, 0.9, shape)
    if domain == "with_zeros":                  # exact zeros hit the special cases (Sign, Step, SinXDivX...)
        values = rng.standard_normal(shape)
        values.reshape(-1)[::3] = 0.0
        return values
    if domain == "nonneg_zeros":
        values = rng.uniform(0.0, 2.0, shape)
        values.reshape(-1)[::3] = 0.0
        return values
    if domain == "sorted":                      # increasing, distinct knots (BSpline)
        return np.sort(rng.uniform(-2.0, 2.0, shape), -1) + np.arange(shape[-1]) * 1e-3
    if domain == "ties":                        # integers 0..2 stored as floats: comparisons meet equal values
        return rng.integers(0, 3, shape).astype(np.float64)
    if domain == "index5":                      # integers 0..4 stored as floats, for OneHot
        return rng.integers(0, 5, shape).astype(np.float64)
    raise AssertionError(domain)


# Dense references, written independently of the engine ---------------------------------------------------

def sq(v):
    return (v ** 2).sum(-1, keepdims=True)


def matvec(a, v):
    n = a.shape[-1] // v.shape[-1]
    shape = np.broadcast_shapes(a.shape[:-1], v.shape[:-1])
    a = np.broadcast_to(a, shape + a.shape[-1:]).reshape(shape + (n, v.shape[-1]))
    return np.einsum("...nm,...m->...n", a, np.broadcast_to(v, shape + v.shape[-1:]))


def vecmat(v, a):
    m = a.shape[-1] // v.shape[-1]
    shape = np.broadcast_shapes(a.shape[:-1], v.shape[:-1])
    a = np.broadcast_to(a, shape + a.shape[-1:]).reshape(shape + (v.shape[-1], m))
    return np.einsum("...n,...nm->...m", np.broadcast_to(v, shape + v.shape[-1:]), a)


def outer(a, b):
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return (a[..., :, None] * b[..., None, :]).reshape(shape + (a.shape[-1] * b.shape[-1],))


def concat(a, b):
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return np.concatenate([np.broadcast_to(a, shape + a.shape[-1:]), np.broadcast_to(b, shape + b.shape[-1:])], -1)


def place(v, start, n):
    out = np.zeros(v.shape[:-1] + (n,))
    out[..., start:start + v.shape[-1]] = v
    return out


def sinc(v):
    safe = np.where(v == 0, 1.0, v)
    return np.where(v == 0, 1.0, np.sin(safe) / safe)


def xlogx(v):
    return np.where(v == 0, 0.0, v * np.log(np.where(v == 0, 1.0, v)))


def weighted(s, v):
    d = v.shape[-1]
    if s.shape[-1] == 1:
        return s * sq(v)
    if s.shape[-1] == d:
        return (s * v ** 2).sum(-1, keepdims=True)
    return (v * matvec(s, v)).sum(-1, keepdims=True)


def bspline(t, x, order):
    """B-spline basis values by scipy, one basis element at a time (0 outside its support)."""
    from scipy.interpolate import BSpline
    shape = np.broadcast_shapes(t.shape[:-1], x.shape[:-1])
    t, x = np.broadcast_to(t, shape + t.shape[-1:]), np.broadcast_to(x, shape + (1,))
    out = np.zeros(shape + (t.shape[-1] - order - 1,))
    for index in np.ndindex(*shape):
        for k in range(out.shape[-1]):
            value = BSpline.basis_element(t[index][k:k + order + 2], extrapolate=False)(x[index][0])
            out[index + (k,)] = 0.0 if np.isnan(value) else value
    return out


def softdtw(x, y, gamma):
    """Soft-DTW by its textbook recursion, with R[0, 0] = 0 and infinite borders."""
    shape = np.broadcast_shapes(x.shape[:-1], y.shape[:-1], gamma.shape[:-1])
    x, y = np.broadcast_to(x, shape + x.shape[-1:]), np.broadcast_to(y, shape + y.shape[-1:])
    gamma = np.broadcast_to(gamma, shape + (1,))
    out = np.zeros(shape + (1,))
    for index in np.ndindex(*shape):
        a, b, g = x[index], y[index], gamma[index][0]
        R = np.full((len(a) + 1, len(b) + 1), np.inf)
        R[0, 0] = 0.0
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                r = np.array([R[i - 1, j - 1], R[i - 1, j], R[i, j - 1]])
                low = r.min()
                R[i, j] = (a[i - 1] - b[j - 1]) ** 2 + low - g * np.log(np.exp(-(r - low) / g).sum())
        out[index] = R[-1, -1]
    return out


def tensordot(a, b, shape_a, shape_b, subscripts):
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    a = np.broadcast_to(a, shape + a.shape[-1:]).reshape(shape + shape_a)
    b = np.broadcast_to(b, shape + b.shape[-1:]).reshape(shape + shape_b)
    return np.einsum(subscripts, a, b).reshape(shape + (-1,))


def cplx(v):
    """An interleaved (re, im) real array as a complex one."""
    return v[..., 0::2] + 1j * v[..., 1::2]


def real_pairs(c, like=()):
    """A complex array as interleaved (re, im) reals, broadcast against the arrays `like`."""
    c = np.broadcast_to(c, np.broadcast_shapes(c.shape[:-1], *(a.shape[:-1] for a in like)) + c.shape[-1:])
    out = np.empty(c.shape[:-1] + (2 * c.shape[-1],))
    out[..., 0::2], out[..., 1::2] = c.real, c.imag
    return out


ROWS = [
    # Leaves
    Row("Var", "x", {"x": i(3)}, lambda x: x),
    Row("Var", "y", {"y": j(2)}, lambda y: y),
    Row("Var", "Vi(0, 2) * Vj(1, 2)", {"x": i(2), "y": j(2)}, lambda x, y: x * y),
    Row("Var", "x * p", {"x": i(3), "p": p(3)}, lambda x, p: x * p),
    Row("IntCst", "x * 3 + IntCst(2)", {"x": i(3)}, lambda x: x * 3 + 2),
    Row("Const", "Const(0.25) * y + x * 1.5", {"x": i(1), "y": j(1)}, lambda x, y: 0.25 * y + 1.5 * x),
    Row("Zero", "Concat(Zero(2), x)", {"x": i(2)}, lambda x: concat(np.zeros((1, 1, 2)), x)),
    Row("Zero", "Exp(Zero(3)) * c", {"c": j(1)}, lambda c: np.ones((1, 1, 3)) * c),
    # Arithmetic with dim-1 broadcasting
    Row("Add", "x + y", {"x": i(3), "y": j(3)}, lambda x, y: x + y),
    Row("Add", "x + c", {"x": i(3), "c": j(1)}, lambda x, c: x + c),
    Row("Add", "b + y", {"b": i(1), "y": j(3)}, lambda b, y: b + y),
    Row("Subtract", "x - y", {"x": i(3), "y": j(3)}, lambda x, y: x - y),
    Row("Subtract", "b - y", {"b": i(1), "y": j(3)}, lambda b, y: b - y),
    Row("Mult", "x * y", {"x": i(3), "y": j(3)}, lambda x, y: x * y),
    Row("Mult", "b * y", {"b": i(1), "y": j(3)}, lambda b, y: b * y),
    Row("Mult", "x * c", {"x": i(3), "c": j(1)}, lambda x, c: x * c),
    Row("Divide", "x / y", {"x": i(3), "y": j(3, "positive")}, lambda x, y: x / y),
    Row("Divide", "x / c", {"x": i(3), "c": j(1, "positive")}, lambda x, c: x / c),
    Row("Divide", "b / y", {"b": i(1), "y": j(3, "positive")}, lambda b, y: b / y),
    Row("Minus", "-(x + y)", {"x": i(3), "y": j(3)}, lambda x, y: -(x + y)),
    Row("Inv", "Inv(y)", {"y": j(2, "positive")}, lambda y: 1 / y),
    Row("Square", "Square(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: (x - y) ** 2),
    Row("Sqrt", "Sqrt(x + y)", {"x": i(3, "positive"), "y": j(3, "positive")}, lambda x, y: np.sqrt(x + y)),
    Row("Rsqrt", "Rsqrt(x * y)", {"x": i(3, "positive"), "y": j(3, "positive")}, lambda x, y: 1 / np.sqrt(x * y)),
    Row("Rsqrt", "Rsqrt(x) * c", {"x": i(3, "nonneg_zeros"), "c": j(1)},   # Rsqrt(0) is 0, as in KeOps
        lambda x, c: np.where(x == 0, 0.0, 1 / np.sqrt(np.where(x == 0, 1.0, x))) * c),
    Row("Pow", "Pow(x - y, 3)", {"x": i(3), "y": j(3)}, lambda x, y: (x - y) ** 3),
    Row("Pow", "Pow(y, -2) * b", {"y": j(2, "positive"), "b": i(1)}, lambda y, b: y ** -2.0 * b),
    Row("Pow", "x ** 5", {"x": i(2)}, lambda x: x ** 5),
    Row("Pow", "Pow(x, 0) * c", {"x": i(2), "c": j(1)}, lambda x, c: np.ones_like(x) * c),
    Row("Powf", "Powf(y, x)", {"x": i(3), "y": j(3, "positive")}, lambda x, y: y ** x),
    Row("Powf", "Powf(y, b)", {"b": i(1), "y": j(3, "positive")}, lambda b, y: y ** b),
    Row("Powf", "(x + y) ** 0.5", {"x": i(2, "positive"), "y": j(2, "positive")}, lambda x, y: np.sqrt(x + y)),
    Row("Exp", "Exp(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.exp(x - y)),
    Row("Log", "Log(x + y)", {"x": i(3, "positive"), "y": j(3, "positive")}, lambda x, y: np.log(x + y)),
    Row("XLogX", "XLogX(x) * c", {"x": i(3, "nonneg_zeros"), "c": j(1)}, lambda x, c: xlogx(x) * c),
    Row("Sin", "Sin(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.sin(x - y)),
    Row("Cos", "Cos(x * y)", {"x": i(3), "y": j(3)}, lambda x, y: np.cos(x * y)),
    Row("Asin", "Asin(x * y)", {"x": i(3, "unit"), "y": j(3, "unit")}, lambda x, y: np.arcsin(x * y)),
    Row("Acos", "Acos(x * y)", {"x": i(3, "unit"), "y": j(3, "unit")}, lambda x, y: np.arccos(x * y)),
    Row("Atan", "Atan(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.arctan(x - y)),
    Row("Atan2", "Atan2(x, y)", {"x": i(3), "y": j(3)}, lambda x, y: np.arctan2(x, y)),
    Row("Atan2", "Atan2(b, y)", {"b": i(1), "y": j(3)}, lambda b, y: np.arctan2(b, y)),
    Row("SinXDivX", "SinXDivX(x) * c", {"x": i(3, "with_zeros"), "c": j(1)}, lambda x, c: sinc(x) * c),
    Row("SinXDivX", "SinXDivX(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: sinc(x - y)),
    Row("Abs", "Abs(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.abs(x - y)),
    Row("Sign", "Sign(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.sign(x - y)),
    Row("Sign", "Sign(x) * c", {"x": i(3, "with_zeros"), "c": j(1)}, lambda x, c: np.sign(x) * c),
    Row("Step", "Step(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: (x - y >= 0) * 1.0),
    Row("Step", "Step(x) * c", {"x": i(3, "with_zeros"), "c": j(1)}, lambda x, c: (x >= 0) * c),
    Row("ReLU", "ReLU(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.maximum(x - y, 0)),
    Row("Clamp", "Clamp(x, y - 1, y + 1)", {"x": i(3), "y": j(3)}, lambda x, y: np.clip(x, y - 1, y + 1)),
    Row("Clamp", "Clamp(x - y, -a, a)", {"x": i(3), "y": j(3), "a": p(1, "positive")},
        lambda x, y, a: np.clip(x - y, -a, a)),
    Row("ClampInt", "ClampInt(x * 2 - y, -1, 1)", {"x": i(3), "y": j(3)}, lambda x, y: np.clip(x * 2 - y, -1, 1)),
    Row("IfElse", "IfElse(x - y, x, y)", {"x": i(3), "y": j(3)}, lambda x, y: np.where(x - y >= 0, x, y)),
    Row("IfElse", "IfElse(b - c, x, y)", {"b": i(1), "c": j(1), "x": i(3), "y": j(3)},
        lambda b, c, x, y: np.where(b - c >= 0, x, y)),
    Row("IfElse", "IfElse(x - y, b, c)", {"x": i(3), "y": j(3), "b": i(1), "c": j(1)},
        lambda x, y, b, c: np.where(x - y >= 0, b, c)),
    Row("Floor", "Floor(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.floor(x - y)),
    Row("Round", "Round(x - y, 2)", {"x": i(3), "y": j(3)}, lambda x, y: np.round((x - y) * 100) / 100),
    Row("Round", "Round(x, 0) * c", {"x": i(3), "c": j(1)}, lambda x, c: np.round(x) * c),
    Row("Mod", "Mod(x - y, a, b)", {"x": i(3), "y": j(3), "a": p(1, "positive"), "b": p(1)},
        lambda x, y, a, b: (x - y) - a * np.floor((x - y - b) / a)),
    # Reductions over a vector's entries
    Row("Sum", "Sum(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: (x - y).sum(-1, keepdims=True)),
    Row("Max", "Max(x - y)", {"x": i(4), "y": j(4)}, lambda x, y: (x - y).max(-1, keepdims=True)),
    Row("Min", "Min(x * y)", {"x": i(4), "y": j(4)}, lambda x, y: (x * y).min(-1, keepdims=True)),
    Row("ArgMax", "ArgMax(x) * c", {"x": i(4), "c": j(1)}, lambda x, c: np.argmax(x, -1)[..., None] * c),
    Row("ArgMin", "ArgMin(x - y)", {"x": i(4), "y": j(4)},
        lambda x, y: np.argmin(x - y, -1)[..., None].astype(float)),
    # Shape ops
    Row("SumT", "SumT(b, 3) * y", {"b": i(1), "y": j(3)}, lambda b, y: np.repeat(b, 3, -1) * y),
    Row("Elem", "Elem(x, 2) * y", {"x": i(3), "y": j(2)}, lambda x, y: x[..., 2:3] * y),
    Row("ElemT", "ElemT(b - c, 4, 1)", {"b": i(1), "c": j(1)}, lambda b, c: place(b - c, 1, 4)),
    Row("Extract", "Extract(x, 1, 2) - Extract(y, 0, 2)", {"x": i(3), "y": j(4)},
        lambda x, y: x[..., 1:3] - y[..., 0:2]),
    Row("ExtractT", "ExtractT(x - y, 1, 5)", {"x": i(3), "y": j(3)}, lambda x, y: place(x - y, 1, 5)),
    Row("Concat", "Concat(x, y)", {"x": i(2), "y": j(3)}, lambda x, y: concat(x, y)),
    Row("Concat", "Concat(c, x * c)", {"x": i(2), "c": j(1)}, lambda x, c: concat(c, x * c)),
    Row("OneHot", "OneHot(k, 5) * c", {"k": i(1, "index5"), "c": j(1)},
        lambda k, c: (np.arange(5) == k).astype(float) * c),
    # Linear algebra (matrices row-major)
    Row("MatVecMult", "MatVecMult(A, y)", {"A": i(6), "y": j(3)}, lambda A, y: matvec(A, y)),
    Row("MatVecMult", "MatVecMult(A, b)", {"A": j(3), "b": i(1)}, lambda A, b: matvec(A, b)),
    Row("VecMatMult", "VecMatMult(x, B)", {"x": i(2), "B": j(6)}, lambda x, B: vecmat(x, B)),
    Row("TensorProd", "TensorProd(x, y)", {"x": i(2), "y": j(3)}, lambda x, y: outer(x, y)),
    # Composites
    Row("Scalprod", "Scalprod(x, y)", {"x": i(3), "y": j(3)}, lambda x, y: (x * y).sum(-1, keepdims=True)),
    Row("Scalprod", "(x | y) * z", {"x": i(3), "y": j(3), "z": j(2)},
        lambda x, y, z: (x * y).sum(-1, keepdims=True) * z),
    Row("SqNorm2", "SqNorm2(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: sq(x - y)),
    Row("Norm2", "Norm2(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: np.sqrt(sq(x - y))),
    Row("Normalize", "Normalize(x - y)", {"x": i(3), "y": j(3)}, lambda x, y: (x - y) / np.sqrt(sq(x - y))),
    Row("SqDist", "Exp(-SqDist(x, y)) * b", {"x": i(3), "y": j(3), "b": j(2)},
        lambda x, y, b: np.exp(-sq(x - y)) * b),
    Row("WeightedSqNorm", "WeightedSqNorm(s, x - y)", {"s": p(1, "positive"), "x": i(3), "y": j(3)},
        lambda s, x, y: weighted(s, x - y)),
    Row("WeightedSqNorm", "WeightedSqNorm(s, x - y)", {"s": j(3, "positive"), "x": i(3), "y": j(3)},
        lambda s, x, y: weighted(s, x - y)),
    Row("WeightedSqNorm", "WeightedSqNorm(s, x - y)", {"s": i(9), "x": i(3), "y": j(3)},
        lambda s, x, y: weighted(s, x - y)),
    Row("WeightedSqDist", "WeightedSqDist(s, x, y)", {"s": i(1, "positive"), "x": i(2), "y": j(2)},
        lambda s, x, y: weighted(s, x - y)),
    Row("WeightedSqDist", "WeightedSqDist(s, x, y)", {"s": p(2, "positive"), "x": i(2), "y": j(2)},
        lambda s, x, y: weighted(s, x - y)),
    Row("WeightedSqDist", "WeightedSqDist(s, x, y)", {"s": j(4), "x": i(2), "y": j(2)},
        lambda s, x, y: weighted(s, x - y)),
    Row("SqNormIso", "SqNormIso(s, x - y)", {"s": p(1, "positive"), "x": i(3), "y": j(3)},
        lambda s, x, y: s * sq(x - y)),
    Row("SqNormDiag", "SqNormDiag(s, x - y)", {"s": j(3, "positive"), "x": i(3), "y": j(3)},
        lambda s, x, y: (s * (x - y) ** 2).sum(-1, keepdims=True)),
    Row("SymSqNorm", "SymSqNorm(A, x - y)", {"A": i(9), "x": i(3), "y": j(3)},
        lambda A, x, y: weighted(A, x - y)),
    Row("IntInv", "IntInv(3) * x + y", {"x": i(2), "y": j(2)}, lambda x, y: x / 3 + y),
    Row("RatCst", "RatCst(-2, 7) * y", {"y": j(2)}, lambda y: -2 / 7 * y),
    Row("LessThan", "LessThan(x, y)", {"x": i(3, "ties"), "y": j(3, "ties")}, lambda x, y: (x < y) * 1.0),
    Row("LessThan", "LessThan(x, c) * y", {"x": i(3), "c": j(1), "y": j(3)}, lambda x, c, y: (x < c) * y),
    Row("LessOrEqual", "LessOrEqual(x, y)", {"x": i(3, "ties"), "y": j(3, "ties")},
        lambda x, y: (x <= y) * 1.0),
    Row("Equal", "Equal(x, y)", {"x": i(3, "ties"), "y": j(3, "ties")}, lambda x, y: (x == y) * 1.0),
    Row("NotEqual", "NotEqual(x, y)", {"x": i(3, "ties"), "y": j(3, "ties")}, lambda x, y: (x != y) * 1.0),
    Row("TensorDot", "TensorDot(a, b, Ind(2,3), Ind(3,2), Ind(1), Ind(0))", {"a": i(6), "b": j(6)},
        lambda a, b: tensordot(a, b, (2, 3), (3, 2), "...ik,...kl->...il")),
    Row("TensorDot", "TensorDot(a, b, Ind(2,3), Ind(4), Ind(), Ind(), Ind(2,0,1))", {"a": i(6), "b": j(4)},
        lambda a, b: tensordot(a, b, (2, 3), (4,), "...ij,...k->...jki")),
    Row("Kron", "Kron(a, b, Ind(2,3), Ind(2,1))", {"a": i(6), "b": j(2)},
        lambda a, b: tensordot(a, b, (2, 3), (2, 1), "...ij,...kl->...ikjl")),
    Row("DifferenceMatrix", "DifferenceMatrix(x, y)", {"x": i(2), "y": j(3)},
        lambda x, y: (x[..., :, None] - y[..., None, :]).reshape(np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
                                                                  + (6,))),
    Row("BSpline", "BSpline(t, x, 2)", {"t": p(7, "sorted"), "x": i(1)}, lambda t, x: bspline(t, x, 2)),
    Row("BSpline", "BSpline(t, x, 0) * c", {"t": j(4, "sorted"), "x": i(1), "c": p(1)},
        lambda t, x, c: bspline(t, x, 0) * c),
    Row("SoftDTW_SqDist", "SoftDTW_SqDist(x, y, g)", {"x": i(3), "y": j(4), "g": p(1, "positive")},
        lambda x, y, g: softdtw(x, y, g)),
    Row("GradMatrix", "GradMatrix(x * Sum(x * y), x)", {"x": i(3), "y": j(3)},
        lambda x, y: ((x * y).sum(-1)[..., None, None] * np.eye(3) + x[..., :, None] * y[..., None, :])
        .reshape(np.broadcast_shapes(x.shape[:-1], y.shape[:-1]) + (9,))),
    # (times a factor in v: the trace itself no longer depends on v, and every variable must stay in the formula)
    Row("TraceOperator", "TraceOperator(MatVecMult(A, v), v) * Sum(v)", {"A": i(9), "v": j(3)},
        lambda A, v: (A[..., 0:1] + A[..., 4:5] + A[..., 8:9]) * v.sum(-1, keepdims=True)),
    Row("TraceOperator", "TraceOperator(Sum(x * v), v) * Sum(v)", {"x": i(3), "v": j(3)},
        lambda x, v: x.sum(-1, keepdims=True) * v.sum(-1, keepdims=True)),
    Row("Factorize", "Factorize(Exp(-SqDist(x, y)) * SqDist(x, y), SqDist(x, y))", {"x": i(3), "y": j(3)},
        lambda x, y: np.exp(-sq(x - y)) * sq(x - y)),
    # Complex numbers, (re, im) interleaved; dense references in numpy's complex arithmetic
    Row("ComplexReal", "ComplexReal(z) * c", {"z": i(6), "c": j(1)}, lambda z, c: cplx(z).real * c),
    Row("ComplexImag", "ComplexImag(z - w)", {"z": i(4), "w": j(4)}, lambda z, w: cplx(z - w).imag),
    Row("ComplexAngle", "ComplexAngle(z - w)", {"z": i(4), "w": j(4)}, lambda z, w: np.angle(cplx(z - w))),
    Row("ComplexSquareAbs", "ComplexSquareAbs(z - w)", {"z": i(4), "w": j(4)},
        lambda z, w: np.abs(cplx(z - w)) ** 2),
    Row("ComplexAbs", "ComplexAbs(z - w)", {"z": i(4), "w": j(4)}, lambda z, w: np.abs(cplx(z - w))),
    Row("Conj", "Conj(z) * c", {"z": i(4), "c": j(1)}, lambda z, c: real_pairs(np.conj(cplx(z))) * c),
    Row("ComplexExp", "ComplexExp(z - w)", {"z": i(4), "w": j(4)}, lambda z, w: real_pairs(np.exp(cplx(z - w)))),
    Row("ComplexSum", "ComplexSum(z - w)", {"z": i(6), "w": j(6)},
        lambda z, w: real_pairs(cplx(z - w).sum(-1, keepdims=True))),
    Row("ComplexSumT", "ComplexSumT(s, 3) - z", {"s": j(2), "z": i(6)},
        lambda s, z: real_pairs(np.repeat(cplx(s), 3, -1), (z,)) - z),
    Row("Real2Complex", "Real2Complex(x - y)", {"x": i(2), "y": j(2)}, lambda x, y: real_pairs(x - y + 0j)),
    Row("Imag2Complex", "Imag2Complex(x - y)", {"x": i(2), "y": j(2)}, lambda x, y: real_pairs(1j * (x - y))),
    Row("ComplexExp1j", "ComplexExp1j(x - y)", {"x": i(2), "y": j(2)}, lambda x, y: real_pairs(np.exp(1j * (x - y)))),
    Row("ComplexAdd", "ComplexAdd(z, w)", {"z": i(4), "w": j(4)}, lambda z, w: real_pairs(cplx(z) + cplx(w))),
    Row("ComplexAdd", "ComplexAdd(s, w)", {"s": i(2), "w": j(4)}, lambda s, w: real_pairs(cplx(s) + cplx(w))),
    Row("ComplexSubtract", "ComplexSubtract(z, w)", {"z": i(4), "w": j(4)},
        lambda z, w: real_pairs(cplx(z) - cplx(w))),
    Row("ComplexMult", "ComplexMult(z, w)", {"z": i(4), "w": j(4)}, lambda z, w: real_pairs(cplx(z) * cplx(w))),
    Row("ComplexMult", "ComplexMult(z, s)", {"z": i(6), "s": p(2)}, lambda z, s: real_pairs(cplx(z) * cplx(s))),
    Row("ComplexDivide", "ComplexDivide(z, w)", {"z": i(4), "w": j(4, "positive")},
        lambda z, w: real_pairs(cplx(z) / cplx(w))),
    Row("ComplexRealScal", "ComplexRealScal(c, z)", {"c": j(1), "z": i(4)}, lambda c, z: c * z),
]


def test_every_op_has_a_row():
    missing = set(OPS) - {row.op for row in ROWS}
    assert not missing, f"ops without a test row in tests/test_ops.py: {sorted(missing)}"
    unknown = {row.op for row in ROWS} - set(OPS)
    assert not unknown, f"rows for ops that do not exist: {sorted(unknown)}"


def _data(row: Row, n: int, m: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = {"i": n, "j": m}
    return {name: _sample(rng, domain, (rows[cat], dim) if cat in rows else (dim,))
            for name, (cat, dim, domain) in row.variables.items()}


def _dense_sum(row: Row, data: dict[str, np.ndarray], n: int, m: int):
    """sum_j f(x_i, y_j, p) and sum_j |f|, in float64."""
    shaped = {}
    for name, (cat, dim, _) in row.variables.items():
        value = data[name].astype(np.float64)
        shaped[name] = value[None, None, :] if cat == "p" else value[:, None, :] if cat == "i" else value[None]
    values = np.asarray(row.dense(**shaped), dtype=np.float64)
    categories = {cat for cat, _, _ in row.variables.values()}
    n, m = (n if "i" in categories else 1), (m if "j" in categories else 1)   # KeOps: no j-variable, one column
    values = np.broadcast_to(values, (n, m, values.shape[-1]))
    return values.sum(1), np.abs(values).sum(1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("row", ROWS, ids=[f"{r.op}:{r.formula}" for r in ROWS])
def test_op_sum_matches_dense(row, dtype, backend):
    aliases = [f"{name} = V{cat}({dim})" if cat != "p" else f"{name} = Pm({dim})"
               for name, (cat, dim, _) in row.variables.items()]
    op = Genred(row.formula, aliases, reduction_op="Sum", axis=1)
    rtol = RTOL[dtype]
    for seed, (n, m) in enumerate(SIZES):
        data = {k: v.astype(dtype) for k, v in _data(row, n, m, seed).items()}
        got = op(*data.values(), backend=backend)
        want, scale = _dense_sum(row, data, n, m)
        assert got.dtype == dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
        # Error bound of a sum of rounded terms: relative to sum_j |f_ij| (plus a floor for exact zeros).
        np.testing.assert_array_less(np.abs(got - want), rtol * (scale + 1), err_msg=f"N={n}, M={m}")


def test_every_op_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("<!-- section: formulas -->", 1)[1].split("<!-- section:", 1)[0]
    missing = [name for name in OPS if name != "Var" and not re.search(rf"`{name}[(`]", section)]
    assert not missing, f"ops missing from README's formulas section: {missing}"
