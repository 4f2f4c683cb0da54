"""engine.numpy.Genred as a pykeops user meets it: the README example, both axes, out=, the pykeops signature."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import float_rtol
from kred.engine.backends import get_backend
from kred.engine.errors import BackendError
from kred.engine.numpy import Genred
from kred.engine.run import backend_name

FORMULA = "Exp(-SqDist(x, y)) * b"


def gaussian_sum(x, y, b):
    """sum_j exp(-|x_i - y_j|^2) b_j in float64, the dense way."""
    x, y, b = (a.astype(np.float64) for a in (x, y, b))
    return np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)) @ b


@pytest.fixture
def data32():
    rng = np.random.default_rng(1)
    return (rng.random((100, 3), dtype=np.float32), rng.random((200, 3), dtype=np.float32),
            rng.random((200, 2), dtype=np.float32))


def test_readme_example(data32, backend):
    x, y, b = data32
    op = Genred(FORMULA, ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], reduction_op="Sum", axis=1)
    a = op(x, y, b, backend=backend)
    assert a.shape == (100, 2) and a.dtype == np.float32
    np.testing.assert_allclose(a, gaussian_sum(x, y, b), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axis_0_reduces_over_i(dtype, backend):
    rng = np.random.default_rng(2)
    x, y, b = rng.standard_normal((40, 3)), rng.standard_normal((23, 3)), rng.standard_normal((40, 2))
    op = Genred(FORMULA, ["x = Vi(3)", "y = Vj(3)", "b = Vi(2)"], axis=0)
    a = op(*(v.astype(dtype) for v in (x, y, b)), backend=backend)
    assert a.shape == (23, 2) and a.dtype == dtype       # one output row per y_j
    want = gaussian_sum(y.astype(dtype), x.astype(dtype), b.astype(dtype))   # the kernel is symmetric in x, y
    np.testing.assert_allclose(a, want, rtol=float_rtol(backend, dtype))


def test_both_axes_of_one_formula_agree_with_the_dense_matrix(backend):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((9, 2)), rng.standard_normal((14, 2))
    K = np.sin(x[:, None, 0] * y[None, :, 1]) + x[:, None, 1]          # K_ij for "Sin(Elem(x,0)*Elem(y,1))+Elem(x,1)"
    aliases = ["x = Vi(2)", "y = Vj(2)"]
    formula = "Sin(Elem(x, 0) * Elem(y, 1)) + Elem(x, 1)"
    np.testing.assert_allclose(Genred(formula, aliases, axis=1)(x, y, backend=backend), K.sum(1, keepdims=True),
                               rtol=1e-12)
    np.testing.assert_allclose(Genred(formula, aliases, axis=0)(x, y, backend=backend), K.sum(0)[:, None],
                               rtol=1e-12)


def test_default_axis_is_0_as_in_pykeops():
    op = Genred(FORMULA, ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"])
    assert op.plan.axis == 0


def test_out_is_filled_and_returned(data32, backend):
    x, y, b = data32
    op = Genred(FORMULA, ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], axis=1)
    out = np.full((100, 2), np.nan, np.float32)
    result = op(x, y, b, out=out, backend=backend)
    assert result is out
    np.testing.assert_allclose(out, gaussian_sum(x, y, b), rtol=1e-5)


def test_pykeops_constructor_arguments_positionally():
    # pykeops 2.x order: formula, aliases, reduction_op, axis, dtype, opt_arg, formula2, cuda_type, dtype_acc,
    # use_double_acc, sum_scheme, enable_chunks, rec_multVar_highdim.
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((11, 3))
    op = Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], "ArgKMin", 1, "float64", 3, None, "float64", "auto",
                False, "block_sum", False, True)
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(op(x, y), np.argsort(d2, axis=1, kind="stable")[:, :3])


def test_pykeops_constructor_keywords():
    rng = np.random.default_rng(5)
    x, y, b = (rng.random(s, dtype=np.float32) for s in ((8, 3), (30, 3), (30, 2)))
    op = Genred(FORMULA, ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], reduction_op="Sum", axis=1, dtype="float32",
                opt_arg=None, formula2=None, cuda_type="float32", dtype_acc="auto", use_double_acc=True,
                sum_scheme="kahan_scheme", enable_chunks=True, rec_multVar_highdim=False)
    assert op.plan.dtype_acc == "float64"                 # use_double_acc means a float64 accumulator
    a = op(x, y, b, backend="auto", device_id=-1, ranges=None, out=None)
    np.testing.assert_allclose(a, gaussian_sum(x, y, b), rtol=1e-5)
    with pytest.raises(TypeError):
        Genred(FORMULA, ["x = Vi(3)"], not_a_pykeops_option=1)


def test_formula2_reduction_through_genred(backend):
    rng = np.random.default_rng(6)
    x, y, v = rng.standard_normal((10, 2)), rng.standard_normal((25, 2)), rng.standard_normal((25, 3))
    op = Genred("-SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)", "v = Vj(3)"], reduction_op="SumSoftMaxWeight", axis=1,
                formula2="v")
    logits = -((x[:, None] - y[None]) ** 2).sum(-1)
    w = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(op(x, y, v, backend=backend), (w / w.sum(1, keepdims=True)) @ v, rtol=1e-12)


def test_pykeops_backend_names_map_to_ours():
    assert backend_name("CPU") == "cpu"
    assert backend_name("GPU") == backend_name("GPU_1D") == backend_name("GPU_2D") == "cuda"
    assert backend_name("auto") == "auto" and backend_name("reference") == "reference"


def test_backend_auto_and_cpu_spellings(data32):
    x, y, b = data32
    op = Genred(FORMULA, ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], axis=1)
    want = gaussian_sum(x, y, b)
    np.testing.assert_allclose(op(x, y, b), want, rtol=1e-5)                   # backend="auto" by default
    np.testing.assert_allclose(op(x, y, b, backend="auto"), want, rtol=1e-5)
    try:
        get_backend("cpu")
    except BackendError:
        with pytest.raises(BackendError, match="'cpu'"):                       # "CPU" means our cpu backend
            op(x, y, b, backend="CPU")
    else:
        np.testing.assert_allclose(op(x, y, b, backend="CPU"), want, rtol=1e-5)
