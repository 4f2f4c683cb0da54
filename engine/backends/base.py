"""The small interface every backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..plan import Plan


class Backend(ABC):
    """A backend computes partial states of a plan over a block of rows and a block of columns.

    `arrays` are what `Plan.check_args` returned: contiguous, one dtype, full length (rows and columns are
    selected by the `rows` / `cols` ranges, so callers such as the cluster never copy slices).
    """

    name: str

    def available(self) -> bool:
        return True

    @abstractmethod
    def partial(self, plan: Plan, arrays: list[np.ndarray], rows: tuple[int, int], cols: tuple[int, int]) -> tuple:
        """The reduction's state for rows [r0, r1) reduced over columns [c0, c1)."""

    def reduce(self, plan: Plan, arrays: list[np.ndarray], n: int, m: int):
        """The finished result over every row and column."""
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        return plan.reduction.finalize(self.partial(plan, arrays, (0, n), (0, m)), dtype)
