"""Ties, infinities and NaN: one semantics for every reduction, identical on every backend and in the CUDA kernels'
CPU emulation (issue 10, row 10). The oracle is written here from the documented rules, row by row in plain Python:

- selecting reductions order values NaN first, then by value (smallest first for Min/KMin, largest for Max/KMax),
  then by index (ties go to the lower index); infinities are ordinary values;
- the log-sum-exp family: a NaN term gives NaN; +inf terms give max +inf and sum = their count (weighted: the sum of
  their weights); -inf terms count for nothing.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import cuda_emulation as emulation
from kred.engine.numpy import Genred
from kred.engine.reductions import REDUCTIONS

K = 3
INF, NAN = math.inf, math.nan
# Each case is one row pattern y_j; rows i scale it by x_i (powers of two and -1: exact, so ties stay ties).
CASES = {
    "ties": [1, 1, 0.5, 1, 1, 0.25, 1, 1] * 5,                      # the issue's ArgKMin example, repeated
    "all +inf": [INF] * 37,
    "+inf and -inf": [INF, -INF, INF, 2.0, -INF] * 7,
    "nan": [1.0, NAN, 0.0, NAN, -3.0, 5.0] * 6,
    "one nan late": [0.5] * 30 + [NAN, 0.25],
}
X = np.array([[1.0], [2.0], [-1.0], [0.5], [-4.0]])


def select(row, largest):
    """Indices in selection order: NaN first, then the most extreme values, ties by index."""
    return sorted(range(len(row)), key=lambda j: (not math.isnan(row[j]),
                                                  0.0 if math.isnan(row[j]) else (-row[j] if largest else row[j]), j))


def log_sum_exp_state(row, weights):
    """(max, sum of exp(f - max), sum of exp(f - max) * w) by the documented rules."""
    if any(math.isnan(v) for v in row):
        return NAN, NAN, NAN
    if any(v == INF for v in row):
        return INF, float(sum(1 for v in row if v == INF)), sum(w for v, w in zip(row, weights) if v == INF)
    m = max(row)
    if m == -INF:
        return -INF, 0.0, 0.0
    terms = [math.exp(v - m) for v in row]
    return m, sum(terms), sum(t * w for t, w in zip(terms, weights))


def expected(name, F, W):
    """The result of reduction `name` over the rows of F (N, M), weights W (M,)."""
    out, index = [], []
    for row in F.tolist():
        if name == "Sum":
            finite = not any(math.isnan(v) for v in row) and not (INF in row and -INF in row)
            out.append([math.fsum(row) if finite else NAN])        # IEEE: inf - inf is NaN
            continue
        if "Exp" in name or "SoftMax" in name:
            m, s, ws = log_sum_exp_state(row, W.tolist())
            with np.errstate(divide="ignore", invalid="ignore"):
                value = {"LogSumExp": m + np.log(s), "LogSumExpWeight": m + np.log(ws),
                         "SumSoftMaxWeight": np.divide(ws, s), "Max_SumShiftExp": [m, s],
                         "Max_SumShiftExpWeight": [m, ws]}[name]
            out.append(np.atleast_1d(value).tolist())
            continue
        largest = "Max" in name
        order = select(row, largest)[:K if name[0] == "K" or name.startswith("ArgK") else 1]
        out.append([row[j] for j in order])
        index.append(order)
    values = np.array(out, np.float64)
    index = np.array(index, np.int64)
    cls = REDUCTIONS[name]
    emits = getattr(cls, "emits", ("value",))
    results = tuple({"value": values, "index": index}[kind] for kind in emits)
    return results[0] if len(results) == 1 else results


def genred(name):
    weighted = REDUCTIONS[name].weighted
    return Genred("x * y", ["x = Vi(1)", "y = Vj(1)", "w = Vj(1)"], reduction_op=name, axis=1,
                  opt_arg=K if REDUCTIONS[name].needs_k else None, formula2="w" if weighted else None)


def assert_same(got, want):
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        if w.dtype.kind == "i":
            np.testing.assert_array_equal(g, w)
        else:       # NaN where NaN, the same infinities, close elsewhere
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=0, equal_nan=True)


def problem(case):
    y = np.array(CASES[case], np.float64)[:, None]
    w = np.linspace(1.0, 2.0, len(y))[:, None]
    with np.errstate(invalid="ignore"):
        F = X * y.T
    return y, w, F


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_semantics_on_every_backend(name, case, backend):
    y, w, F = problem(case)
    want = expected(name, F, w[:, 0])
    assert_same(genred(name)(X, y, w, backend=backend), want)


def test_the_issue_example_ties_go_to_the_lowest_index(backend):
    y = np.array([1, 1, 0.5, 1, 1, 0.2, 1, 1], np.float64)[:, None]
    op = Genred("y + x", ["x = Vi(1)", "y = Vj(1)"], reduction_op="ArgKMin", axis=1, opt_arg=3)
    np.testing.assert_array_equal(op(np.zeros((1, 1)), y, backend=backend), [[5, 2, 0]])


@pytest.mark.parametrize("splits", [None, 3], ids=["1D", "2D"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_semantics_in_the_cuda_emulation(name, case, splits):
    y, w, F = problem(case)
    op = genred(name)
    arrays, dtype, n, m = op.plan.check_args([X, y, w])
    results = emulation.execute(op.plan, arrays, (0, n), (0, m), final=True, splits=splits)
    got = results[0] if len(results) == 1 else tuple(results)
    assert_same(got, expected(name, F, w[:, 0]))
