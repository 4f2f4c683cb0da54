"""The CUDA kernels' logic, run on the CPU by tests/cuda_emulation.py: tiling, the 2D scheme and its merge kernel,
partial states, block sums, chunked large dimensions and float16, against dense numpy written here (float64).

What this cannot check is the GPU itself (NVIDIA's math library, real concurrency, the CuPy runtime): that is
tests/test_cuda_gpu.py, which runs where a GPU is visible. Sizes stay small: every CUDA thread is a POSIX thread.
"""
from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emulation
from kred.engine.numpy import Genred
from kred.engine.reductions import REDUCTIONS, merge_all
from test_reductions import assert_close, dense, genred

SPLITS = [pytest.param(None, id="1D"), pytest.param(3, id="2D")]


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def emulate(op: Genred, *args, splits=None, final=True):
    arrays, dtype, n, m = op.plan.check_args(args)
    results = emulation.execute(op.plan, arrays, (0, n), (0, m), final=final, splits=splits)
    return results[0] if len(results) == 1 else tuple(results)


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_every_reduction_matches_dense(name, splits):
    """float64, so that indices are compared exactly (no float32 near-ties against a float64 oracle)."""
    rng = np.random.default_rng(1)
    x, y = rand(rng, (70, 2), np.float64), rand(rng, (600, 2), np.float64)
    assert_close(emulate(genred(name, 1), x, y, splits=splits), dense(name, x, y, 1), np.float64)


@pytest.mark.parametrize("name", ["Sum", "LogSumExp", "SumSoftMaxWeight", "Min_ArgMin", "KMin_ArgKMin"])
def test_partial_states_merge_with_numpy_states(name):
    """States written by kred_state (column blocks 1 and 3) merge with the reference's (block 2) into the answer."""
    from kred.engine.backends import get_backend

    rng = np.random.default_rng(2)
    x, y = rand(rng, (40, 2), np.float64), rand(rng, (500, 2), np.float64)
    op = genred(name, 1)
    arrays, dtype, n, m = op.plan.check_args([x, y])
    reduction = op.plan.reduction
    like = reduction.identity(0, dtype, op.plan.acc_dtype(dtype))
    parts = []
    for c0, c1 in [(0, 130), (130, 300), (300, 500)]:
        if c0 == 130:
            parts.append(get_backend("reference").partial(op.plan, arrays, (0, n), (c0, c1)))
            continue
        states = emulation.execute(op.plan, arrays, (0, n), (c0, c1), final=False, splits=2)
        parts.append(tuple(s.reshape((n,) + w.shape[1:]).astype(w.dtype) for s, w in zip(states, like)))
    got = reduction.finalize(merge_all(reduction, parts), dtype)
    assert_close(got, dense(name, x, y, 1), np.float64)


@pytest.mark.parametrize("splits", SPLITS)
def test_gaussian_sum_float32_rows_columns_and_parameters(splits):
    rng = np.random.default_rng(3)
    for n, m in [(1, 1), (7, 33), (257, 513)]:
        x, y, b = rand(rng, (n, 3), np.float32), rand(rng, (m, 3), np.float32), rand(rng, (m, 2), np.float32)
        s = np.float32([0.7])
        op = Genred("Exp(-s * SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)", "s = Pm(1)"], axis=1)
        got = emulate(op, x, y, b, s, splits=splits)
        d2 = ((x[:, None].astype(np.float64) - y[None]) ** 2).sum(-1)
        want = np.exp(-0.7 * d2) @ b.astype(np.float64)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_axis_0_and_formula_without_j_variables():
    rng = np.random.default_rng(4)
    x, y = rand(rng, (50, 2), np.float64), rand(rng, (90, 2), np.float64)
    got = emulate(Genred("Sin(x - y)", ["x = Vi(2)", "y = Vj(2)"], axis=0), x, y)
    np.testing.assert_allclose(got, np.sin(x[:, None] - y[None]).sum(0), rtol=1e-12)
    got = emulate(Genred("Exp(x)", ["x = Vi(2)"], axis=1), x)       # no j-variable: one column, as in KeOps
    np.testing.assert_allclose(got, np.exp(x), rtol=1e-12)


