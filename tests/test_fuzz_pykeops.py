"""Differential fuzz: random formulas over the op table, forward values and gradients, against a dense float64 torch
oracle written here op by op (pykeops's conventions at singular points: Sqrt and Norm2 have the subgradient 0 at 0,
Abs and Sign take Sign(0) = 0, ReLU has 1 at 0), and against pykeops itself where it is installed (a small part: it
compiles each formula with the system C++ compiler, tens of seconds each).

Compiled backends also draw formulas in dimension WIDE (the CPU's blocked distance loop). Inputs are drawn at
singular points too: a point at the origin, duplicated points, y_j equal to some x_i (so x - y
is exactly 0 for those pairs) and zero components. Each formula shape runs twice with different float constants
(written in the text) and parameter values, so a cache keyed on the wrong thing would answer the second call with
the first one's kernel."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import BACKENDS

from kred.torch import Genred

from kred.engine.codegen.cpu import DOT_MIN_DIM

D = 3
WIDE = DOT_MIN_DIM + 1      # distances and scalar products of this dimension take the CPU's blocked loop


def _safe_sqrt(s):
    """sqrt with pykeops's derivative 1/2 Rsqrt(s), Rsqrt(0) = 0 (finite at 0)."""
    positive = s > 0
    safe = torch.where(positive, s, torch.ones_like(s))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(s))


# (text template, torch oracle) per op; `{0}`, `{1}` are operands
UNARY = [
    ("Sin({0})", torch.sin), ("Cos({0})", torch.cos), ("Atan({0})", torch.atan), ("Abs({0})", torch.abs),
    ("Square({0})", torch.square), ("Sqrt(Abs({0}))", lambda a: _safe_sqrt(a.abs())),
    ("Log(IntCst(1) + Square({0}))", lambda a: torch.log(1 + a * a)),
    ("SinXDivX({0})", lambda a: torch.sinc(a / torch.pi)),
    ("ReLU({0})", lambda a: torch.where(a >= 0, a, torch.zeros_like(a))),
    ("Exp(-Abs({0}))", lambda a: torch.exp(-a.abs())),
    ("Sign({0})", torch.sign), ("-{0}", torch.neg),
]
BINARY = [
    ("({0} + {1})", torch.add), ("({0} - {1})", torch.sub), ("({0} * {1})", torch.mul),
    ("({0} / (IntCst(1) + Square({1})))", lambda a, b: a / (1 + b * b)),
]
TO_SCALAR = [   # vector (dim D) -> scalar
    ("Sum({0})", lambda a: a.sum(-1, keepdim=True)), ("SqNorm2({0})", lambda a: (a * a).sum(-1, keepdim=True)),
    ("Norm2({0})", lambda a: _safe_sqrt((a * a).sum(-1, keepdim=True))),
]


