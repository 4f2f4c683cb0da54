"""The numpy binding of LazyTensor (engine.lazytensor): numpy arrays in, numpy arrays out, reductions run by
engine.run on a plan built straight from the formula nodes (no text, no parsing)."""
from __future__ import annotations

import numpy as np

from ..errors import ArgumentError
from ..kernel_solve import KernelSolve
from ..run import run
from .base import LazyTensorBase, variable_helpers
from .complex import ComplexLazyTensorMixin


class LazyTensor(LazyTensorBase):
    """A symbolic numpy array; see engine.lazytensor.base.LazyTensorBase.

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

    @staticmethod
    def _complex_class():
        return ComplexLazyTensor

    @staticmethod
    def _is_complex_array(x) -> bool:
        return np.iscomplexobj(x)

    @staticmethod
    def _real_pairs(x):
        if x.dtype not in (np.complex64, np.complex128):
            raise ArgumentError(f"ComplexLazyTensor: dtype {x.dtype} is not supported; use complex64 or complex128")
        return np.ascontiguousarray(x).view(x.real.dtype)

    @staticmethod
    def _complex_values(x):
        return np.ascontiguousarray(x).view({np.dtype(np.float32): np.complex64}.get(x.dtype, np.complex128))


class ComplexLazyTensor(ComplexLazyTensorMixin, LazyTensor):
    """A complex symbolic numpy array (complex64 / complex128); see engine.lazytensor.complex.ComplexLazyTensorMixin."""


Vi, Vj, Pm = variable_helpers(LazyTensor)

__all__ = ["ComplexLazyTensor", "LazyTensor", "Pm", "Vi", "Vj"]