def test_empty_reduction_gives_the_identity():
    x, y = np.ones((5, 1)), np.ones((0, 1))
    np.testing.assert_array_equal(emulate(Genred("x * y", ["x = Vi(1)", "y = Vj(1)"], axis=1), x, y), 0.0)
    got = emulate(Genred("x * y", ["x = Vi(1)", "y = Vj(1)"], reduction_op="LogSumExp", axis=1), x, y)
    assert np.all(np.isneginf(got))


def test_float32_sum_accumulates_in_float64_by_tiles():
    """Block sums: float32 per tile, float64 across tiles; error near one float32 rounding at M = 2e5."""
    y = np.random.default_rng(5).uniform(0, 1, (200_000, 1)).astype(np.float32)
    got = emulate(Genred("x * y", ["x = Vi(1)", "y = Vj(1)"], axis=1), np.ones((1, 1), np.float32), y, splits=4)
    want = y.astype(np.float64).sum()
    assert abs(float(got[0, 0]) - want) / want < 2e-7


@pytest.mark.parametrize("splits", SPLITS)
def test_float16_computes_in_float32(splits):
    """float16 in and out, float32 inside. Tolerance: the float16 rounding of the inputs (2^-11 relative, carried
    through exp(-|x-y|^2) with |x-y|^2 up to ~20) and of the result: 1e-2 relative to the largest output."""
    rng = np.random.default_rng(6)
    x, y, b = (rand(rng, (100, 3), np.float16), rand(rng, (300, 3), np.float16), rand(rng, (300, 1), np.float16))
    op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
    arrays = [x, y, b]
    results = emulation.execute(op.plan, arrays, (0, 100), (0, 300), final=True, splits=splits)
    got = results[0]
    d2 = ((x[:, None].astype(np.float64) - y[None].astype(np.float64)) ** 2).sum(-1)
    want = np.exp(-d2) @ b.astype(np.float64)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), want, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("dim", [100, 130])
