"""The torch binding of LazyTensor (engine.lazytensor): torch tensors in and out, reductions through
`engine.torch.genred.reduce`, the autograd Function behind `engine.torch.Genred`, so every LazyTensor reduction is
differentiable to any order (`create_graph=True`).

It lives beside the torch autograd it runs on rather than beside the numpy binding (engine/lazytensor/numpy.py):
engine.torch exports it, so a binding outside engine/torch that imports engine.torch.genred would close an import
circle between the two packages (tests/test_imports.py)."""
from __future__ import annotations

import torch

from ..lazytensor import ComplexLazyTensorMixin, LazyTensorBase, variable_helpers
from .genred import Options, reduce
from .kernel_solve import KernelSolve


class LazyTensor(LazyTensorBase):
    """A symbolic torch tensor; see engine.lazytensor.base.LazyTensorBase.

    >>> x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    >>> a = (-((x_i - y_j) ** 2).sum(-1)).exp().sum(dim=1)        # (N, 1), differentiable in x and y

    `dtype` is a numpy dtype (pykeops gives the name, "float32"), so scipy's aslinearoperator can read it.
    """

    @staticmethod
    def _is_array(x) -> bool:
        return isinstance(x, torch.Tensor)

    @staticmethod
    def _reshape(x, shape):
        return x.reshape(shape)

    @staticmethod
    def _dtype_name(x) -> str:
        return str(x.dtype).removeprefix("torch.")

    @staticmethod
    def _from_list(values, dtype_name, like):
        return torch.tensor(values, dtype=getattr(torch, dtype_name), device=None if like is None else like.device)

    @classmethod
    def _reduce(cls, plan, args, call):
        options = Options(call.get("backend", "auto"), call.get("device_id", -1), call.get("ranges"))
        return reduce(plan, args, options, out=call.get("out"))

    @staticmethod
    def _kernel_solve_class():
        return KernelSolve

    @staticmethod
    def _complex_class():
        return ComplexLazyTensor

    @staticmethod
    def _is_complex_array(x) -> bool:
        return x.is_complex()

    @staticmethod
    def _real_pairs(x):
        return torch.view_as_real(x.resolve_conj()).reshape(x.shape[:-1] + (2 * x.shape[-1],))

    @staticmethod
    def _complex_values(x):
        return torch.view_as_complex(x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2)).contiguous())


class ComplexLazyTensor(ComplexLazyTensorMixin, LazyTensor):
    """A complex symbolic torch tensor (complex64 / complex128), differentiable; see
    engine.lazytensor.complex.ComplexLazyTensorMixin."""


Vi, Vj, Pm = variable_helpers(LazyTensor)

__all__ = ["ComplexLazyTensor", "LazyTensor", "Pm", "Vi", "Vj"]
