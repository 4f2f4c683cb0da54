"""The block runtime: a reduction cut into work items, and the one order their partial states are merged in.

A `Grid` covers output rows [r0, r1) with **row blocks** that partition them (every row in exactly one block, blocks
in increasing row order). Each block is reduced over a list of column ranges, held by one or more **items**:

    Item(index, block, part, rows=(i0, i1), cols=((c0, c1), ...))

An item is the unit of work: a kernel call, a cluster shard, a progress step. Its state is its column ranges reduced
in the order given; the items of one block are merged in `part` order; blocks are concatenated. A block with no
column range gives the reduction's identity (what an all-False mask row gives). The same grid therefore gives the same
result whoever computes its items and in whatever order they finish (`Assembler` reorders).

Every path that cuts a reduction into pieces is a grid:
- a dense call (`Grid.dense`): row blocks x column blocks, the cluster's shards (engine/cluster/sharding.py), the
  service's progress steps (service/executors.py), the reference backend's tiles;
- a block-sparse call (`Grid.from_ranges`): one block per cluster of rows with its column ranges (pykeops `ranges`),
  gaps between clusters as blocks without columns. `Grid.csr()` is the same pattern as arrays, which the compiled
  CPU kernel takes whole (one call, OpenMP over row blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable

import numpy as np

from .reductions import Reduction, merge_all

Range = tuple[int, int]


@dataclass(frozen=True)
class Item:
    index: int                  # position in the grid's items
    block: int                  # which row block (blocks are concatenated in order)
    part: int                   # which part of its block (parts are merged in increasing order)
    rows: Range
    cols: tuple[Range, ...]     # column ranges, reduced in this order

    @property
    def pairs(self) -> int:
        return (self.rows[1] - self.rows[0]) * sum(c1 - c0 for c0, c1 in self.cols)


@dataclass(frozen=True, eq=False)
class Grid:
    """Held as arrays, so that a block-sparse pattern of millions of column ranges is built and handed to a kernel
    without a Python loop per block; `items` gives the same grid as Item objects, for loops that want them."""
    rows: Range                  # the output rows the grid covers
    block_rows: np.ndarray       # (B, 2) int64: the row blocks, in increasing order, partitioning `rows`
    item_block: np.ndarray       # (I,) int64: each item's block, non-decreasing
    item_part: np.ndarray        # (I,) int64: each item's part within its block, increasing within a block
    item_offsets: np.ndarray     # (I + 1,) int64: item k reduces over col_ranges[item_offsets[k]:item_offsets[k + 1]]
    col_ranges: np.ndarray       # (R, 2) int64

    @classmethod
    def from_items(cls, rows: Range, items: Iterable[tuple[Range, int, Iterable[Range]]]) -> Grid:
        """A grid from (rows, part, column ranges) triples in block order; consecutive items with the same rows are
        parts of one block."""
        block_rows, item_block, item_part, offsets, ranges = [], [], [], [0], []
        for item_rows, part, cols in items:
            if not block_rows or tuple(block_rows[-1]) != tuple(item_rows):
                block_rows.append(tuple(item_rows))
            item_block.append(len(block_rows) - 1)
            item_part.append(part)
            ranges.extend(cols)
            offsets.append(len(ranges))
        return cls(rows, _pairs(block_rows), np.asarray(item_block, np.int64), np.asarray(item_part, np.int64),
                   np.asarray(offsets, np.int64), _pairs(ranges))

    @classmethod
    def dense(cls, rows: Range, cols: Range, row_blocks: int = 1, col_blocks: int = 1) -> Grid:
        """Rows x columns cut into `row_blocks` x `col_blocks` nearly equal pieces, one item each, row-major."""
        col_cuts = cuts(cols, col_blocks)
        return cls.from_items(rows, ((block_rows, p, [c] if c[1] > c[0] else [])
                                     for block_rows in cuts(rows, row_blocks) for p, c in enumerate(col_cuts)))

    @classmethod
    def tiles(cls, rows: Range, cols: Range, tile_rows: int, tile_cols: int) -> Grid:
        """One item per block of `tile_rows` rows, holding the columns cut into ranges of `tile_cols`."""
        (r0, r1), (c0, c1) = rows, cols
        col_tiles = [(j, min(j + tile_cols, c1)) for j in range(c0, c1, max(1, tile_cols))]
        return cls.from_items(rows, (((i, min(i + tile_rows, r1)), 0, col_tiles)
                                     for i in range(r0, r1, max(1, tile_rows))))

    @classmethod
    def from_ranges(cls, clusters: np.ndarray, slices: np.ndarray, reduced: np.ndarray, n: int) -> Grid:
        """The grid of a block-sparse reduction over n rows (arrays as `engine.ranges.check_ranges` returns them):
        one block per cluster of rows with its column ranges, one block without columns per gap between clusters.

        Cluster k reduces over `reduced[slices[k-1]:slices[k]]`. Clusters may come in any order and may overlap
        (rows covered by several clusters reduce over the column ranges of each). A block's column ranges are put
        in increasing order (kernels then meet a row's columns in increasing order, see Reduction.c_accumulate),
        empty ones dropped and touching ones joined. Built with numpy only: no Python loop per cluster or range."""
        clusters, slices, reduced = (np.asarray(a, np.int64) for a in (clusters, slices, reduced))
        begins = np.concatenate([[0], slices[:-1]]).astype(np.int64)
        kept = np.flatnonzero(clusters[:, 1] > clusters[:, 0]) if len(clusters) else np.zeros(0, np.int64)
        order = kept[np.argsort(clusters[kept, 0], kind="stable")]
        clusters, begins, ends = clusters[order], begins[order], slices[order]
        if len(clusters) > 1 and np.any(clusters[1:, 0] < clusters[:-1, 1]):
            return cls.from_ranges(*_disjoint(clusters, begins, ends, reduced), n)
        # the column ranges of the clusters, in cluster order, empty ones dropped, touching ones joined
        counts = ends - begins
        owner = np.repeat(np.arange(len(clusters)), counts)
        if len(clusters) and np.array_equal(begins[1:], ends[:-1]):      # the usual case: no gather needed
            starts, stops = reduced[begins[0]:ends[-1], 0], reduced[begins[0]:ends[-1], 1]
        else:
            picks = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(begins, counts)
            starts, stops = reduced[picks, 0], reduced[picks, 1]
        nonempty = stops > starts
        if not nonempty.all():
            starts, stops, owner = starts[nonempty], stops[nonempty], owner[nonempty]
        # each cluster's ranges in column order: kernels then meet a row's columns in increasing order
        if len(starts) > 1 and not np.all((owner[1:] > owner[:-1]) | (starts[1:] >= starts[:-1])):
            order = np.lexsort((starts, owner))
            starts, stops, owner = starts[order], stops[order], owner[order]
        start = np.ones(len(starts), bool)
        start[1:] = (owner[1:] != owner[:-1]) | (starts[1:] != stops[:-1])
        first = np.flatnonzero(start)
        last = np.append(first[1:], len(starts)) - 1
        ranges = np.stack([starts[first], stops[last]], 1).astype(np.int64, copy=False)
        per_cluster = np.bincount(owner[first], minlength=len(clusters))
        # blocks: each cluster, preceded by a block without columns where rows are left before it, and a last gap
        previous_end = np.concatenate([[0], clusters[:-1, 1]])
        gap = clusters[:, 0] > previous_end
        at = np.arange(len(clusters)) + np.cumsum(gap)            # block index of each cluster
        end = int(clusters[-1, 1]) if len(clusters) else 0
        tail = end < n or not len(clusters)
        count = len(clusters) + int(gap.sum()) + int(tail)
        block_rows = np.zeros((count, 2), np.int64)
        ranges_per_block = np.zeros(count, np.int64)
        block_rows[at] = clusters
        ranges_per_block[at] = per_cluster
        block_rows[at[gap] - 1] = np.stack([previous_end[gap], clusters[gap, 0]], 1)
        if tail:
            block_rows[-1] = (end, n)
        offsets = np.concatenate([[0], np.cumsum(ranges_per_block)]).astype(np.int64)
        return cls((0, n), block_rows, np.arange(count, dtype=np.int64), np.zeros(count, np.int64), offsets, ranges)

    @cached_property
    def items(self) -> tuple[Item, ...]:
        rows = [tuple(r) for r in self.block_rows.tolist()]
        ranges = [tuple(c) for c in self.col_ranges.tolist()]
        offsets = self.item_offsets.tolist()
        return tuple(Item(k, b, p, rows[b], tuple(ranges[offsets[k]:offsets[k + 1]]))
                     for k, (b, p) in enumerate(zip(self.item_block.tolist(), self.item_part.tolist())))

    @property
    def blocks(self) -> list[Range]:
        """The row blocks, in order."""
        return [tuple(r) for r in self.block_rows.tolist()]

    def block_pairs(self) -> np.ndarray:
        """(B,) the number of (row, column) pairs each block reduces over."""
        widths = np.add.reduceat(self.col_ranges[:, 1] - self.col_ranges[:, 0], self.csr()[1][:-1]) \
            if len(self.col_ranges) else np.zeros(len(self.block_rows), np.int64)
        empty = np.diff(self.csr()[1]) == 0               # reduceat gives the next value for an empty segment
        widths = np.where(empty, 0, widths)
        return widths * (self.block_rows[:, 1] - self.block_rows[:, 0])

    @property
    def pairs(self) -> int:
        return int(self.block_pairs().sum())

    def part(self, b0: int, b1: int) -> "Grid":
        """The grid of row blocks [b0, b1) alone (its rows, items and column ranges), for running a grid in pieces."""
        i0, i1 = np.searchsorted(self.item_block, (b0, b1))
        offsets = self.item_offsets[i0:i1 + 1]
        return Grid((int(self.block_rows[b0, 0]), int(self.block_rows[b1 - 1, 1])), self.block_rows[b0:b1],
                    self.item_block[i0:i1] - b0, self.item_part[i0:i1], offsets - offsets[0],
                    self.col_ranges[offsets[0]:offsets[-1]])

    def pieces(self, count: int) -> list["Grid"]:
        """The grid cut between row blocks into at most `count` parts of about equal pairs, in row order."""
        if len(self.block_rows) == 0:
            return [self]
        done = np.cumsum(self.block_pairs())
        total = int(done[-1]) or 1
        ends = np.unique(np.searchsorted(done, np.linspace(total / count, total, count), side="left") + 1)
        ends = np.minimum(ends, len(self.block_rows))
        starts = np.concatenate(([0], ends[:-1]))
        return [self.part(int(b0), int(b1)) for b0, b1 in zip(starts, ends) if b1 > b0]

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(block rows (B, 2), offsets (B + 1,), column ranges (R, 2)), int64: block b reduces over column ranges
        offsets[b]:offsets[b + 1], its parts' ranges one after another in part order."""
        firsts = np.searchsorted(self.item_block, np.arange(len(self.block_rows) + 1))
        return self.block_rows, self.item_offsets[firsts], self.col_ranges


def _pairs(values) -> np.ndarray:
    return np.asarray(values, np.int64).reshape(-1, 2)


def cuts(span: Range, pieces: int) -> list[Range]:
    """`pieces` contiguous ranges covering `span`, sizes differing by at most one (fewer when the span is shorter;
    one empty range for an empty span)."""
    start, stop = span
    size = stop - start
    pieces = max(1, min(int(pieces), size))
    edges = start + np.linspace(0, size, pieces + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _disjoint(clusters, begins, ends, reduced):
    """Overlapping row clusters (sorted by start) cut at every cluster boundary: each segment reduces over the
    column ranges of every cluster covering it, in cluster order. Returns a (clusters, slices, reduced) triple."""
    edges = np.unique(clusters)
    segments, slices, ranges = [], [], []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        covering = [reduced[s:e] for (r0, r1), s, e in zip(clusters.tolist(), begins, ends) if r0 <= a and b <= r1]
        if covering:
            segments.append((a, b))
            ranges.extend(np.concatenate(covering).tolist())
            slices.append(len(ranges))
    return _pairs(segments), np.asarray(slices, np.int64), _pairs(ranges)


# Running a grid ---------------------------------------------------------------------------------------------------

Partial = Callable[[Range, Range], tuple]


def item_state(reduction: Reduction, item: Item, partial: Partial, identity: Callable[[int], tuple]) -> tuple:
    """An item's state: `partial(rows, cols)` of each of its column ranges, merged in order."""
    if not item.cols:
        return identity(item.rows[1] - item.rows[0])
    return merge_all(reduction, [partial(item.rows, cols) for cols in item.cols])


def grid_state(grid: Grid, reduction: Reduction, partial: Partial, identity: Callable[[int], tuple],
               after: Callable[[Item, float], None] | None = None) -> tuple:
    """The state of the grid's rows, its items computed one after another by `partial`. `after(item, fraction done)`
    runs after each item (progress reports; it may raise to stop)."""
    if not grid.items:
        return identity(grid.rows[1] - grid.rows[0])
    assembler = Assembler(reduction, grid.items)
    total, done = grid.pairs, 0
    for count, item in enumerate(grid.items, 1):
        assembler.add(item, item_state(reduction, item, partial, identity))
        done += item.pairs
        if after is not None:
            after(item, done / total if total else count / len(grid.items))
    return assembler.state()


class Assembler:
    """Collects item states in any order; gives the grid's state once every item is in.

    A row block's part states are merged in part order when its last part arrives, so the result does not depend on
    which worker finished first (retries and duplicates give bit-identical results). Works with any items that have
    `index`, `block` and `part` (the cluster's shards included).
    """

    def __init__(self, reduction: Reduction, items: Iterable):
        self.reduction = reduction
        self.parts: dict[int, dict[int, tuple]] = {}     # block -> {part: state}
        self.blocks: dict[int, tuple] = {}                # block -> merged state
        self.expected: dict[int, int] = {}                # block -> number of parts
        for item in items:
            self.expected[item.block] = self.expected.get(item.block, 0) + 1
        self.done: set[int] = set()

    def add(self, item, state: tuple) -> bool:
        """Record an item's state; False if that item was already in (a duplicate)."""
        if item.index in self.done:
            return False
        self.done.add(item.index)
        parts = self.parts.setdefault(item.block, {})
        parts[item.part] = state
        if len(parts) == self.expected[item.block]:
            self.blocks[item.block] = merge_all(self.reduction, [parts[p] for p in sorted(parts)])
            del self.parts[item.block]
        return True

    def state(self) -> tuple:
        """The full state, row blocks concatenated in order."""
        missing = len(self.expected) - len(self.blocks)
        if missing:
            raise RuntimeError(f"{missing} row blocks are still missing")
        ordered = [self.blocks[b] for b in sorted(self.blocks)]
        return tuple(np.concatenate(parts, axis=0) for parts in zip(*ordered))
