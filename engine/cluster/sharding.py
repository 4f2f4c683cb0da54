"""Cutting a plan's rows x columns into shards, and putting the shards' partial states back together.

A shard is a block of rows (the i variables after the plan's normalisation) reduced over a block of columns. Shards
of different row blocks are concatenated; shards of the same row block but different column blocks are partial
states merged with the reduction's `merge`. The grid is finer than the number of workers (a work queue, not a static
split): fast workers simply take more shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from ..reductions import Reduction, merge_all

SHARDS_PER_WORKER = 4        # queue depth: enough to even out speed differences, few enough to keep overhead low
MIN_SHARD_PAIRS = 1 << 22    # below ~4M pairs a shard costs more in scheduling than it computes
MIN_SHARD_ROWS = 256         # a row block narrower than this wastes a GPU's threads: split columns instead
MAX_COLUMN_BLOCKS = 64       # bounds the partial states held per row block while waiting for its siblings


@dataclass(frozen=True)
class Shard:
    index: int
    block: int                 # which row block (results of different blocks are concatenated)
    part: int                  # which column block within the row block (partial states merged)
    rows: tuple[int, int]
    cols: tuple[int, int]


def choose_split(n: int, m: int, workers: int, shards_per_worker: int = SHARDS_PER_WORKER,
                 min_pairs: int = MIN_SHARD_PAIRS) -> tuple[int, int]:
    """How many (row blocks, column blocks) to cut an n x m reduction into for `workers` devices.

    Rows are split first (no merge needed); columns are split when there are too few rows to give every device
    enough row blocks, e.g. when M dominates.
    """
    pairs = max(n, 1) * max(m, 1)
    target = max(1, min(workers * shards_per_worker, pairs // max(min_pairs, 1)))
    row_blocks = max(1, min(target, n // MIN_SHARD_ROWS or 1))
    col_blocks = max(1, min(math.ceil(target / row_blocks), m, MAX_COLUMN_BLOCKS))
    return row_blocks, col_blocks


def make_shards(n: int, m: int, split: tuple[int, int]) -> list[Shard]:
    """The grid of shards for `split` = (row blocks, column blocks), in row-major order."""
    row_blocks, col_blocks = _check_split(split)
    row_edges = _edges(n, row_blocks)
    col_edges = _edges(m, col_blocks)
    shards = []
    for b, rows in enumerate(row_edges):
        for p, cols in enumerate(col_edges):
            shards.append(Shard(len(shards), b, p, rows, cols))
    return shards


def _check_split(split) -> tuple[int, int]:
    try:
        row_blocks, col_blocks = (int(s) for s in split)
    except (TypeError, ValueError):
        raise ArgumentError(f"split must be a pair (row blocks, column blocks), got {split!r}") from None
    if row_blocks < 1 or col_blocks < 1:
        raise ArgumentError(f"split must have at least one row block and one column block, got {split!r}")
    return row_blocks, col_blocks


def _edges(size: int, blocks: int) -> list[tuple[int, int]]:
    """`blocks` contiguous ranges covering [0, size) with sizes differing by at most one (fewer if size < blocks)."""
    blocks = max(1, min(blocks, size))
    cuts = np.linspace(0, size, blocks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


class Assembler:
    """Collects shard states in any order; gives the finished result once every shard is in.

    A row block's column states are merged in column order when the last one arrives, so the result does not depend
    on which worker finished first (retries and duplicates give bit-identical results).
    """

    def __init__(self, reduction: Reduction, shards: list[Shard]):
        self.reduction = reduction
        self.parts = {}                 # block -> {part: state}
        self.blocks = {}                # block -> merged state
        self.expected = {}              # block -> number of column parts
        for shard in shards:
            self.expected[shard.block] = self.expected.get(shard.block, 0) + 1
        self.done: set[int] = set()

    def add(self, shard: Shard, state: tuple) -> bool:
        """Record a shard's state; False if that shard was already in (a duplicate)."""
        if shard.index in self.done:
            return False
        self.done.add(shard.index)
        parts = self.parts.setdefault(shard.block, {})
        parts[shard.part] = state
        if len(parts) == self.expected[shard.block]:
            self.blocks[shard.block] = merge_all(self.reduction, [parts[p] for p in sorted(parts)])
            del self.parts[shard.block]
        return True

    def state(self) -> tuple:
        """The full state, row blocks concatenated in order."""
        missing = len(self.expected) - len(self.blocks)
        if missing:
            raise RuntimeError(f"{missing} row blocks are still missing")
        ordered = [self.blocks[b] for b in sorted(self.blocks)]
        return tuple(np.concatenate(parts, axis=0) for parts in zip(*ordered))
