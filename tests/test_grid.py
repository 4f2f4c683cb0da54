"""The block runtime (engine.grid): grids partition their rows, keep every kept pair once, and merge in one order."""
from __future__ import annotations

import numpy as np
import pytest

from kred.engine.grid import Assembler, Grid, grid_state
from kred.engine.reductions import bind


def covered(grid: Grid, n: int, m: int) -> np.ndarray:
    """How many times each (row, column) pair is visited by the grid's items."""
    count = np.zeros((n, m), int)
    for item in grid.items:
        for c0, c1 in item.cols:
            count[item.rows[0]:item.rows[1], c0:c1] += 1
    return count


def assert_partition(grid: Grid, n: int):
    blocks = grid.blocks
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("n, m, split", [(10, 7, (3, 2)), (1, 1, (4, 4)), (100, 3, (7, 5))])
def test_dense_grid_covers_every_pair_once(n, m, split):
    grid = Grid.dense((0, n), (0, m), *split)
    assert_partition(grid, n)
    assert (covered(grid, n, m) == 1).all()
    assert [item.index for item in grid.items] == list(range(len(grid.items)))


def test_ranges_grid_partitions_rows_and_keeps_the_pattern():
    # clusters out of order, one empty, one overlapping another, rows 6..7 in none; touching column ranges
    clusters = np.array([[8, 10], [0, 3], [3, 6], [2, 5]])
    slices = np.array([2, 4, 4, 5])
    reduced = np.array([[1, 3], [3, 4], [7, 12], [0, 2], [6, 7]])
    grid = Grid.from_ranges(clusters, slices, reduced, 11)
    assert_partition(grid, 11)
    expected = np.zeros((11, 12), int)
    for (r0, r1), b, e in zip(clusters, [0, 2, 4, 4], slices):
        for c0, c1 in reduced[b:e]:
            expected[r0:r1, c0:c1] += 1
    assert (covered(grid, 11, 12) == expected).all()
    rows, offsets, cols = grid.csr()
    assert [tuple(r) for r in rows.tolist()] == grid.blocks and offsets[-1] == len(cols)
    first = [item for item in grid.items if item.rows == (8, 10)][0]
    assert first.cols == ((1, 4),)            # touching ranges joined


def test_grid_state_merges_in_part_order_whatever_the_arrival_order():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((9, 20, 1))
    reduction = bind("KMin_ArgKMin", 1, k=3)
    grid = Grid.dense((0, 9), (0, 20), 2, 3)

    def partial(rows, cols):
        return reduction.tile(f[rows[0]:rows[1], cols[0]:cols[1]], None, cols[0], np.float64)

    state = grid_state(grid, reduction, partial, lambda count: reduction.identity(count, f.dtype, np.float64))
    values, index = reduction.finalize(state, f.dtype)
    order = np.argsort(f[..., 0], axis=1, kind="stable")[:, :3]
    assert (index == order).all()
    np.testing.assert_array_equal(values, np.take_along_axis(f[..., 0], order, 1))
    backwards = Assembler(reduction, grid.items)
    for item in reversed(grid.items):
        backwards.add(item, partial(item.rows, item.cols[0]))
    assert all((a == b).all() for a, b in zip(backwards.state(), state))


def test_ranges_grid_of_many_clusters_is_built_without_a_python_loop_per_range():
    """A large random pattern (what the kernel gets) equals the pattern read range by range."""
    rng = np.random.default_rng(3)
    n, m, c = 5000, 4000, 400
    edges = np.sort(rng.choice(np.arange(1, n), c - 1, replace=False))
    clusters = np.stack([np.r_[0, edges], np.r_[edges, n]], 1)[rng.permutation(c)]
    counts = rng.integers(0, 6, c)
    starts = rng.integers(0, m, counts.sum())
    reduced = np.stack([starts, np.minimum(m, starts + rng.integers(0, 30, counts.sum()))], 1)
    grid = Grid.from_ranges(clusters, np.cumsum(counts), reduced, n)
    assert_partition(grid, n)
    want = np.zeros(n, int)
    begin = 0
    for (r0, r1), end in zip(clusters, np.cumsum(counts)):
        want[r0:r1] = sum(c1 - c0 for c0, c1 in reduced[begin:end])
        begin = end
    got = np.zeros(n, int)
    for item in grid.items:
        got[item.rows[0]:item.rows[1]] = sum(c1 - c0 for c0, c1 in item.cols)
    assert (got == want).all()
    assert grid.pairs == want.sum()
