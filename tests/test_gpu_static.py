"""The static GPU performance check (benchmarks/gpu_static.py, no GPU needed): the SASS instructions per pair of
kred's sm_90 kernels, against the goals of issue 12 and against KeOps 2.3's kernels of the same formulas."""
from __future__ import annotations

import re

import pytest

from benchmarks import gpu_static

CASES = {case.name: case for case in gpu_static.CASES}


@pytest.fixture(scope="module")
def rows():
    return {row["case"]: row for row in gpu_static.measure([CASES[name] for name in
                                                            ("gaussian_sum_f32_d3", "logsumexp_f32_d3",
                                                             "argkmin_k10_f32_d3", "gaussian_grad_f32_d3")])}


def test_gaussian_sum_meets_the_goal(rows):
    row = rows["gaussian_sum_f32_d3"]
    assert row["kred_sass_per_pair"] <= gpu_static.GOALS["gaussian_sum_f32_d3"], row
    assert row["spills"] == 0


@pytest.mark.parametrize("case", ["gaussian_sum_f32_d3", "logsumexp_f32_d3", "argkmin_k10_f32_d3",
                                  "gaussian_grad_f32_d3"])
def test_at_or_below_keops(rows, case):
    row = rows[case]
    assert row["kred_sass_per_pair"] <= row["keops_sass_per_pair"], row
    assert row["spills"] == 0


@pytest.mark.parametrize("case", ["gaussian_sum_f32_d3", "logsumexp_f32_d3", "argkmin_k10_f32_d3",
                                  "gaussian_grad_f32_d3"])
def test_exact_path_at_or_below_keops_exact(rows, case):
    """use_fast_math=False against KeOps compiled without -use_fast_math (issue 22 row 2)."""
    row = rows[case]
    assert row["kred_exact_sass_per_pair"] <= row["keops_exact_sass_per_pair"], row
    assert row["exact_spills"] == 0


def test_argkmin_no_insert_path_moves_no_registers(rows):
    """A column that is not better than the K-th best costs one comparison and a branch: no register moves."""
    mix = rows["argkmin_k10_f32_d3"]["kred_mix"]
    assert not {"MOV", "IMAD.MOV.U32", "IMAD.MOV"} & set(mix), mix


# A pair loop as ptxas lays it out for a K-best reduction: the insertion is out of line, after the loop, and branches
# back to the loop's join point; a barrier loop around it stages the tiles.
LISTING = """
        /*0000*/   MOV R1, c[0x0][0x28] ;
        /*0010*/   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/   LDS.128 R4, [R2] ;
        /*0030*/   FFMA R8, R4, R5, R6 ;
        /*0040*/   FSETP.GT.AND P0, PT, R8, R9, PT ;
        /*0050*/   @!P0 BRA 0x00a0 ;
        /*0060*/   IADD3 R2, R2, 0x10, RZ ;
        /*0070*/   ISETP.NE.AND P1, PT, R2, R3, PT ;
        /*0080*/   @P1 BRA 0x0020 ;
        /*0090*/   @P2 BRA 0x0010 ;
        /*00a0*/   MOV R9, R8 ;
        /*00b0*/   MOV R10, R11 ;
        /*00c0*/   MOV R12, R13 ;
        /*00d0*/   BRA 0x0060 ;
        /*00e0*/   EXIT ;
"""


def test_pair_loop_follows_the_fast_path():
    """The measured loop is the no-insert cycle (0x20-0x40, the not-taken branch, 0x60-0x80), not the out-of-line
    insertion's branch back into the loop (which is no back edge: the loop head dominates it, not its target)."""
    code = [(int(address, 16), text) for address, text in
            re.findall(r"/\*([0-9a-f]{4})\*/\s+(.*?)\s*;", LISTING)]
    loop = gpu_static.pair_loop(code, column_bytes=16)
    assert loop.instructions == ("LDS.128 R4, [R2]", "FFMA R8, R4, R5, R6", "FSETP.GT.AND P0, PT, R8, R9, PT",
                                 "@!P0 BRA 0x00a0", "IADD3 R2, R2, 0x10, RZ", "ISETP.NE.AND P1, PT, R2, R3, PT",
                                 "@P1 BRA 0x0020")
    assert loop.unroll == 1 and loop.per_pair == 7


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
