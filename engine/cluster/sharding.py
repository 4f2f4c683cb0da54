"""Cutting a plan's rows x columns into shards, and putting the shards' partial states back together.

A shard is an item of the block runtime's dense grid (engine.grid): a block of rows (the i variables after the
plan's normalisation) reduced over a block of columns. Shards of different row blocks are concatenated; shards of the
same row block but different column blocks are partial states merged in column order (`Assembler`, from the grid).
The grid is finer than the number of workers (a work queue, not a static split): fast workers take more shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ArgumentError
from ..grid import Assembler, Grid

__all__ = ["Assembler", "Shard", "choose_split", "make_shards", "shards_of"]

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
    cols: tuple[tuple[int, int], ...]     # column ranges reduced in this order (one for a dense split; none: identity)


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
    """The shards for `split` = (row blocks, column blocks): the items of the dense grid, in row-major order."""
    row_blocks, col_blocks = _check_split(split)
    return shards_of(Grid.dense((0, n), (0, m), row_blocks, col_blocks))


def shards_of(grid: Grid) -> list[Shard]:
    """One shard per item of a grid of the block runtime (a dense split, or the row clusters of `ranges`)."""
    return [Shard(item.index, item.block, item.part, item.rows, item.cols) for item in grid.items]


def _check_split(split) -> tuple[int, int]:
    try:
        row_blocks, col_blocks = (int(s) for s in split)
    except (TypeError, ValueError):
        raise ArgumentError(f"split must be a pair (row blocks, column blocks), got {split!r}") from None
    if row_blocks < 1 or col_blocks < 1:
        raise ArgumentError(f"split must have at least one row block and one column block, got {split!r}")
    return row_blocks, col_blocks
