"""Every reduction under block-sparse `ranges`, on every backend (and the CUDA kernels' CPU emulation), both axes:
the result equals the dense reduction restricted to the kept blocks, computed here row by row from the dense twins of
tests/test_reductions.py. The pattern has a single-point cluster, single-column ranges, an empty cluster, rows in no
cluster, an empty row range, touching ranges (joined) and clusters given out of order."""
from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emulation
from kred.engine.backends.base import Backend
from kred.engine.ranges import reduce_blocks
from kred.engine.numpy import Genred
from kred.engine.reductions import REDUCTIONS
from test_reductions import DENSE, K, assert_close, genred, scalar, vector, weights

R, C = 13, 17          # output rows, reduced columns
PATTERN = [            # (row range, column ranges), in the order given to the engine
    ((9, 13), [(12, 17), (0, 2)]),                  # out of order
    ((0, 1), [(3, 4), (5, 6), (7, 8), (10, 11)]),   # one point, single-column ranges
    ((5, 7), []),                                   # an empty cluster
    ((8, 8), [(0, 17)]),                            # no rows
    ((1, 5), [(0, 5), (5, 9)]),                     # touching ranges
]                                                   # rows 7 and 8: in no cluster


def triple():
    clusters = np.array([rows for rows, _ in PATTERN])
    slices = np.cumsum([len(cols) for _, cols in PATTERN])
    reduced = np.array([c for _, cols in PATTERN for c in cols]).reshape(-1, 2)
    return clusters, slices, reduced


def kept_columns(row: int) -> list[int]:
    return sorted({j for (r0, r1), cols in PATTERN if r0 <= row < r1 for c0, c1 in cols for j in range(c0, c1)})


def empty_row(name: str):
    """What a row that reduces over nothing gives, output by output."""
    weighted = REDUCTIONS[name].weighted
    d, d2 = (1 if weighted else 2), 4
    width = K * d if REDUCTIONS[name].needs_k else d
    largest = "Max" in name
    values = {"Sum": [0.0] * d, "LogSumExp": [-np.inf] * d, "LogSumExpWeight": [-np.inf] * d2,
              "SumSoftMaxWeight": [np.nan] * d2, "Max_SumShiftExp": [-np.inf] * d + [0.0] * d,
              "Max_SumShiftExpWeight": [-np.inf] * d + [0.0] * d2}.get(name, [-np.inf if largest else np.inf] * width)
    emits = getattr(REDUCTIONS[name], "emits", ("value",))
    out = tuple(np.array(values) if kind == "value" else np.full(width, -1) for kind in emits)
    return out[0] if len(out) == 1 else out


def restricted(name: str, x, y, axis: int):
    """The dense reduction of each row over its kept columns only (column indices as in the full problem)."""
    weighted, reduce = DENSE[name]
    xs, ys = x.astype(np.float64)[:, None, :], y.astype(np.float64)[None, :, :]
    F, G = (scalar(xs, ys) if weighted else vector(xs, ys)), weights(xs, ys)
    if axis == 0:
        F, G = F.transpose(1, 0, 2), G.transpose(1, 0, 2)
    rows = []
    for r in range(R):
        cols = kept_columns(r)
        if not cols:
            rows.append(empty_row(name))
            continue
        got = reduce(F[r:r + 1, cols], G[r:r + 1, cols])
        got = got if isinstance(got, tuple) else (got,)
        rows.append(tuple(np.asarray(cols)[g[0]] if g.dtype.kind == "i" else g[0] for g in got))
        rows[-1] = rows[-1][0] if len(rows[-1]) == 1 else rows[-1]
    if isinstance(rows[0], tuple):
        return tuple(np.stack([row[k] for row in rows]) for k in range(len(rows[0])))
    return np.stack(rows)


