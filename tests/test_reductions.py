"""Every reduction of engine.reductions.REDUCTIONS against dense numpy written here, on both axes and every backend.

The dense side builds the full N x M x dim array of formula values in float64 and reduces it with plain numpy, so
it shares nothing with the engine but the input data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kred.engine.backends import get_backend
from kred.engine.errors import ArgumentError
from kred.engine.numpy import Genred
from kred.engine.reductions import REDUCTIONS

RTOL = {np.float32: 1e-5, np.float64: 1e-10}
K = 4
ALIASES = ["x = Vi(2)", "y = Vj(2)"]
VECTOR = "x * y - Sin(y)"                   # dim 2: the vector reductions work componentwise
SCALAR = "-SqDist(x, y)"                    # dim 1: the weighted reductions need a scalar formula
WEIGHTS = "Exp(Concat(x, y) * 0.5)"         # dim 4, positive (LogSumExpWeight takes its log)


def vector(x, y):
    return x * y - np.sin(y)


def scalar(x, y):
    return -((x - y) ** 2).sum(-1, keepdims=True)


def weights(x, y):
    x, y = np.broadcast_arrays(x, y)
    return np.exp(np.concatenate([x, y], -1) * 0.5)


# Dense reductions over axis 1 of F (rows, columns, dim) -------------------------------------------------

def logsumexp(F):
    m = F.max(1)
    shift = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(divide="ignore"):
        return shift + np.log(np.exp(F - shift[:, None]).sum(1))


def shifted(F):
    m = F.max(1)
    return m, np.exp(F - m[:, None])


def kth(F, take):
    n, _, d = F.shape
    return take(F)[:, :K, :].reshape(n, K * d)      # layout [k * dim + c]


def argsort(F):
    return np.argsort(F, axis=1, kind="stable")


def argsort_down(F):
    return np.argsort(-F, axis=1, kind="stable")      # largest first, ties by index


DENSE = {
    # name: (formula uses weights?, dense(F, G) -> expected result or tuple)
    "Sum": (False, lambda F, G: F.sum(1)),
    "LogSumExp": (False, lambda F, G: logsumexp(F)),
    "LogSumExpWeight": (True, lambda F, G: np.log((shifted(F)[1] * G).sum(1)) + shifted(F)[0]),
    "SumSoftMaxWeight": (True, lambda F, G: (shifted(F)[1] * G).sum(1) / shifted(F)[1].sum(1)),
    "Max_SumShiftExp": (False, lambda F, G: np.concatenate([shifted(F)[0], shifted(F)[1].sum(1)], 1)),
    "Max_SumShiftExpWeight": (True, lambda F, G: np.concatenate([shifted(F)[0], (shifted(F)[1] * G).sum(1)], 1)),
    "Min": (False, lambda F, G: F.min(1)),
    "Max": (False, lambda F, G: F.max(1)),
    "ArgMin": (False, lambda F, G: F.argmin(1)),
    "ArgMax": (False, lambda F, G: F.argmax(1)),
    "Min_ArgMin": (False, lambda F, G: (F.min(1), F.argmin(1))),
    "Max_ArgMax": (False, lambda F, G: (F.max(1), F.argmax(1))),
    "KMin": (False, lambda F, G: kth(F, lambda F: np.sort(F, axis=1))),
    "ArgKMin": (False, lambda F, G: kth(F, argsort)),
    "KMin_ArgKMin": (False, lambda F, G: (kth(F, lambda F: np.sort(F, axis=1)), kth(F, argsort))),
    "KMax": (False, lambda F, G: kth(F, lambda F: -np.sort(-F, axis=1))),
    "ArgKMax": (False, lambda F, G: kth(F, argsort_down)),
    "KMax_ArgKMax": (False, lambda F, G: (kth(F, lambda F: -np.sort(-F, axis=1)), kth(F, argsort_down))),
}


def test_every_reduction_has_a_dense_twin():
    assert set(DENSE) == set(REDUCTIONS), set(DENSE) ^ set(REDUCTIONS)


def genred(name: str, axis: int, **kw) -> Genred:
    weighted, _ = DENSE[name]
    return Genred(SCALAR if weighted else VECTOR, ALIASES, reduction_op=name, axis=axis,
                  opt_arg=K if REDUCTIONS[name].needs_k else None, formula2=WEIGHTS if weighted else None, **kw)


def dense(name: str, x, y, axis: int):
    """The expected result, from the full arrays of formula values (reduced axis moved to 1)."""
    weighted, reduce = DENSE[name]
    x, y = x.astype(np.float64)[:, None, :], y.astype(np.float64)[None, :, :]
    F, G = (scalar(x, y) if weighted else vector(x, y)), weights(x, y)
    if axis == 0:
        F, G = F.transpose(1, 0, 2), G.transpose(1, 0, 2)
    return reduce(F, G)


def assert_close(got, want, dtype):
    """Values within dtype tolerance (relative to the largest magnitude), indices exactly and as int64."""
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        if np.issubdtype(w.dtype, np.integer):
            assert g.dtype == np.int64
            np.testing.assert_array_equal(g, w)
        else:
            assert g.dtype == dtype
            rtol = RTOL[np.dtype(dtype).type]
            scale = np.abs(w[np.isfinite(w)]).max(initial=1.0)
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction_matches_dense(name, axis, dtype, backend):
    op = genred(name, axis)
    for seed, (n, m) in enumerate([(7, 33), (33, 7)]):
        rng = np.random.default_rng(seed)
        x, y = rng.standard_normal((n, 2)).astype(dtype), rng.standard_normal((m, 2)).astype(dtype)
        assert_close(op(x, y, backend=backend), dense(name, x, y, axis), dtype)


def test_kmin_layout_is_k_major():
    # Two components with opposite orders: out[i, k * dim + c] is the k-th smallest of component c.
    x = np.zeros((1, 1))
    y = np.array([[3.0], [1.0], [2.0]])
    op = Genred("Concat(y - x, x - y)", ["x = Vi(1)", "y = Vj(1)"], reduction_op="KMin_ArgKMin", axis=1, opt_arg=2)
    values, indices = op(x, y, backend="reference")
    np.testing.assert_array_equal(values, [[1.0, -3.0, 2.0, -2.0]])
    np.testing.assert_array_equal(indices, [[1, 0, 2, 2]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_logsumexp_with_minus_infinity(dtype, backend):
    # Log(0) = -inf: row 0 is -inf everywhere (result -inf, not nan); column 0 is -inf in every row (ignored).
    x = np.array([0.0, 1.0, 2.0, 0.5], dtype)[:, None]
    y = np.array([0.0, 1.0, 3.0, 0.25, 2.0], dtype)[:, None]
    op = Genred("Log(x * y) - Square(x - y)", ["x = Vi(1)", "y = Vj(1)"], reduction_op="LogSumExp", axis=1)
    got = op(x, y, backend=backend)
    with np.errstate(divide="ignore"):
        F = np.log(x.astype(np.float64) * y.T) - (x.astype(np.float64) - y.T) ** 2
    assert got[0, 0] == -np.inf
    assert_close(got, logsumexp(F[:, :, None]), dtype)


EMPTY = {"Sum": 0.0, "LogSumExp": -np.inf, "Min": np.inf, "Max": -np.inf}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction_over_an_empty_axis(name, backend):
    """M = 0 gives the reduction's identity, or a clear ArgumentError where no identity makes sense."""
    x, y = np.ones((3, 2)), np.ones((0, 2))
    if name in EMPTY:
        got = genred(name, axis=1)(x, y, backend=backend)
        np.testing.assert_array_equal(got, np.full((3, 2), EMPTY[name]))
    elif name == "Max_SumShiftExp":
        got = genred(name, axis=1)(x, y, backend=backend)
        np.testing.assert_array_equal(got, np.concatenate([np.full((3, 2), -np.inf), np.zeros((3, 2))], 1))
    elif name in ("LogSumExpWeight", "Max_SumShiftExpWeight"):
        got = genred(name, axis=1)(x, y, backend=backend)
        want = -np.inf if name == "LogSumExpWeight" else 0.0     # log of an empty weighted sum / the sum itself
        np.testing.assert_array_equal(got[:, -4:], np.full((3, 4), want))
    else:
        with pytest.raises(ArgumentError, match=rf"{name}.*(empty|M = 0|exceeds the 0 points)"):
            genred(name, axis=1)(x, y, backend=backend)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_merge_is_associative(name, backend):
    """States of 3 column blocks merged in several orders finalize to the single-pass result."""
    op = genred(name, axis=1)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((9, 2)), rng.standard_normal((31, 2))
    arrays, dtype, n, m = op.plan.check_args((x, y))
    engine = get_backend(backend)
    reduction = op.plan.reduction
    a, b, c = (engine.partial(op.plan, arrays, (0, n), cols) for cols in [(0, 5), (5, 19), (19, m)])
    single = reduction.finalize(engine.partial(op.plan, arrays, (0, n), (0, m)), dtype)
    assert_close(single, dense(name, x, y, axis=1), dtype)
    for merged in (reduction.merge(reduction.merge(a, b), c), reduction.merge(a, reduction.merge(b, c)),
                   reduction.merge(reduction.merge(c, a), b), reduction.merge(b, reduction.merge(c, a))):
        assert_close(reduction.finalize(merged, dtype), single, dtype)


