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


@dataclass(frozen=True)
class Grid:
    rows: Range                  # the output rows the grid covers
    items: tuple[Item, ...]

    @property
    def blocks(self) -> list[Range]:
        """The row blocks, in order."""
        seen: dict[int, Range] = {}
        for item in self.items:
            seen.setdefault(item.block, item.rows)
        return [seen[b] for b in sorted(seen)]

    @property
    def pairs(self) -> int:
        return sum(item.pairs for item in self.items)

    @classmethod
    def dense(cls, rows: Range, cols: Range, row_blocks: int = 1, col_blocks: int = 1) -> Grid:
        """Rows x columns cut into `row_blocks` x `col_blocks` nearly equal pieces, one item each, row-major."""
        items: list[Item] = []
        for b, block_rows in enumerate(cuts(rows, row_blocks)):
            for p, block_cols in enumerate(cuts(cols, col_blocks)):
                items.append(Item(len(items), b, p, block_rows, (block_cols,) if block_cols[1] > block_cols[0] else ()))
        return cls(rows, tuple(items))

    @classmethod
    def tiles(cls, rows: Range, cols: Range, tile_rows: int, tile_cols: int) -> Grid:
        """One item per block of `tile_rows` rows, holding the columns cut into ranges of `tile_cols`."""
        (r0, r1), (c0, c1) = rows, cols
        col_tiles = tuple((j, min(j + tile_cols, c1)) for j in range(c0, c1, max(1, tile_cols)))
        items = tuple(Item(b, b, 0, (i, min(i + tile_rows, r1)), col_tiles)
                      for b, i in enumerate(range(r0, r1, max(1, tile_rows))))
        return cls(rows, items)

    @classmethod
    def from_ranges(cls, clusters: np.ndarray, slices: np.ndarray, reduced: np.ndarray, n: int) -> Grid:
        """The grid of a block-sparse reduction over n rows (arrays as `engine.ranges.check_ranges` returns them).

        Cluster k reduces over `reduced[slices[k-1]:slices[k]]`. Clusters may come in any order and may overlap:
        rows covered by several clusters reduce over the column ranges of each, in cluster order. Touching column
        ranges are joined, empty ones dropped."""
        begins = np.concatenate([[0], slices[:-1]]).astype(np.int64) if len(slices) else np.zeros(0, np.int64)
        pieces = [(int(r0), int(r1), reduced[b:e]) for (r0, r1), b, e in zip(clusters.tolist(), begins, slices)
                  if r1 > r0]
        pieces.sort(key=lambda p: p[0])         # stable: overlapping clusters keep their given order
        if any(a[1] > b[0] for a, b in zip(pieces, pieces[1:])):
            pieces = _disjoint(pieces)
        items: list[Item] = []
        at = 0
        for r0, r1, columns in pieces:
            if r0 > at:
                items.append(Item(len(items), len(items), 0, (at, r0), ()))
            items.append(Item(len(items), len(items), 0, (r0, r1), _coalesce(columns)))
            at = r1
        if at < n or not items:
            items.append(Item(len(items), len(items), 0, (at, n), ()))
        return cls((0, n), tuple(items))

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(block rows (B, 2), offsets (B + 1,), column ranges (R, 2)), int64: block b reduces over column ranges
        offsets[b]:offsets[b + 1], its parts' ranges one after another in part order."""
        by_block: dict[int, list[Item]] = {}
        for item in self.items:
            by_block.setdefault(item.block, []).append(item)
        rows, offsets, cols = [], [0], []
        for b in sorted(by_block):
            parts = sorted(by_block[b], key=lambda item: item.part)
            rows.append(parts[0].rows)
            for item in parts:
                cols.extend(item.cols)
            offsets.append(len(cols))
        return (np.asarray(rows, np.int64).reshape(-1, 2), np.asarray(offsets, np.int64),
                np.asarray(cols, np.int64).reshape(-1, 2))


def cuts(span: Range, pieces: int) -> list[Range]:
    """`pieces` contiguous ranges covering `span`, sizes differing by at most one (fewer when the span is shorter;
    one empty range for an empty span)."""
    start, stop = span
    size = stop - start
    pieces = max(1, min(int(pieces), size))
    edges = start + np.linspace(0, size, pieces + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _coalesce(pairs: np.ndarray) -> tuple[Range, ...]:
    """Column ranges in the given order, empty ones dropped and touching neighbours joined (fewer, longer ranges)."""
    out: list[Range] = []
    for c0, c1 in pairs.tolist():
        if c1 <= c0:
            continue
        if out and out[-1][1] == c0:
            out[-1] = (out[-1][0], c1)
        else:
            out.append((c0, c1))
    return tuple(out)


def _disjoint(pieces: list) -> list:
    """Overlapping row clusters cut at every cluster boundary: each segment reduces over the column ranges of every
    cluster covering it, in cluster order."""
    edges = sorted({e for r0, r1, _ in pieces for e in (r0, r1)})
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        covering = [cols for r0, r1, cols in pieces if r0 <= a and b <= r1]
        if covering:
            out.append((a, b, np.concatenate(covering)))
    return out


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
