"""User mistakes at call time: each gives an engine error whose message names the alias or the problem.

And the inputs that look odd but are fine (non-contiguous arrays, lists, empty axes) give correct results.
"""
from __future__ import annotations

import numpy as np
import pytest

from kred.engine.errors import ArgumentError, BackendError, DimensionError, FormulaError, KredError
from kred.engine.numpy import Genred

ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"]
FORMULA = "Exp(-SqDist(x, y)) * b"


def gaussian(x, y, b):
    """The dense reference for FORMULA, axis=1."""
    d2 = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2) @ b.astype(np.float64)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((5, 3)), rng.standard_normal((7, 3)), rng.standard_normal((7, 2))


@pytest.fixture
def op():
    return Genred(FORMULA, ALIASES, axis=1)


# Arrays that contradict the aliases ---------------------------------------------------------------------

@pytest.mark.parametrize("count", [2, 4])
def test_wrong_argument_count(op, data, count, backend):
    args = (data + data)[:count]
    with pytest.raises(ArgumentError, match=rf"expected 3 arrays \(x, y, b\), got {count}"):
        op(*args, backend=backend)


@pytest.mark.parametrize("which, value, message", [
    (2, np.zeros((7, 3)), r"b = Vj\(2, 2\): expected shape \(M, 2\), got \(7, 3\)"),
    (0, np.zeros((5, 2)), r"x = Vi\(0, 3\): expected shape \(N, 3\), got \(5, 2\)"),
    (2, np.zeros(7), r"b = Vj\(2, 2\): expected shape \(M, 2\), got \(7,\)"),
    (0, np.float64(1.0), r"x = Vi\(0, 3\): expected shape \(N, 3\), got \(\)"),
    (2, np.zeros((6, 2)), r"b has 6 rows but y has 7; variables indexed by j must have the same number of rows"),
])
def test_shapes_that_contradict_the_aliases(op, data, which, value, message, backend):
    args = list(data)
    args[which] = value
    with pytest.raises(ArgumentError, match=message):
        op(*args, backend=backend)


def test_parameter_shape():
    op = Genred("x * p", ["x = Vi(3)", "p = Pm(3)"], axis=1)
    x = np.ones((4, 3))
    with pytest.raises(ArgumentError, match=r"p = Pm\(1, 3\): expected shape \(3,\), got \(2,\)"):
        op(x, np.ones(2))
    np.testing.assert_array_equal(op(x, np.full((1, 3), 2.0)), np.full((4, 3), 2.0))   # (1, D) is one parameter


def test_mixed_dtypes(op, data, backend):
    x, y, b = data
    with pytest.raises(ArgumentError, match="y is float32 but x is float64: all arrays must share one dtype"):
        op(x, y.astype(np.float32), b, backend=backend)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float16, np.bool_, np.complex128, np.str_, object])
def test_unsupported_dtypes(op, data, dtype, backend):
    x, y, b = data
    with pytest.raises(ArgumentError, match=r"x = Vi\(0, 3\): dtype .* is not supported; use float32 or float64"):
        op(x.astype(dtype), y, b, backend=backend)


def test_non_contiguous_input_is_accepted(op, data, backend):
    x, y, b = data
    x_strided = np.repeat(x, 2, axis=0)[::2]                  # a strided view
    y_fortran = np.asfortranarray(y)
    b_transposed = np.ascontiguousarray(b.T).T                # column-major view of the same values
    assert not (x_strided.flags.c_contiguous or y_fortran.flags.c_contiguous or b_transposed.flags.c_contiguous)
    np.testing.assert_allclose(op(x_strided, y_fortran, b_transposed, backend=backend), gaussian(x, y, b), rtol=1e-12)


def test_python_lists_are_read_as_arrays(op, data):
    x, y, b = data
    np.testing.assert_allclose(op(x.tolist(), y.tolist(), b.tolist()), gaussian(x, y, b), rtol=1e-12)


# Empty axes and K --------------------------------------------------------------------------------------------

def test_n_zero_gives_an_empty_result(op, data, backend):
    x, y, b = data
    out = op(x[:0], y, b, backend=backend)
    assert out.shape == (0, 2) and out.dtype == np.float64


def test_m_zero_sums_to_zero(op, data, backend):
    x, y, b = data
    np.testing.assert_array_equal(op(x, y[:0], b[:0], backend=backend), np.zeros((5, 2)))


def test_m_zero_has_no_argmin(data, backend):
    x, y, _ = data
    op = Genred("SqDist(x, y)", ALIASES[:2], reduction_op="ArgMin", axis=1)
    with pytest.raises(ArgumentError, match=r"ArgMin of an empty set \(M = 0\) is undefined"):
        op(x, y[:0], backend=backend)