def test_float32_sum_of_a_million_terms_is_accurate(backend):
    """A float32 Sum at N=1, M=1e6 accumulates in float64 (dtype_acc="auto"): error near one float32 rounding."""
    y = np.random.default_rng(0).uniform(0, 1, (1_000_000, 1)).astype(np.float32)
    x = np.ones((1, 1), np.float32)
    got = Genred("x * y", ["x = Vi(1)", "y = Vj(1)"], axis=1)(x, y, backend=backend)
    want = y.astype(np.float64).sum()
    assert got.dtype == np.float32
    assert abs(float(got[0, 0]) - want) / want < 2e-7     # one float32 rounding of the exact sum (2^-24 ~ 6e-8)


def test_every_reduction_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("<!-- section: reductions -->", 1)[1].split("<!-- section:", 1)[0]
    missing = [name for name in REDUCTIONS if f"`{name}`" not in section]
    assert not missing, f"reductions missing from README's reductions section: {missing}"


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_cpu_strategy_is_declared_with_its_skip_test(name):
    """A reduction declares its CPU loop; "rows" sweeps chunks through the skip test, so it must have one, and
    "lanes" merges per-lane states, so a skip test there would go unused."""
    cls = REDUCTIONS[name]
    reduction = cls(name, 1, 2 if cls.weighted else None, K if cls.needs_k else None)
    candidate = reduction.c_candidate(lambda slot, comp: f"s{slot}[{comp}]", 0, "v")
    assert reduction.strategy in ("lanes", "rows")
    assert (reduction.strategy == "rows") == (candidate is not None)
