"""A job's inputs as blocks in the object store, and the byte-bounded cache each worker keeps of them.

The arrays are cut along the shard grid: one object per row block (every i variable's rows of that block), one per
column range (every j variable's rows in it), one for the parameters; each is put in the object store once. A shard
fetches only its row block, its column ranges and the parameters, so a worker's memory and the bytes moved to its
node follow its shards, not N + M. (Column ranges of `ranges` that overlap are stored once per distinct range.)
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..plan import COLS, PARAM, ROWS, Plan
from ..reductions import NO_INDEX
from .sharding import Shard

CACHE_BYTES = 512 << 20      # default per-worker block cache: a few blocks of a 10^8-point job


@dataclass(frozen=True)
class BlockRefs:
    """What one shard reads: object refs (kept in lists so Ray passes them unresolved) and their sizes in bytes."""
    refs: list                   # [row block, column range..., parameters]
    nbytes: tuple[int, ...]

    @property
    def keys(self) -> list[str]:
        return [ref.hex() for ref in self.refs]


class JobBlocks:
    """The object-store blocks of one job, put once each, by row block and column block index."""

    def __init__(self, plan: Plan, arrays: list[np.ndarray], shards: list[Shard], rows: bool = True):
        """`rows=False`: the row-side inputs are not arrays here (a dataset job's workers read them)."""
        import ray
        self.plan = plan
        if rows:
            self.rows = {b: self._put(ray, [a[r0:r1] for a, spec in zip(arrays, plan.args) if spec.role == ROWS])
                         for b, (r0, r1) in sorted({(s.block, s.rows) for s in shards if s.cols})}
        else:
            empty = self._put(ray, [])
            self.rows = {s.block: empty for s in shards}
        # a column-side input given as None is a dataset the workers read themselves (dataset.RowReader)
        self.cols = {(c0, c1): self._put(ray, [a[c0:c1] for a, spec in zip(arrays, plan.args)
                                               if spec.role == COLS and a is not None])
                     for c0, c1 in sorted({cols for s in shards for cols in s.cols})}
        self.params = self._put(ray, [a for a, spec in zip(arrays, plan.args) if spec.role == PARAM])

    @staticmethod
    def _put(ray, parts: list[np.ndarray]):
        return ray.put(parts), sum(int(p.nbytes) for p in parts)

    def for_shard(self, shard: Shard) -> BlockRefs:
        picked = [self.rows[shard.block], *(self.cols[cols] for cols in shard.cols), self.params]
        return BlockRefs([ref for ref, _ in picked], tuple(size for _, size in picked))

    def keys(self) -> list[str]:
        return list({ref.hex() for ref, _ in [*self.rows.values(), *self.cols.values(), self.params]})


def shard_arrays(plan: Plan, row_parts, col_parts, param_parts) -> list:
    """The plan's argument list for one shard, from its blocks (in the plan's argument order)."""
    parts = {ROWS: iter(row_parts), COLS: iter(col_parts), PARAM: iter(param_parts)}
    return [next(parts[spec.role]) for spec in plan.args]


def shift_indices(plan: Plan, state: tuple, c0: int) -> tuple:
    """A state computed on a column block starting at global column `c0`: its index slots made global."""
    if c0 == 0:
        return state
    out = []
    for part, (_, _, kind) in zip(state, plan.reduction.layout()):
        if kind == "index":
            part = np.where(part == NO_INDEX, part, part + c0)
        out.append(part)
    return tuple(out)


class BlockCache:
    """Least-recently-used blocks within a byte budget (one per worker); counts the bytes it had to fetch."""

    def __init__(self, budget: int = CACHE_BYTES):
        self.budget = budget
        self.blocks: OrderedDict[str, tuple] = OrderedDict()      # key -> (parts, nbytes)
        self.held = 0
        self.fetched = 0

    def get(self, key: str, load, nbytes: int | None = None):
        """The parts of block `key`, from the cache or through `load()` (which then count as fetched; `nbytes`
        defaults to the loaded parts' size)."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key][0]
        parts = load()
        nbytes = sum(int(p.nbytes) for p in parts) if nbytes is None else nbytes
        self.fetched += nbytes
        self.blocks[key] = parts, nbytes
        self.held += nbytes
        while self.held > self.budget and len(self.blocks) > 1:
            _, (_, size) = self.blocks.popitem(last=False)
            self.held -= size
        return parts

    def forget(self, keys) -> None:
        for key in keys:
            entry = self.blocks.pop(key, None)
            if entry is not None:
                self.held -= entry[1]