def test_large_dimensions_are_chunked(dim):
    """D > 96 takes the chunked path (Sum nodes evaluated 32 components at a time, partial sums in shared memory):
    nearest neighbours and a kernel sum against dense float64."""
    rng = np.random.default_rng(7)
    x, y = rand(rng, (45, dim), np.float64), rand(rng, (200, dim), np.float64)
    op = Genred("SqDist(x, y)", [f"x = Vi({dim})", f"y = Vj({dim})"], reduction_op="ArgKMin", axis=1, opt_arg=5)
    assert emulation.template.build(op.plan, np.float64, np.float64).chunked
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(emulate(op, x, y), np.argsort(d2, axis=1, kind="stable")[:, :5])
    b = rand(rng, (200, 1), np.float64)
    op = Genred("Exp(-SqDist(x, y) / 100) * b - (x | y) * b", [f"x = Vi({dim})", f"y = Vj({dim})", "b = Vj(1)"],
                axis=1)
    want = (np.exp(-d2 / 100) - x @ y.T) @ b
    np.testing.assert_allclose(emulate(op, x, y, b, splits=2), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dim", [257, 1000, 4096])
def test_any_dimension_fits_in_shared_memory(dim, dtype):
    """The j-tile of a chunked Sum is staged chunk by chunk, so any D fits in 64 KiB (what every sm_75+ device has): a Gaussian sum,
    the K smallest distances and, in float64, their indices, against dense float64 (a partial last tile, 2 spans)."""
    rng = np.random.default_rng(11)
    x, y, b = rand(rng, (33, dim), dtype), rand(rng, (150, dim), dtype), rand(rng, (150, 1), dtype)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    d2 = ((x64[:, None] - y64[None]) ** 2).sum(-1)
    op = Genred("Exp(-SqDist(x, y) / s) * b", [f"x = Vi({dim})", f"y = Vj({dim})", "b = Vj(1)", "s = Pm(1)"],
                axis=1)
    program = emulation.template.build(op.plan, dtype, op.plan.acc_dtype(dtype))
    assert program.chunked and program.shared_bytes <= emulation.template.SHARED_BUDGET
    s = np.array([dim], dtype)
    want = np.exp(-d2 / dim) @ b.astype(np.float64)
    rtol = 1e-12 if dtype == np.float64 else 2e-4 * np.sqrt(dim / 257)    # float32: eps * |d2| / D, d2 ~ 2D
    np.testing.assert_allclose(emulate(op, x, y, b, s, splits=2), want, rtol=rtol, atol=rtol * np.abs(want).max())
    op = Genred("SqDist(x, y)", [f"x = Vi({dim})", f"y = Vj({dim})"], reduction_op="KMin_ArgKMin", axis=1, opt_arg=4)
    values, index = emulate(op, x, y)
    order = np.argsort(d2, axis=1, kind="stable")[:, :4]
    np.testing.assert_allclose(values, np.take_along_axis(d2, order, 1), rtol=1e-12 if dtype == np.float64 else 1e-5)
    if dtype == np.float64:
        np.testing.assert_array_equal(index, order)


@pytest.mark.parametrize("name", ["Sum", "Min_ArgMin", "KMin_ArgKMin", "LogSumExp", "Max_SumShiftExp",
                                  "SumSoftMaxWeight", "Max_SumShiftExpWeight"])
def test_large_outputs_run_as_slices_of_components(name):
    """A state too large for registers (here 40 components) is computed slice by slice and joined: every family."""
    rng = np.random.default_rng(8)
    x, y, v = rand(rng, (30, 2), np.float64), rand(rng, (80, 2), np.float64), rand(rng, (80, 40), np.float64)
    weighted = name in ("SumSoftMaxWeight", "Max_SumShiftExpWeight")
    formula, formula2 = ("-SqDist(x, y)", "v") if weighted else ("Exp(-SqDist(x, y)) * v", None)
    op = Genred(formula, ["x = Vi(2)", "y = Vj(2)", "v = Vj(40)"], reduction_op=name, axis=1, formula2=formula2,
                opt_arg=3 if "KMin" in name else None)
    assert len(emulation.runtime.component_groups(op.plan, np.float64, np.float64)) > 1
    got = emulate(op, x, y, v, splits=2)
    F = -((x[:, None] - y[None]) ** 2).sum(-1)
    if weighted:
        m = F.max(1, keepdims=True)
        e = np.exp(F - m)
        want = (e @ v / e.sum(1, keepdims=True) if name == "SumSoftMaxWeight" else np.concatenate([m, e @ v], 1))
        np.testing.assert_allclose(got, want, rtol=1e-10)
        return
    G = np.exp(F)[:, :, None] * v[None]
    if name == "Sum":
        want = G.sum(1)
    elif name == "Min_ArgMin":
        want = (G.min(1), G.argmin(1))
    elif name == "KMin_ArgKMin":
        order = np.argsort(G, axis=1, kind="stable")[:, :3, :]
        want = (np.take_along_axis(G, order, 1).reshape(30, -1), order.reshape(30, -1))
    elif name == "LogSumExp":
        m = G.max(1)
        want = m + np.log(np.exp(G - m[:, None]).sum(1))
    else:
        m = G.max(1)
        want = np.concatenate([m, np.exp(G - m[:, None]).sum(1)], 1)
    assert_close(got, want, np.float64)


# The CUDA runtime end to end, with CuPy replaced by the emulation (real NVRTC cubins in a real disk cache) --------

@pytest.mark.parametrize("emulated_gpu", [48 * 1024, 227 * 1024], ids=["48KiB", "227KiB"], indirect=True)
def test_wide_staged_tile_opts_in_or_reads_global_memory(emulated_gpu):
    """A j-variable read outside chunked sums (SqNorm2(y), D = 500, float32) is staged whole: 64 KB per block of 32
    columns. On a device with 227 KiB (sm_90) the launch opts in above 48 KiB; on one with 48 KiB, y is read from
    global memory instead. Both against dense float64."""
    rng = np.random.default_rng(12)
    dim = 500
    x, y = rand(rng, (70, dim), np.float32), rand(rng, (200, dim), np.float32)
    op = Genred(f"Exp(-SqDist(x, y) / {dim}) * SqNorm2(y)", [f"x = Vi({dim})", f"y = Vj({dim})"], axis=1)
    got = op(x, y, backend="cuda")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = np.exp(-((x64[:, None] - y64[None]) ** 2).sum(-1) / dim) @ (y64 ** 2).sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    (name, grid, block, shared, opted_in), *_ = emulated_gpu.launches
    if emulated_gpu.cuda.runtime.deviceGetAttribute(97, 0) > 48 * 1024:
        assert shared > 48 * 1024 and opted_in == shared
    else:
        assert shared <= 48 * 1024 and opted_in == 0


def test_runtime_reduce_partial_and_cache(emulated_gpu, tmp_path):
    from kred.engine.backends import get_backend

    rng = np.random.default_rng(9)
    x, y, b = rand(rng, (300, 3), np.float32), rand(rng, (9000, 3), np.float32), rand(rng, (9000, 2), np.float32)
    op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], axis=1)
    got = op(x, y, b, backend="cuda")                                   # numpy in, numpy out
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    want = np.exp(-((x[:, None].astype(np.float64) - y[None]) ** 2).sum(-1)) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # 2 row-blocks on 4 "SMs": the 2D rule splits the columns (36 tiles) into 8 spans, then merges
    assert emulated_gpu.launches[0][1] == (2, 8)
    assert [name for name, *_ in emulated_gpu.launches] == ["kred_state", "kred_merge_final"]
    assert len(list((tmp_path / "cuda").glob("*.sm_90.cubin"))) == 1       # compiled by NVRTC, cached on disk

    arrays, dtype, n, m = op.plan.check_args([x, y, b])
    state = get_backend("cuda").partial(op.plan, arrays, (10, 20), (100, 1500))
    like = get_backend("reference").partial(op.plan, arrays, (10, 20), (100, 1500))
    assert [s.dtype for s in state] == [s.dtype for s in like] and [s.shape for s in state] == [s.shape for s in like]
    np.testing.assert_allclose(state[0], like[0], rtol=1e-5, atol=1e-5 * np.abs(like[0]).max())
    # every copy back to the host was ordered on the caller's stream (the one the kernels ran on)
    assert emulated_gpu.copies and all(stream is emulated_gpu.stream for stream in emulated_gpu.copies)

    get_backend("cuda").prepare(op.plan, np.float64)                  # the service's compile step: cubin on disk
    assert len(list((tmp_path / "cuda").glob("*.sm_90.cubin"))) == 2


