"""The static GPU performance check (benchmarks/gpu_static.py, no GPU needed): the SASS instructions per pair of
kred's sm_90 kernels, against the goals of issue 12 and against KeOps 2.3's kernels of the same formulas."""
from __future__ import annotations

import pytest

from benchmarks import gpu_static

CASES = {case.name: case for case in gpu_static.CASES}


@pytest.fixture(scope="module")
def rows():
    return {row["case"]: row for row in gpu_static.measure([CASES[name] for name in
                                                            ("gaussian_sum_f32_d3", "logsumexp_f32_d3",
                                                             "gaussian_grad_f32_d3")])}


def test_gaussian_sum_meets_the_goal(rows):
    row = rows["gaussian_sum_f32_d3"]
    assert row["kred_sass_per_pair"] <= gpu_static.GOALS["gaussian_sum_f32_d3"], row
    assert row["spills"] == 0


@pytest.mark.parametrize("case", ["gaussian_sum_f32_d3", "logsumexp_f32_d3", "gaussian_grad_f32_d3"])
def test_at_or_below_keops(rows, case):
    row = rows[case]
    assert row["kred_sass_per_pair"] <= row["keops_sass_per_pair"], row
    assert row["spills"] == 0


def test_exact_math_keeps_the_accurate_exp():
    """use_fast_math=False: expf and the direct difference form (no staged atoms); the fast module uses ex2."""
    import numpy as np

    from kred.engine.codegen import cuda as template
    from kred.engine.numpy import Genred

    def source(fast):
        plan = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], "Sum", 1,
                      use_fast_math=fast).plan
        return template.build(plan, np.float32, np.float64).source

    fast, exact = source(True), source(False)
    assert "#define KRED_FAST_EXP" in fast and "kred_exp2_f32(" in fast.split("kred_final")[1]
    assert "#define KRED_FAST_EXP" not in exact and "kred_exp2_f32(" not in exact.split("kred_final")[1]
    assert "kred_exp(" in exact.split("kred_final")[1]
