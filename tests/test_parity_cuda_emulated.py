"""The op rows added for pykeops parity (issue 13) through the CUDA backend's generated kernels, run on the CPU by
tests/cuda_emulation.py, against the dense numpy rows of tests/test_ops.py (float64). The same rows compile with NVRTC
in tests/test_cuda_codegen.py, which takes every row of tests/test_ops.py."""
from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emulation
from kred.engine.numpy import Genred
from test_ops import ROWS, _data, _dense_sum

PARITY_OPS = {"SqNormIso", "SqNormDiag", "SymSqNorm", "IntInv", "RatCst", "LessThan", "LessOrEqual", "Equal",
              "NotEqual", "TensorDot", "Kron", "DifferenceMatrix", "BSpline", "SoftDTW_SqDist", "GradMatrix",
              "TraceOperator", "Factorize", "ComplexReal", "ComplexImag", "ComplexAngle", "ComplexSquareAbs",
              "ComplexAbs", "Conj", "ComplexExp", "ComplexSum", "ComplexSumT", "Real2Complex", "Imag2Complex",
              "ComplexExp1j", "ComplexAdd", "ComplexSubtract", "ComplexMult", "ComplexDivide", "ComplexRealScal"}
PARITY_ROWS = [row for row in ROWS if row.op in PARITY_OPS]


def test_every_parity_op_has_a_row():
    assert {row.op for row in PARITY_ROWS} == PARITY_OPS


@pytest.mark.parametrize("row", PARITY_ROWS, ids=[f"{r.op}:{r.formula}" for r in PARITY_ROWS])
def test_parity_op_in_emulated_cuda_kernels(row):
    aliases = [f"{name} = V{cat}({dim})" if cat != "p" else f"{name} = Pm({dim})"
               for name, (cat, dim, _) in row.variables.items()]
    op = Genred(row.formula, aliases, reduction_op="Sum", axis=1)
    n, m = 3, 5
    data = _data(row, n, m, seed=11)
    arrays, _, rows, cols = op.plan.check_args(list(data.values()))
    got = emulation.execute(op.plan, arrays, (0, rows), (0, cols), final=True)[0]
    want, scale = _dense_sum(row, data, n, m)
    np.testing.assert_array_less(np.abs(got - want), 1e-10 * (scale + 1))
