"""The stricter CUDA emulation (tests/cuda_emulation.py, issue 22 row 7) catches what a lenient one would let pass:
each guard is shown catching a bug planted in a generated module, next to the unchanged module passing."""
from __future__ import annotations

import re

import cuda_emulation as emulation
import numpy as np
import pytest
from kred.engine.numpy import Genred


def problem(dim: int, m: int = 70):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, dim)).astype(np.float32)
    y = rng.standard_normal((m, dim)).astype(np.float32)
    b = rng.standard_normal((m, 1)).astype(np.float32)
    op = Genred(f"Exp(-SqDist(x, y) / {dim}) * b", [f"x = Vi({dim})", f"y = Vj({dim})", "b = Vj(1)"], "Sum", 1)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = np.exp(-((x64[:, None] - y64[None]) ** 2).sum(-1) / dim) @ b.astype(np.float64)
    return op, [x, y, b], want


def run(op, arrays, mutate=None, splits=None):
    arrays, _, n, m = op.plan.check_args(arrays)
    (got,) = emulation.execute(op.plan, arrays, (0, n), (0, m), final=True, splits=splits, mutate=mutate)
    return got


def close(got, want) -> bool:
    return bool(np.isfinite(got).all() and np.allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max()))


def planted(pattern: str, replacement: str):
    def mutate(source: str) -> str:
        changed, count = re.subn(pattern, replacement, source)
        assert count, f"the planted bug's pattern {pattern!r} is not in the module"
        return changed
    return mutate


@pytest.mark.parametrize("dim, before", [(3, r"if \(active\) \{"), (200, r"kred_real xchunk")],
                         ids=["tile", "chunk"])
def test_missing_barrier_is_caught(dim, before):
    """Without the barrier between staging a tile (or a chunk of one) and reading it, the first thread to run reads
    columns the others have not staged yet: poisoned shared memory (NaN), every time, since threads take turns
    between barriers."""
    op, arrays, want = problem(dim)
    assert close(run(op, arrays), want)
    got = run(op, arrays, planted(rf"__syncthreads\(\);(\s*{before})", r"\1"))
    assert not close(got, want)


def test_read_past_m_is_caught():
    """A tile staged whole although the last one holds fewer columns (M = 70 is no multiple of the block): the read
    past the end of y fails the launch, naming the array and the index."""
    op, arrays, _ = problem(3)
    with pytest.raises(AssertionError, match=r"kred_final accessed arg[12]\[\d+\] outside its (210|70) elements"):
        run(op, arrays, planted(r"const int count = \(int\)\(jend - jt < (\d+) \? jend - jt : \d+\);",
                                r"const int count = \1;"))


def test_uninitialised_shared_tile_is_caught():
    """The chunked partial sums accumulate into shared memory: without their zeroing they start from the poison
    (a zeroed buffer, reused by every block, hid this)."""
    op, arrays, want = problem(200)
    got = run(op, arrays, planted(r"for \(int jj = 0; jj < count; jj\+\+\) tile\[\d+ \+ jj \* \d+ \+ threadIdx\.x\] = 0;",
                                  ""))
    assert not close(got, want)


def test_unwritten_outputs_are_caught():
    """Outputs are allocated poisoned, as cp.empty leaves them: a row the kernel forgets to write is NaN, not 0."""
    op, arrays, want = problem(3)
    got = run(op, arrays, planted(r"(out0\[row \* 1 \+ c\] = )", r"if (row > 0) \1"))
    assert np.isnan(got[0]).all() and close(got[1:], want[1:])


def test_blocks_run_in_a_seeded_random_order(monkeypatch):
    """Each launch draws its block order from KRED_EMULATION_SEED; the 2D scheme's states merge the same whatever it
    is (no block may depend on another having run)."""
    op, arrays, want = problem(3, m=600)
    for seed in ("1", "2", "3"):
        monkeypatch.setenv("KRED_EMULATION_SEED", seed)
        assert close(run(op, arrays, splits=3), want)


def test_fast_exp2_has_the_documented_error_and_flushes_subnormals():
    """Under use_fast_math, exp2 is ex2.approx.ftz at its documented worst: relative error up to 2^-22 (the exact
    path is within float32 rounding), and results below 2^-126 flush to 0."""
    x = np.float32([[0.0], [0.0]])
    y = np.float32([[1.7], [0.3]])
    for fast in (True, False):
        op = Genred("Exp(-SqDist(x, y))", ["x = Vi(1)", "y = Vj(1)"], "Sum", 1, dtype_acc="float64", use_fast_math=fast)
        got = run(op, [x, y]).astype(np.float64)[:, 0]
        want = np.exp(-np.float64(1.7) ** 2) + np.exp(-np.float64(0.3) ** 2)
        error = abs(got[0] - want) / want
        assert (2 ** -24 < error <= 2 ** -21) if fast else error <= 2 ** -22, (fast, error)
    tiny = np.float32([[9.37]])                     # exp(-87.8) = 7e-39, a float32 subnormal
    for fast, flushed in ((True, True), (False, False)):
        op = Genred("Exp(-SqDist(x, y))", ["x = Vi(1)", "y = Vj(1)"], "Sum", 1, dtype_acc="float32", use_fast_math=fast)
        got = run(op, [np.float32([[0.0]]), tiny])[0, 0]
        assert (got == 0) == flushed, (fast, got)