def test_runtime_large_state_and_float16(emulated_gpu):
    rng = np.random.default_rng(10)
    x, y = rand(rng, (50, 2), np.float64), rand(rng, (300, 2), np.float64)
    op = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op="KMin_ArgKMin", axis=0, opt_arg=20)
    values, index = op(x, y, backend="cuda")                          # K = 20: the state is sliced (axis 0)
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1).T
    order = np.argsort(d2, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(index, order)
    np.testing.assert_allclose(values, np.take_along_axis(d2, order, 1), rtol=1e-12)
    h = [a.astype(np.float16) for a in (x, y)]
    got = Genred("Exp(-SqDist(x, y))", ["x = Vi(2)", "y = Vj(2)"], axis=1)(*h, backend="cuda")
    assert got.dtype == np.float16
    want = np.exp(-((h[0][:, None].astype(np.float64) - h[1][None]) ** 2).sum(-1)).sum(1, keepdims=True)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-2)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_math", "exact"])
def test_dot_product_form_far_from_the_origin(fast):
    """Points at distance 1e3 from the origin, spread 1: the fast path's dot-product form is centred, so float32
    cancellation stays at the size of the spread (documented in engine/codegen/affine.py), for the Gaussian sum, the
    log-sum-exp and the nearest neighbours. Oracle: float64 differences."""
    rng = np.random.default_rng(7)
    x = (1000 + rng.standard_normal((40, 3))).astype(np.float32)
    y = (1000 + rng.standard_normal((300, 3))).astype(np.float32)
    b = rng.standard_normal((300, 1)).astype(np.float32)
    d2 = ((x[:, None].astype(np.float64) - y[None].astype(np.float64)) ** 2).sum(-1)
    aliases = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"]
    got = emulate(Genred("Exp(-SqDist(x, y) / 4) * b", aliases, "Sum", 1, use_fast_math=fast), x, y, b)
    want = np.exp(-d2 / 4) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(np.exp(-d2 / 4)).sum(1).max())
    got = emulate(Genred("-SqDist(x, y)", aliases[:2], "LogSumExp", 1, use_fast_math=fast), x, y)
    top = (-d2).max(1, keepdims=True)
    np.testing.assert_allclose(got, top + np.log(np.exp(-d2 - top).sum(1, keepdims=True)), rtol=0, atol=1e-4)
    got = emulate(Genred("SqDist(x, y)", aliases[:2], "Min", 1, use_fast_math=fast), x, y)
    # bound (D + 2) eps (|x - o|^2 + |y - o|^2) with |x - o|, |y - o| <~ 8 (spread 1, 3 dims, o a data point)
    np.testing.assert_allclose(got[:, 0], d2.min(1), rtol=0, atol=5 * 2 ** -24 * 2 * 64 + 1e-4)