@pytest.mark.parametrize("axis, n, m, message", [
    (1, 5, 3, r"ArgKMin: K = 4 exceeds the 3 points reduced over"),
    (0, 3, 7, r"ArgKMin: K = 4 exceeds the 3 points reduced over"),      # axis=0 reduces over the N = 3 rows
])
def test_k_larger_than_the_reduced_axis(axis, n, m, message, backend):
    op = Genred("SqDist(x, y)", ALIASES[:2], reduction_op="ArgKMin", axis=axis, opt_arg=4)
    with pytest.raises(ArgumentError, match=message):
        op(np.zeros((n, 3)), np.zeros((m, 3)), backend=backend)


@pytest.mark.parametrize("k", [None, 0, -1, 2.5, True, 10**6])
def test_bad_k(k):
    with pytest.raises(ArgumentError, match=r"KMin: opt_arg must be the number K of neighbours, an integer in 1\.\."):
        Genred("SqDist(x, y)", ALIASES[:2], reduction_op="KMin", axis=1, opt_arg=k)


# Bad options ------------------------------------------------------------------------------------------------

def test_unknown_reduction():
    with pytest.raises(FormulaError, match=r"unknown reduction 'LogSumExpp'; did you mean 'LogSumExp'"):
        Genred(FORMULA, ALIASES, reduction_op="LogSumExpp", axis=1)
    with pytest.raises(FormulaError, match=r"unknown reduction 'Mean' .*known: Sum, "):
        Genred(FORMULA, ALIASES, reduction_op="Mean", axis=1)


@pytest.mark.parametrize("axis", [2, -1, "1", True, None])
def test_bad_axis(axis):
    with pytest.raises(ArgumentError, match=r"axis must be 0 \(reduce over i\) or 1 \(reduce over j\), got "):
        Genred(FORMULA, ALIASES, axis=axis)


@pytest.mark.parametrize("dtype_acc", ["float16", "double", None, "AUTO"])
def test_bad_dtype_acc(dtype_acc):
    with pytest.raises(ArgumentError, match=r"dtype_acc must be one of auto, float32, float64, got "):
        Genred(FORMULA, ALIASES, axis=1, dtype_acc=dtype_acc)


def test_formula2_where_none_is_taken_or_missing():
    with pytest.raises(FormulaError, match="Sum does not take formula2"):
        Genred(FORMULA, ALIASES, axis=1, formula2="b")
    with pytest.raises(FormulaError, match=r"SumSoftMaxWeight: needs formula2 \(the weights\)"):
        Genred("-SqDist(x, y)", ALIASES, reduction_op="SumSoftMaxWeight", axis=1)
    with pytest.raises(DimensionError, match=r"LogSumExpWeight: the formula must be scalar \(dimension 1\), not 2"):
        Genred("b", ALIASES, reduction_op="LogSumExpWeight", axis=1, formula2="x")


def test_formula_and_aliases_disagree():
    with pytest.raises(FormulaError, match=r"argument 0 is used as Var\(0,2,0\) but declared as x = Var\(0,3,0\)"):
        Genred("Vi(0, 2)", ALIASES, axis=1)
    with pytest.raises(FormulaError, match="argument 3 is never declared"):
        Genred("Vi(4, 1) * x", ALIASES, axis=1)


@pytest.mark.parametrize("out, message", [
    (np.zeros((5, 3)), r"out= must be a float64 array of shape \(5, 2\), got float64 \(5, 3\)"),
    (np.zeros((5, 2), np.float32), r"out= must be a float64 array of shape \(5, 2\), got float32 \(5, 2\)"),
    ([[0.0] * 2] * 5, r"out= must be a float64 array of shape \(5, 2\), got list"),
])
def test_out_of_the_wrong_shape(op, data, out, message, backend):
    with pytest.raises(ArgumentError, match=message):
        op(*data, out=out, backend=backend)


def test_out_with_value_and_index_results(data):
    x, y, _ = data
    op = Genred("SqDist(x, y)", ALIASES[:2], reduction_op="Min_ArgMin", axis=1)
    with pytest.raises(ArgumentError, match=r"out= cannot hold a reduction that returns \(values, indices\)"):
        op(x, y, out=np.zeros((5, 1)))


@pytest.mark.parametrize("ranges", [(1, 2), "all", [np.zeros((1, 2), np.int64)] * 5])
def test_malformed_ranges(op, data, ranges):
    with pytest.raises(ArgumentError, match=r"ranges must be the pykeops 6-tuple \(ranges_i, slices_i, redranges_j"):
        op(*data, ranges=ranges)


@pytest.mark.parametrize("name, message", [
    ("tpu", r"unknown backend 'tpu'; choose one of auto, reference, cpu, cuda"),
    ("gpu", r"unknown backend 'gpu'"),
])
def test_unknown_backend(op, data, name, message):
    with pytest.raises(BackendError, match=message):
        op(*data, backend=name)


def test_every_error_is_a_kred_error_and_a_builtin_kind():
    # Callers may catch KredError, or the builtin they would expect (ValueError for bad input).
    assert issubclass(ArgumentError, KredError) and issubclass(ArgumentError, ValueError)
    assert issubclass(DimensionError, FormulaError) and issubclass(FormulaError, ValueError)
    assert issubclass(BackendError, KredError) and issubclass(BackendError, RuntimeError)
