"""LazyTensor: symbolic (..., N, M, D) arrays reduced without being built (pykeops's LazyTensor).

`base.py` is the framework-neutral LazyTensor (formulas, shapes, reductions, methods made from the op and reduction
tables), `complex.py` its complex variant, `numpy.py` the numpy binding (kred.numpy exports it). The torch binding
is engine/torch/lazytensor.py, beside the torch autograd it runs on (see there why).
"""
from .base import PYKEOPS_REFUSED, LazyReduction, LazyTensorBase, Variable, variable_helpers
from .complex import ComplexLazyTensorMixin

__all__ = ["PYKEOPS_REFUSED", "ComplexLazyTensorMixin", "LazyReduction", "LazyTensorBase", "Variable",
           "variable_helpers"]
