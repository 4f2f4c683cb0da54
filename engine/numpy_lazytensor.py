"""The numpy binding of LazyTensor (engine.lazytensor): numpy arrays in, numpy arrays out, reductions run by
engine.run on a plan built straight from the formula nodes (no text, no parsing)."""
from __future__ import annotations

import numpy as np

from .kernel_solve import KernelSolve
from .lazytensor import LazyTensorBase, variable_helpers
from .run import run


class LazyTensor(LazyTensorBase):
    """A symbolic numpy array; see engine.lazytensor.LazyTensorBase.

    >>> x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    >>> a = (-((x_i - y_j) ** 2).sum(-1)).exp().sum(axis=1)        # (N, 1)
    """

    @staticmethod
    def _is_array(x) -> bool:
        return isinstance(x, np.ndarray)

    @staticmethod
    def _reshape(x, shape):
        return np.reshape(x, shape)

    @staticmethod
    def _dtype_name(x) -> str:
        return np.asarray(x).dtype.name

    @staticmethod
    def _from_list(values, dtype_name, like):
        return np.asarray(values, dtype=dtype_name)

    @classmethod
    def _reduce(cls, plan, args, call):
        return run(plan, args, **call)

    @staticmethod
    def _kernel_solve_class():
        return KernelSolve


Vi, Vj, Pm = variable_helpers(LazyTensor)

__all__ = ["LazyTensor", "Pm", "Vi", "Vj"]