class Draw:
    """One random formula: its text (constants as literals) and its dense oracle, built together."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.constants = []

    def constant(self):
        self.constants.append(len(self.constants))
        k = len(self.constants) - 1
        return f"{{c{k}}}", lambda env, k=k: env["c"][k]

    def leaf(self, vector: bool):
        choices = ["x", "y", "x - y", "p", "c"] if vector else ["p", "c", "(x | y)", "SqDist(x, y)"]
        pick = choices[self.rng.integers(len(choices))]
        if pick == "c":
            return self.constant()
        oracle = {"x": lambda env: env["x"], "y": lambda env: env["y"], "x - y": lambda env: env["x"] - env["y"],
                  "p": lambda env: env["p"], "(x | y)": lambda env: (env["x"] * env["y"]).sum(-1, keepdim=True),
                  "SqDist(x, y)": lambda env: ((env["x"] - env["y"]) ** 2).sum(-1, keepdim=True)}[pick]
        return f"({pick})", oracle

    def expression(self, depth: int, vector: bool = True):
        if depth == 0 or self.rng.random() < 0.2:
            return self.leaf(vector)
        kind = self.rng.random()
        if kind < 0.45:
            text, fn = UNARY[self.rng.integers(len(UNARY))]
            a, fa = self.expression(depth - 1, vector)
            return text.format(a), lambda env: fn(fa(env))
        if kind < 0.85 or not vector:
            text, fn = BINARY[self.rng.integers(len(BINARY))]
            a, fa = self.expression(depth - 1, vector)
            b, fb = self.expression(depth - 1, bool(self.rng.random() < 0.5) and vector)
            return text.format(a, b), lambda env: fn(fa(env), fb(env))
        text, fn = TO_SCALAR[self.rng.integers(len(TO_SCALAR))]
        a, fa = self.expression(depth - 1, True)
        return text.format(a), lambda env: fn(fa(env))

    def formula(self):
        """A scalar formula that depends on x and on y (so both gradients are tested)."""
        body, fb = self.expression(3, True)
        head, fh = TO_SCALAR[self.rng.integers(len(TO_SCALAR))]
        text = f"{head.format(body)} + Sum(x * y)"
        return text, lambda env: fh(fb(env)) + (env["x"] * env["y"]).sum(-1, keepdim=True)


def singular_points(rng, n=7, m=6, d=D):
    x = rng.uniform(-1.5, 1.5, (n, d))
    x[0] = 0.0                                  # the origin
    x[2] = x[1]                                 # a duplicated point
    x[3, 1] = 0.0                               # a zero component
    y = rng.uniform(-1.5, 1.5, (m, d))
    y[:3] = x[:3]                               # x_i - y_j = 0 exactly for these pairs
    return torch.from_numpy(x), torch.from_numpy(y)


def _case(seed):
    draw = Draw(seed)
    text, oracle = draw.formula()
    return draw, text, oracle


def _check(text, oracle, n_constants, backend, rng, reduction="Sum", d=D):
    x, y = singular_points(rng, d=d)
    constants = rng.uniform(-2, 2, n_constants).round(3)
    p = torch.tensor([rng.uniform(-2, 2)], dtype=torch.float64)
    formula = text.format(**{f"c{k}": f"({float(c)!r})" for k, c in enumerate(constants)})
    op = Genred(formula, [f"x = Vi({d})", f"y = Vj({d})", "p = Pm(1)"], reduction_op=reduction, axis=1)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = op(xg, yg, p, backend=backend)
    env = {"x": xg[:, None, :], "y": yg[None, :, :], "p": p, "c": [torch.tensor(float(c), dtype=torch.float64)
                                                                    for c in constants]}
    terms = oracle(env)[..., 0]                                              # (N, M)
    want = (terms.sum(1) if reduction == "Sum" else torch.logsumexp(terms, 1))[:, None]
    w = torch.from_numpy(rng.standard_normal(got.shape))
    g_got = torch.autograd.grad((got * w).sum(), (xg, yg))
    g_want = torch.autograd.grad((want * w).sum(), (xg, yg))
    context = f"{formula} ({reduction}, {backend})"
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{context}: {m}")
    for a, b, name in zip(g_got, g_want, "xy"):
        assert torch.isfinite(a).all(), f"{context}: d/d{name} is not finite where the oracle's is: {a}"
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m, name=name: f"{context}, d/d{name}: {m}")


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_reference(seed):
    draw, text, oracle = _case(seed)
    rng = np.random.default_rng(1000 + seed)
    for call in range(2):                       # the same shape, other constants and inputs
        _check(text, oracle, len(draw.constants), "reference", rng, "Sum" if seed % 3 else "LogSumExp")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
@pytest.mark.parametrize("seed, d", [(seed, D) for seed in range(40, 44)] + [(seed, WIDE) for seed in range(44, 47)])
def test_fuzz_compiled(seed, d, backend):
    draw, text, oracle = _case(seed)
    rng = np.random.default_rng(1000 + seed)
    for call in range(2):
        _check(text, oracle, len(draw.constants), backend, rng, "Sum" if seed % 2 else "LogSumExp", d)


@pytest.mark.skipif(importlib.util.find_spec("pykeops") is None, reason="pykeops (the benchmark peer) not installed")
@pytest.mark.timeout(900)
def test_fuzz_against_pykeops():
    """A drawn formula through pykeops itself and through kred, forward and its gradient in x (pykeops's own
    Grad), at singular points, with the constant passed as a parameter that changes between calls."""
    import pykeops
    from pykeops.numpy import Genred as PykeopsGenred

    import kred.numpy
    pykeops.set_verbose(False)
    rng = np.random.default_rng(7)
    formula = "Norm2(x - y) * Exp(-Abs(Sum(x * y)) * c) + Sqrt(Abs(Sum(x - y)))"
    aliases = [f"x = Vi({D})", f"y = Vj({D})", "c = Pm(1)"]
    gradient = (f"Grad({formula}, x, e)", [*aliases, "e = Vi(1)"])
    for call in range(2):
        x, y = (t.numpy() for t in singular_points(rng))
        c = np.array([rng.uniform(0.5, 2.0)])
        e = rng.standard_normal((len(x), 1))
        for text, names, args in ((formula, aliases, (x, y, c)), (*gradient, (x, y, c, e))):
            want = PykeopsGenred(text, names, reduction_op="Sum", axis=1)(*args, backend="CPU")
            got = kred.numpy.Genred(text, names, reduction_op="Sum", axis=1)(*args)
            assert np.isfinite(want).all()
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=text)