def problem(axis: int, seed: int = 5):
    """x, y and the 6-tuple: the pattern in the half that `axis` reads, a full pattern in the other half."""
    rng = np.random.default_rng(seed)
    n, m = (R, C) if axis == 1 else (C, R)
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((m, 2))
    if axis == 1:
        ranges = triple() + (np.array([[0, m]]), np.array([1]), np.array([[0, n]]))
    else:
        ranges = (np.array([[0, n]]), np.array([1]), np.array([[0, m]])) + triple()
    return x, y, ranges


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_every_reduction_with_ranges_matches_the_restricted_dense_reduction(name, axis, backend):
    x, y, ranges = problem(axis)
    got = genred(name, axis)(x, y, backend=backend, ranges=ranges)
    assert_close(got, restricted(name, x, y, axis), np.float64)


class _EmulatedCuda(Backend):
    """The CUDA kernels (run by tests/cuda_emulation.py) behind the Backend interface: ranges reach them through the
    block runtime's default loop, as they reach the real cuda backend."""
    name = "cuda-emulated"

    def partial(self, plan, arrays, rows, cols):
        like = plan.reduction.identity(0, arrays[0].dtype, plan.acc_dtype(arrays[0].dtype))
        states = emulation.execute(plan, arrays, rows, cols, final=False)
        return tuple(s.reshape((rows[1] - rows[0],) + w.shape[1:]).astype(w.dtype) for s, w in zip(states, like))


class _EmulatedCudaGrid(Backend):
    """The CUDA block-sparse kernel (kred_grid_*, run by tests/cuda_emulation.py): the whole grid in one launch."""
    name = "cuda-emulated-grid"

    def partial(self, plan, arrays, rows, cols):
        raise AssertionError("a grid must reach the kernel whole, not block by block")

    def grid_state(self, plan, arrays, grid):
        m = next(len(a) for spec, a in zip(plan.args, arrays) if spec.role == 1)
        like = plan.reduction.identity(0, arrays[0].dtype, plan.acc_dtype(arrays[0].dtype))
        states = emulation.execute(plan, arrays, grid.rows, (0, m), final=False, grid=grid)
        n = grid.rows[1] - grid.rows[0]
        return tuple(s.reshape((n,) + w.shape[1:]).astype(w.dtype) for s, w in zip(states, like))


@pytest.mark.parametrize("emulated", [_EmulatedCuda, _EmulatedCudaGrid], ids=["block-by-block", "one-grid-launch"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_every_reduction_with_ranges_in_the_cuda_emulation(name, axis, emulated):
    x, y, ranges = problem(axis)
    op = genred(name, axis)
    arrays, dtype, n, m = op.plan.check_args([x, y])
    got = reduce_blocks(emulated(), op.plan, arrays, n, m, ranges)
    assert_close(got, restricted(name, x, y, axis), np.float64)


@pytest.mark.parametrize("name", ["ArgMin", "Min_ArgMin", "ArgMax", "Max_ArgMax"])
def test_all_infinite_values_select_the_first_kept_column(name, backend):
    """All values equal to the identity (+inf for Min, -inf for Max): each row selects its lowest kept column (not
    column 0, nor -1), rows in no cluster give -1; also in the CUDA grid kernel's emulation."""
    b = np.full((C, 1), -np.inf if "Max" in name else np.inf)
    x = np.zeros((R, 1))
    op = Genred("b + x * 0", ["x = Vi(1)", "b = Vj(1)"], reduction_op=name, axis=1)
    ranges = triple() + (np.array([[0, C]]), np.array([1]), np.array([[0, R]]))
    want = np.array([min(kept_columns(r), default=-1) for r in range(R)])
    arrays, _, n, m = op.plan.check_args([x, b])
    emulated = reduce_blocks(_EmulatedCudaGrid(), op.plan, arrays, n, m, ranges)
    for got in (op(x, b, backend=backend, ranges=ranges), emulated):
        index = got[1] if isinstance(got, tuple) else got
        np.testing.assert_array_equal(index[:, 0], want)