def test_gradient_kernel_fast_path_matches_dense():
    """The backward kernel of a Gaussian sum (products regrouped, exp2, dot-product form) against float64."""
    from kred.engine.reductions.gradients import gradient

    rng = np.random.default_rng(8)
    x, y = rand(rng, (30, 3), np.float32), rand(rng, (200, 3), np.float32)
    b, e = rand(rng, (200, 1), np.float32), rand(rng, (30, 1), np.float32)
    op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], "Sum", 1)
    plan = gradient(op.plan, 0).plan
    arrays, dtype, n, m = plan.check_args([x, y, b, e])
    (got,) = emulation.execute(plan, arrays, (0, n), (0, m), final=True)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    diff = x64[:, None] - y64[None]
    k = np.exp(-(diff ** 2).sum(-1))
    want = -2 * ((k * b[:, 0][None]) [..., None] * diff).sum(1) * e
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", ["Sum", "Min_ArgMin"])
def test_runtime_runs_ranges_as_one_grid_launch(emulated_gpu, name):
    """The CUDA runtime takes a block-sparse pattern whole: one kred_grid_state launch, equal to dense numpy
    restricted to the kept blocks (float64)."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((40, 2)), rng.standard_normal((50, 2))
    kept = {(0, 20): [(0, 10), (30, 50)], (20, 40): [(5, 25)]}
    ranges = (np.array(list(kept)), np.array([2, 3]), np.array([c for cols in kept.values() for c in cols]),
              np.array([[0, 50]]), np.array([1]), np.array([[0, 40]]))
    op = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op=name, axis=1)
    got = op(x, y, backend="cuda", ranges=ranges)
    d = ((x[:, None] - y[None]) ** 2).sum(-1)
    mask = np.zeros_like(d, bool)
    for (r0, r1), cols in kept.items():
        for c0, c1 in cols:
            mask[r0:r1, c0:c1] = True
    if name == "Sum":
        np.testing.assert_allclose(got[:, 0], np.where(mask, d, 0).sum(1), rtol=1e-12)
    else:
        masked = np.where(mask, d, np.inf)
        np.testing.assert_allclose(got[0][:, 0], masked.min(1), rtol=1e-12)
        np.testing.assert_array_equal(got[1][:, 0], masked.argmin(1))
    assert [launch[0] for launch in emulated_gpu.launches] == ["kred_grid_state"]
