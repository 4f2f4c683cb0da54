"""ComplexLazyTensor: a LazyTensor of complex values, as pykeops's, over real formulas of twice the dimension.

Complex numbers are a front-end matter: a complex vector of dimension d is a real one of dimension 2d, (re, im)
interleaved (as in KeOps); the complex ops are composite rows of the op table over real ones. Backends, plans, the
cluster and the service only ever see real arrays.
"""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import ArgumentError
from .base import LazyTensorBase, _is_number

class ComplexLazyTensorMixin:
    """A complex symbolic array, as pykeops's ComplexLazyTensor: built from a complex array, a complex number or a
    list of them, its formula is the real one of dimension 2d with (re, im) interleaved, and reductions (Sum) give
    complex arrays. The conversion happens here, at the front end: the engine only ever sees real arrays.

    A binding's ComplexLazyTensor is `class ComplexLazyTensor(ComplexLazyTensorMixin, LazyTensor)`.
    """

    is_complex = True

    def __init__(self, x=None, axis=None, is_complex=True):
        if isinstance(x, numbers.Complex) and not isinstance(x, (bool, np.ndarray)):
            x = [x]
        if isinstance(x, list):
            x = [float(part) for value in x for part in (complex(value).real, complex(value).imag)]
        elif x is not None and self._is_array(x):
            if not self._is_complex_array(x):
                raise ArgumentError(f"ComplexLazyTensor: expected a complex array, got {self._dtype_name(x)}; "
                                    "use LazyTensor(x).real2complex() for a real one")
            x = self._real_pairs(x)
        super().__init__(x, axis)

    @classmethod
    def _real_class(cls):
        return next(c for c in cls.__mro__ if issubclass(c, LazyTensorBase) and
                    not issubclass(c, ComplexLazyTensorMixin))

    def _complex(self, other):
        """`other` as a ComplexLazyTensor: complex ones as they are, real ones (LazyTensors, arrays, numbers) + 0i."""
        if isinstance(other, ComplexLazyTensorMixin):
            return other
        if isinstance(other, numbers.Complex) and not isinstance(other, (numbers.Real, np.ndarray)):
            return type(self)(other)
        if self._is_array(other) and self._is_complex_array(other):
            return type(self)(other)
        return self._as_real(other).real2complex()

    def _as_real(self, other):
        return other if isinstance(other, LazyTensorBase) else self._real_class()(other)

    def _complex_op(self, op, other):
        return self._op(op, self._complex(other))

    @property
    def shape(self):
        shape = self._shape
        shape = shape[:-1] + (shape[-1] // 2,)
        return shape[:-1] if shape[-1] == 1 else shape

    @property
    def dtype(self):
        return None if self._dtype is None else np.dtype({"float32": "complex64", "float64": "complex128"}
                                                         .get(self._dtype, "complex64"))

    def __add__(self, other):
        return self._complex_op("ComplexAdd", other)

    def __radd__(self, other):
        return self._complex(other)._complex_op("ComplexAdd", self)

    def __sub__(self, other):
        return self._complex_op("ComplexSubtract", other)

    def __rsub__(self, other):
        return self._complex(other)._complex_op("ComplexSubtract", self)

    def __mul__(self, other):
        if _is_number(other) or (isinstance(other, LazyTensorBase) and not other.is_complex and other.ndim == 1):
            return self._as_real(other)._op("ComplexRealScal", self, cls=type(self))   # a real scalar: no promotion
        return self._complex_op("ComplexMult", other)

    def __rmul__(self, other):
        return self * other         # complex multiplication commutes

    def __truediv__(self, other):
        return self._complex_op("ComplexDivide", other)

    def __rtruediv__(self, other):
        return self._complex(other)._complex_op("ComplexDivide", self)

    def __neg__(self):
        return self._op("Minus")

    def __pow__(self, other):
        if other == 2:
            return self * self
        raise ArgumentError("ComplexLazyTensor: only z ** 2 is defined; write products and ComplexExp instead")

    def __abs__(self):
        return self._op("ComplexAbs", cls=self._real_class())

    abs = __abs__

    @property
    def real(self):
        return self._op("ComplexReal", cls=self._real_class())

    @property
    def imag(self):
        return self._op("ComplexImag", cls=self._real_class())

    def angle(self):
        return self._op("ComplexAngle", cls=self._real_class())

    def conj(self):
        return self._op("Conj")

    def exp(self):
        return self._op("ComplexExp")

    def sum(self, axis=-1, dim=None, **options):
        axis = axis if dim is None else dim
        if self._is_vector_axis(axis):
            return self._op("ComplexSum")
        return self.reduction("Sum", axis=axis, **options)

    def real2complex(self):
        raise ArgumentError("real2complex: this LazyTensor is complex already")

    imag2complex = exp1j = real2complex
