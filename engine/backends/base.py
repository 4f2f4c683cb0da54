"""The small interface every backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..grid import Grid, grid_state
from ..plan import DTYPES, Plan


class Backend(ABC):
    """A backend computes partial states of a plan over a block of rows and a block of columns.

    `arrays` are what `Plan.check_args` returned: contiguous, one dtype, full length (rows and columns are
    selected by the `rows` / `cols` ranges, so callers such as the cluster never copy slices).
    """

    name: str
    xp = np                 # the array module `Plan.check_args` gives this backend (CuPy for GPU-resident inputs)
    dtypes = DTYPES         # the input dtypes it computes in

    def bind(self, args, device_id: int = -1) -> "Backend":
        """The instance that runs one call on `args` (the CUDA backend picks its device and stream here)."""
        return self

    def prepare(self, plan: Plan, dtype) -> None:
        """Build and cache what calls of `plan` on `dtype` inputs need (the service calls it under its compile time
        limit); nothing to do where nothing compiles."""

    @abstractmethod
    def partial(self, plan: Plan, arrays: list[np.ndarray], rows: tuple[int, int], cols: tuple[int, int]) -> tuple:
        """The reduction's state for rows [r0, r1) reduced over columns [c0, c1)."""

    def reduce(self, plan: Plan, arrays: list[np.ndarray], n: int, m: int):
        """The finished result over every row and column."""
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        return plan.reduction.finalize(self.partial(plan, arrays, (0, n), (0, m)), dtype)

    def grid_state(self, plan: Plan, arrays: list[np.ndarray], grid: Grid) -> tuple:
        """The state of the grid's rows (engine.grid): here one `partial` per column range of each item; compiled
        backends take the whole grid in one call."""
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        acc = plan.acc_dtype(dtype)
        return grid_state(grid, plan.reduction, lambda rows, cols: self.partial(plan, arrays, rows, cols),
                          lambda count: plan.reduction.identity(count, dtype, acc))

    def reduce_grid(self, plan: Plan, arrays: list[np.ndarray], grid: Grid):
        """The finished result of the grid's rows."""
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        return plan.reduction.finalize(self.grid_state(plan, arrays, grid), dtype)
