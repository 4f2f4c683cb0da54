"""The compiled CPU backend against dense numpy float64 written here: odd sizes, both axes and dtypes, non-contiguous
inputs, the 2D split (few rows), the blocked large-dimension path, partial states, NaN/Inf, threads.

Every reduction and op also runs through this backend in test_reductions.py / test_ops.py (the `backend` fixture).
Kernels are compiled once per (formula, reduction, dtype): the cases below share formulas to keep compiles few.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kred.engine.backends import get_backend
from kred.engine.backends.cpu import num_threads, split_columns
from kred.engine.codegen.cpu import DOT_MIN_DIM, cpu_source
from kred.engine.errors import BackendError
from kred.engine.numpy import Genred
from kred.engine.spec import Spec, make_plan
from kred.engine.reductions import merge_all

TOL = {np.float32: 2e-5, np.float64: 1e-12}
SIZES = [(1, 1), (1, 1025), (7, 1023), (1023, 7), (1025, 1025)]


def cpu():
    return get_backend("cpu")


def gaussian_dense(x, y, b):
    d2 = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2) @ b.astype(np.float64)


def relative_error(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-300)


@pytest.fixture(scope="module", autouse=True)
def _needs_compiler():
    try:
        get_backend("cpu")
    except BackendError as e:          # CI has gcc; a machine without one is reported by test_kernel_cache
        pytest.fail(f"the cpu backend is not available: {e}")


# Odd sizes, both axes, both dtypes ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1])
def test_gaussian_sum_odd_sizes(axis, dtype):
    rng = np.random.default_rng(1)
    # with axis=0 the sum runs over i: x and y swap categories so that the dense formula stays the same
    aliases = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"] if axis == 1 else ["x = Vj(3)", "y = Vi(3)", "b = Vi(2)"]
    op = Genred("Exp(-SqDist(x, y)) * b", aliases, axis=axis)
    for n, m in SIZES:
        x, y = rng.standard_normal((n, 3)).astype(dtype), rng.standard_normal((m, 3)).astype(dtype)
        b = rng.standard_normal((m, 2)).astype(dtype)
        got, want = op(x, y, b, backend="cpu"), gaussian_dense(x, y, b)
        assert got.dtype == dtype and got.shape == want.shape
        assert relative_error(got, want) < TOL[dtype], (n, m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extrema_logsumexp_and_kmin_odd_sizes(dtype):
    rng = np.random.default_rng(2)
    aliases = ["x = Vi(2)", "y = Vj(2)"]
    formula = "SqDist(x, y) + Sin(x - y)"           # dim 2: every component reduced separately
    ops = {name: Genred(formula, aliases, name, axis=1, opt_arg=3 if "K" in name else None)
           for name in ("Min_ArgMin", "Max_ArgMax", "LogSumExp", "KMin_ArgKMin")}
    for n, m in SIZES:
        if m < 3:
            continue
        x, y = rng.standard_normal((n, 2)).astype(dtype), rng.standard_normal((m, 2)).astype(dtype)
        F = ((x[:, None, :].astype(np.float64) - y[None]) ** 2).sum(-1)[..., None] + np.sin(x[:, None, :] - y[None])
        value, index = ops["Min_ArgMin"](x, y, backend="cpu")
        assert relative_error(value, F.min(1)) < TOL[dtype]
        np.testing.assert_array_equal(np.take_along_axis(F, index[:, None, :], 1)[:, 0], F.min(1))
        value, index = ops["Max_ArgMax"](x, y, backend="cpu")
        assert relative_error(value, F.max(1)) < TOL[dtype]
        np.testing.assert_array_equal(index, F.argmax(1))
        mx = F.max(1)
        assert relative_error(ops["LogSumExp"](x, y, backend="cpu"), mx + np.log(np.exp(F - mx[:, None]).sum(1))) \
            < TOL[dtype]
        value, index = ops["KMin_ArgKMin"](x, y, backend="cpu")
        order = np.argsort(F, axis=1, kind="stable")[:, :3, :]
        assert relative_error(value, np.take_along_axis(F, order, 1).reshape(n, 6)) < TOL[dtype]
        np.testing.assert_array_equal(index, order.reshape(n, 6))


def test_weighted_softmax_float32():
    rng = np.random.default_rng(3)
    op = Genred("-SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)", "v = Vj(2)"], "SumSoftMaxWeight", axis=1, formula2="v")
    x, y, v = (rng.standard_normal(s).astype(np.float32) for s in ((1023, 3), (1025, 3), (1025, 2)))
    F = -((x[:, None, :].astype(np.float64) - y[None]) ** 2).sum(-1)
    w = np.exp(F - F.max(1, keepdims=True))
    assert relative_error(op(x, y, v, backend="cpu"), (w @ v) / w.sum(1, keepdims=True)) < 1e-5


# Inputs ------------------------------------------------------------------------------------------------

def test_non_contiguous_and_fortran_inputs():
    rng = np.random.default_rng(4)
    op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], axis=1)
    big_x = rng.standard_normal((200, 6))
    x = big_x[::2, ::2]                                 # strided view
    y = np.asfortranarray(rng.standard_normal((77, 3)))
    b = rng.standard_normal((2, 77)).T                  # transposed view
    assert not x.flags.c_contiguous and not y.flags.c_contiguous and not b.flags.c_contiguous
    assert relative_error(op(x, y, b, backend="cpu"), gaussian_dense(x, y, b)) < 1e-12


def test_parameters_and_constants_are_hoisted_correctly():
    rng = np.random.default_rng(5)
    op = Genred("Exp(-g * SqDist(x, y)) * (b + Elem(p, 1))", ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)", "g = Pm(1)",
                                                           "p = Pm(3)"], axis=1)
    x, y, b = rng.standard_normal((33, 2)), rng.standard_normal((45, 2)), rng.standard_normal((45, 1))
    g, p = np.array([0.7]), np.array([1.0, -2.0, 3.0])
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    assert relative_error(op(x, y, b, g, p, backend="cpu"), np.exp(-0.7 * d2) @ (b - 2.0)) < 1e-12


# Schemes -------------------------------------------------------------------------------------------------

def test_two_dimensional_split_matches_one_part():
    """Few rows: the columns are cut into parts reduced separately and merged (forced here with 2 threads)."""
    assert split_columns(3, 100_000, threads=2) > 1
    assert split_columns(100_000, 100_000, threads=2) == 1
    rng = np.random.default_rng(6)
    for name, formula in (("Sum", "Exp(-SqDist(x, y)) * b"), ("LogSumExp", "-SqDist(x, y) + b"),
                          ("ArgKMin", "SqDist(x, y) + b")):
        plan = make_plan(Spec(formula, ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], name, axis=1, opt_arg=5))
        x, y, b = rng.standard_normal((3, 3)), rng.standard_normal((5000, 3)), rng.standard_normal((5000, 1))
        kernel = cpu().kernel(plan, np.dtype(np.float64))
        whole = kernel([x, y, b], (0, 3), (0, 5000), True, threads=1, parts=1)
        for parts in (2, 7):
            split = kernel([x, y, b], (0, 3), (0, 5000), True, threads=2, parts=parts)
            if name == "ArgKMin":
                np.testing.assert_array_equal(split[0], whole[0])
            else:
                assert relative_error(split[0], whole[0]) < 1e-12
        reference = get_backend("reference").reduce(plan, [x, y, b], 3, 5000)
        assert relative_error(whole[0], reference) < 1e-12 if name != "ArgKMin" else \
            np.array_equal(whole[0], reference)


def test_large_dimension_uses_the_blocked_products():
    d = max(DOT_MIN_DIM, 40)
    rng = np.random.default_rng(7)
    aliases = [f"x = Vi({d})", f"y = Vj({d})"]
    knn = Genred("SqDist(x, y)", aliases, "ArgKMin", axis=1, opt_arg=10)
    assert "dot0r0" in cpu_source(knn.plan, "float32", "float64")
    x, y = rng.standard_normal((301, d)).astype(np.float32), rng.standard_normal((1000, d)).astype(np.float32)
    exact = ((x[:, None, :].astype(np.float64) - y[None]) ** 2).sum(-1)
    got = knn(x, y, backend="cpu")
    want = np.argsort(exact, axis=1)[:, :10]
    # float32 rounding may swap two neighbours closer than it; their distances must agree
    np.testing.assert_allclose(np.take_along_axis(exact, got, 1), np.take_along_axis(exact, want, 1), rtol=1e-5)
    assert (got == want).mean() > 0.99
    scal = Genred("Exp(-(x | y) * 0.01) * Sum(y)", aliases, axis=1)
    assert "dot0r0" in cpu_source(scal.plan, "float64", "float64")
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    want = np.exp(-(xd @ yd.T) * 0.01) @ yd.sum(1, keepdims=True)
    assert relative_error(scal(xd, yd, backend="cpu"), want) < 1e-12


@pytest.mark.parametrize("offset", [1e2, 1e4])
def test_large_dimension_squared_distances_are_exact_far_from_the_origin(offset):
    """The blocked path sums squared differences: as |x|^2 + |y|^2 - 2 x.y (its form before) float32 nearest
    distances were 17% off at distance 100 from the origin and 1800x at 1e4, Gaussian sums inf. Duplicated points
    must be at distance exactly 0. Against float64 computed here from the same float32 data."""
    d = 2 * DOT_MIN_DIM
    rng = np.random.default_rng(17)
    x = (offset + rng.random((203, d))).astype(np.float32)
    y = (offset + rng.random((301, d))).astype(np.float32)
    y[:5] = x[:5]
    aliases = [f"x = Vi({d})", f"y = Vj({d})", "b = Vj(1)"]
    exact = ((x[:, None, :].astype(np.float64) - y[None]) ** 2).sum(-1)
    values, indices = Genred("SqDist(x, y)", aliases[:2], "KMin_ArgKMin", axis=1, opt_arg=3)(x, y, backend="cpu")
    assert "dot0r0" in cpu_source(Genred("SqDist(x, y)", aliases[:2], "Min", axis=1).plan, "float32", "float64")
    want = np.sort(exact, axis=1)[:, :3]
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(values[:5, 0], 0)
    np.testing.assert_allclose(np.take_along_axis(exact, indices, 1), want, rtol=1e-5, atol=0)
    b = rng.random((301, 1)).astype(np.float32)
    gauss = Genred("Exp(-SqDist(x, y) * 0.1) * b", aliases, axis=1)(x, y, b, backend="cpu")
    assert relative_error(gauss, np.exp(-exact * 0.1) @ b.astype(np.float64)) < 1e-5


def test_partial_states_merge_with_the_reference_backend():
    """The cluster cuts a reduction into shards of rows and columns: cpu and reference states must merge."""
    rng = np.random.default_rng(8)
    for name in ("Sum", "LogSumExp", "Min_ArgMin", "KMin"):
        plan = make_plan(Spec("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], name, axis=1, opt_arg=4))
        x, y, b = rng.standard_normal((50, 3)), rng.standard_normal((300, 3)), rng.standard_normal((300, 1))
        arrays, reference = [x, y, b], get_backend("reference")
        states = [cpu().partial(plan, arrays, (10, 40), (0, 137)), reference.partial(plan, arrays, (10, 40), (137, 300))]
        for a, r in zip(states[0], states[1]):
            assert a.shape == r.shape and a.dtype == r.dtype
        merged = plan.reduction.finalize(merge_all(plan.reduction, states), np.dtype(np.float64))
        whole = reference.reduce(plan, [x[10:40], y, b], 30, 300)
        for got, want in zip(*(v if isinstance(v, tuple) else (v,) for v in (merged, whole))):
            np.testing.assert_allclose(got, want, rtol=1e-12)


def test_nan_and_infinity_follow_the_reference():
    x = np.array([[0.0], [1.0], [2.0]])
    y = np.array([[0.0], [np.nan], [3.0], [-np.inf]])
    reference = get_backend("reference")
    for name in ("Min_ArgMin", "Max_ArgMax", "LogSumExp", "Sum"):
        plan = make_plan(Spec("x * y", ["x = Vi(1)", "y = Vj(1)"], name, axis=1))
        got, want = cpu().reduce(plan, [x, y], 3, 4), reference.reduce(plan, [x, y], 3, 4)
        for g, w in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, want))):
            np.testing.assert_array_equal(g, w)


# Threads -------------------------------------------------------------------------------------------------

def test_thread_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("KRED_NUM_THREADS", "3")
    assert num_threads() == 3
    monkeypatch.setenv("KRED_NUM_THREADS", "zero")
    with pytest.raises(BackendError, match="KRED_NUM_THREADS"):
        num_threads()
    monkeypatch.delenv("KRED_NUM_THREADS")
    assert num_threads() >= 1


def test_no_compiler_gives_a_clear_error_and_auto_falls_back_once(tmp_path):
    script = textwrap.dedent("""
        import warnings
        import numpy as np
        from kred.engine.backends import get_backend, auto_choice
        from kred.engine.errors import BackendError
        try:
            get_backend("cpu")
        except BackendError as e:
            print("ERROR", e)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print("AUTO", auto_choice(), auto_choice(), len(caught))
    """)
    env = {"CC": str(tmp_path / "no-such-cc"), "KRED_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr
    assert "ERROR" in done.stdout and "no C compiler found" in done.stdout
    assert "AUTO reference reference 1" in done.stdout


def test_a_forked_child_still_computes(tmp_path):
    """GNU OpenMP's thread pool does not survive fork(): the child of a process that ran parallel kernels must still
    finish (on one thread) instead of hanging, e.g. under multiprocessing's default fork start method."""
    script = textwrap.dedent("""
        import os
        import numpy as np
        from kred.engine.numpy import Genred
        op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
        rng = np.random.default_rng(0)
        x, y, b = rng.standard_normal((2000, 3)), rng.standard_normal((2000, 3)), rng.standard_normal((2000, 1))
        first = op(x, y, b, backend="cpu")
        pid = os.fork()
        if pid == 0:
            os._exit(0 if np.array_equal(op(x, y, b, backend="cpu"), first) else 3)
        _, status = os.waitpid(pid, 0)
        print("CHILD", os.waitstatus_to_exitcode(status))
    """)
    env = dict(os.environ, KRED_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr
    assert "CHILD 0" in done.stdout
