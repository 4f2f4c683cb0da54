"""LazyTensor: symbolic (..., N, M, D) arrays written with ordinary operators and reduced without being built.

`LazyTensor(x[:, None, :])` is the (N, 1, D) array x seen as a variable indexed by i; `LazyTensor(y[None, :, :])` is a
variable indexed by j; `(x_i - y_j) ** 2` is then a symbolic (N, M, D) array: a formula node (engine.formula) plus
the list of arrays its `Var` leaves stand for. Reductions (`sum(dim=1)`, `logsumexp`, `argKmin`, ...) turn the pair
into a Plan and run it, so the N x M values are never stored.

This module is framework-neutral. A binding (`numpy.py` beside it, engine/torch/lazytensor.py) subclasses
`LazyTensorBase` and says how to recognise, reshape and create its arrays and how to run a reduction; `complex.py`
holds ComplexLazyTensor. The elementwise methods are made from the op table (`ops.LAZY_METHODS`), the reductions from the reduction table
(`Reduction.lazy_method`), at the end of this module.

Semantics follow pykeops.common.lazy_tensor: shapes, reduction names and output shapes, `axis`/`dim` counted after
the batch dimensions, `K @ v`, `.t()`, `.solve()`, symbolic variables `Vi(index, dim)`, and use as a scipy
LinearOperator, complex LazyTensors (`complex.py`: complex arrays become real ones of twice the dimension, (re, im)
interleaved, here at the front end). Differences: Python floats become `Const` nodes (exact, no parameter
array), comparisons are built from `Step`, and index outputs (argmin, argKmin, ...) are int64 arrays.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError, DimensionError
from ..formula import I, J, P, Node, make, to_text, var
from ..formula.autodiff import derivative_op
from ..formula.ops import LAZY_METHODS, MAX_INT_PARAM, OPS
from ..frontend import check_sum_scheme
from ..plan import Plan, plan_from_nodes, swap_ij
from ..ranges import swap_axes
from ..reductions import REDUCTIONS, as_k, called

CATEGORY = {0: I, 1: J, 2: P}
# Keyword arguments of a reduction: those that shape the plan, and those of the call.
PLAN_OPTIONS = ("dtype_acc", "use_double_acc", "use_fast_math")
CALL_OPTIONS = ("backend", "device_id", "ranges", "out")
# pykeops tuning knobs, accepted (sum_scheme is checked: see engine.frontend.SUM_SCHEMES): our backends choose their
# own tiling and chunking.
IGNORED_OPTIONS = ("enable_chunks", "optional_flags", "rec_multVar_highdim")


@dataclass(frozen=True, eq=False)
class Variable:
    """One leaf of a LazyTensor: an array (or a list of numbers, or a symbolic slot) and its category."""
    value: object           # an array of the binding, a list of floats (a parameter), or None when symbolic
    cat: int
    dim: int
    symbol: int | None = None       # the argument position of a symbolic variable `Vi(index, dim)`

    def same_as(self, other: "Variable") -> bool:
        if self.symbol is not None or other.symbol is not None:
            return self.symbol == other.symbol and self.cat == other.cat
        return self.value is other.value and self.cat == other.cat

    def swapped(self) -> "Variable":
        cat = self.cat if self.cat == P else 1 - self.cat
        return Variable(self.value, cat, self.dim, self.symbol)


# Public names of pykeops's LazyTensor that are its own machinery, refused with the way to do it here: reading one
# raises an AttributeError that says so.
_INTERNAL = ("pykeops's internal machinery; kred's LazyTensor holds its formula in .node and its arrays in "
             ".variables, and builds formulas with operators and methods (x + y, x.exp(), ...)")
PYKEOPS_REFUSED = {
    **{name: _INTERNAL for name in ("unary", "binary", "ternary", "tools", "get_tools", "lt_constructor", "init",
                                    "join", "promote", "fixvariables", "new_variable_index", "separate_kwargs")},
    "Genred": "pykeops's internal machinery; use kred.numpy.Genred or kred.torch.Genred",
    "KernelSolve": "pykeops's internal machinery; use kred.numpy.KernelSolve or kred.torch.KernelSolve",
}


class LazyTensorBase(ABC):
    """A symbolic array: a formula over `leaves` (Variables: arrays, lists of numbers or symbolic slots), plus the
    shape facts needed to reduce it.

    Attributes (as in pykeops): `ndim` is the vector dimension D, `ni` / `nj` the numbers of i / j points (None
    until a variable fixes them), `batchdims` the batch shape, `ranges` an optional block-sparsity pattern,
    `backend` an optional default backend for reductions, `variables` the arrays and `symbolic_variables` the
    symbolic slots.
    """

    __array_ufunc__ = None      # numpy hands `array + lazy` to our reflected operators
    __hash__ = object.__hash__   # comparisons build formulas, identity stays the hash

    # ---- what a binding provides ------------------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def _is_array(x) -> bool:
        ...

    @staticmethod
    @abstractmethod
    def _reshape(x, shape):
        ...

    @staticmethod
    @abstractmethod
    def _dtype_name(x) -> str:
        ...

    @staticmethod
    @abstractmethod
    def _from_list(values, dtype_name: str, like):
        ...

    @classmethod
    @abstractmethod
    def _reduce(cls, plan: Plan, args: list, call: dict):
        """Run `plan` on `args` with the call options (backend, device_id, ranges, out)."""

    @staticmethod
    @abstractmethod
    def _kernel_solve_class():
        """The binding's pykeops-style KernelSolve class."""

    @staticmethod
    @abstractmethod
    def _complex_class():
        """The binding's ComplexLazyTensor class."""

    @staticmethod
    @abstractmethod
    def _is_complex_array(x) -> bool:
        ...

    @staticmethod
    @abstractmethod
    def _real_pairs(x):
        """A complex array (..., d) as the real array (..., 2d), (re, im) interleaved."""

    @staticmethod
    @abstractmethod
    def _complex_values(x):
        """The inverse of `_real_pairs`: a real array (..., 2d) as the complex array (..., d)."""

    def __getattr__(self, name):
        if name in PYKEOPS_REFUSED:
            raise AttributeError(f"LazyTensor.{name} is {PYKEOPS_REFUSED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    is_complex = False          # ComplexLazyTensor (ComplexLazyTensorMixin) sets it

    # ---- construction -----------------------------------------------------------------------------------------
    def __new__(cls, x=None, axis=None, is_complex=False):
        # as pykeops: complex data (or is_complex=True) makes the binding's ComplexLazyTensor
        complex_data = (isinstance(x, numbers.Complex) and not isinstance(x, (numbers.Real, np.ndarray))) or \
            (isinstance(x, list) and any(isinstance(v, complex) for v in x)) or \
            (x is not None and cls._is_array(x) and cls._is_complex_array(x))
        if (is_complex or complex_data) and not cls.is_complex:
            cls = cls._complex_class()
        return super().__new__(cls)

    def __init__(self, x=None, axis=None, is_complex=False):
        self.node: Node | None = None
        self.leaves: tuple[Variable, ...] = ()
        self.batchdims: tuple[int, ...] = ()
        self.ni = self.nj = None
        self.ranges = None
        self.backend = None
        self._dtype: str | None = None
        if x is not None:
            self._init_from(x, axis)

    def _init_from(self, x, axis):
        if isinstance(x, tuple):
            self._init_symbolic(x, axis)
        elif isinstance(x, bool) or isinstance(x, (str, bytes)):
            raise TypeError(f"LazyTensor: cannot be built from {type(x).__name__} {x!r}")
        elif self._is_array(x):
            self._init_array(x, axis)
        elif isinstance(x, numbers.Integral) and not isinstance(x, np.ndarray):
            _no_axis(axis, "an integer", allowed=(None, 2))
            x = int(x)
            self.node = make("IntCst", (), (x,)) if abs(x) <= MAX_INT_PARAM else make("Const", (), (float(x),))
        elif isinstance(x, numbers.Real) and not isinstance(x, np.ndarray):
            _no_axis(axis, "a number", allowed=(None, 2))
            if math.isfinite(x):
                self.node = make("Const", (), (float(x),))
            else:       # inf or nan (`clamp(0, float("inf"))`): a parameter, as pykeops makes every float
                self._set_leaf(Variable([float(x)], P, 1))
        elif isinstance(x, list):
            if axis not in (None, 2):
                raise ArgumentError("LazyTensor: a list of numbers is a parameter; axis must be None or 2")
            values = [float(v) for v in x]
            if not values:
                raise ArgumentError("LazyTensor: the list of numbers is empty")
            self._set_leaf(Variable(values, P, len(values)))
        else:
            raise TypeError(f"LazyTensor: cannot be built from {type(x).__name__}; give an array, a number, a "
                            "list of numbers or a (index, dim, category) triple")

    def _init_symbolic(self, x, axis):
        if len(x) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
            raise ArgumentError(f"LazyTensor: a symbolic variable is a triple (index, dim, category), got {x!r}")
        _no_axis(axis, "a symbolic triple")
        index, dim, cat = x
        if cat not in CATEGORY or index < 0:
            raise ArgumentError(f"LazyTensor: symbolic variable {x!r} needs index >= 0 and category 0, 1 or 2")
        self._set_leaf(Variable(None, CATEGORY[cat], dim, symbol=index))

    def _init_array(self, x, axis):
        self._dtype = self._dtype_name(x)
        if self._dtype not in ("float16", "float32", "float64"):
            raise ArgumentError(f"LazyTensor: dtype {self._dtype} is not supported; use float16, float32 or float64")
        shape = tuple(x.shape)
        if len(shape) == 0:
            _no_axis(axis, "a 0-d array", allowed=(None, 2))
            x, cat, shape = self._reshape(x, (1,)), P, (1,)
        elif len(shape) >= 3:
            if axis is not None:
                raise ArgumentError("LazyTensor: axis must not be given for an array of 3 or more dimensions; "
                                    "the position of the size-1 axis tells i from j")
            self.batchdims = shape[:-3]
            ni, nj, d = shape[-3:]
            if ni == 1 and nj == 1:
                x, cat = self._reshape(x, self.batchdims + (d,)), P
            elif ni == 1:
                x, cat = self._reshape(x, self.batchdims + (nj, d)), J
            elif nj == 1:
                x, cat = self._reshape(x, self.batchdims + (ni, d)), I
            else:
                raise ArgumentError(f"LazyTensor: an array of shape {shape} must have a size-1 axis at -3 or -2: "
                                    "(..., N, 1, D) for i, (..., 1, M, D) for j, (..., 1, 1, D) for a parameter")
        elif len(shape) == 2 and axis in (0, 1):
            cat = CATEGORY[axis]
        elif len(shape) == 1 or axis == 2:
            _no_axis(axis, "a 1-d array", allowed=(None, 2))
            if shape[:-1] == (1,):          # Pm of a (1, D) array: one parameter, not a batch of one
                x, shape = self._reshape(x, shape[-1:]), shape[-1:]
            self.batchdims, cat = shape[:-1], P
        else:
            raise ArgumentError(f"LazyTensor: a 2-d array of shape {shape} needs axis=0 (i) or axis=1 (j)")
        shape = tuple(x.shape)
        if cat == I:
            self.ni = shape[-2]
        elif cat == J:
            self.nj = shape[-2]
        self._set_leaf(Variable(x, cat, shape[-1]))

    def _set_leaf(self, variable: Variable):
        self.leaves = (variable,)
        self.node = make("Var", (), (0, variable.dim, variable.cat))

    def _derived(self, node: Node, variables, batchdims, ni, nj, ranges, backend, dtype,
                 cls=None) -> "LazyTensorBase":
        out = (cls or type(self))()
        out.node, out.leaves, out.batchdims = node, tuple(variables), batchdims
        out.ni, out.nj, out.ranges, out.backend, out._dtype = ni, nj, ranges, backend, dtype
        return out

    def _lift(self, other) -> "LazyTensorBase":
        if isinstance(other, LazyTensorBase):
            if not isinstance(other, type(self)) and not isinstance(self, type(other)):
                raise TypeError(f"cannot combine a {type(self).__module__} LazyTensor with a "
                                f"{type(other).__module__} one")
            return other
        return type(self)(other)

    # ---- building formulas ------------------------------------------------------------------------------------
    def _op(self, op: str, *others, params: tuple = (), cls=None) -> "LazyTensorBase":
        """`op` applied to self and `others` (LazyTensors, arrays or numbers), as one new LazyTensor (of class
        `cls`, by default self's: a complex op may give a real result and the other way round)."""
        operands = (self,) + tuple(self._lift(o) for o in others)
        joined, nodes = _join(operands)
        return joined(make(op, tuple(nodes), params), cls)

    @property
    def _shape(self) -> tuple[int, ...]:
        return self.batchdims + (self.ni or 1, self.nj or 1, self.ndim)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self._shape
        return shape[:-1] if shape[-1] == 1 else shape

    @property
    def ndim(self) -> int:
        """The vector dimension D of the formula (pykeops' name for it)."""
        return self.node.dim

    def dim(self) -> int:
        """The number of axes of the symbolic array, batch axes included (as torch's `Tensor.dim`)."""
        return len(self._shape)

    @property
    def nbatchdims(self) -> int:
        return len(self.batchdims)

    # pykeops's attributes of a LazyTensor that is not (yet) reduced
    axis = None             # the reduction axis: set on a reduction (a LazyReduction), None here
    formula2 = None         # the second formula of a reduction (a weight), None here

    @property
    def variables(self) -> tuple:
        """The arrays (and lists of numbers) the formula reads, in the order of `formula`'s Var indices after
        the symbolic ones (as pykeops's `variables`)."""
        return tuple(v.value for v in self.leaves if v.symbol is None)

    @property
    def symbolic_variables(self) -> tuple:
        """The symbolic variables `Vi(index, dim)`... as (index, dim, category) triples, sorted by index."""
        return tuple(sorted({(v.symbol, v.dim, v.cat) for v in self.leaves if v.symbol is not None}))

    @property
    def formula(self) -> str:
        """The formula text, with variables numbered as a reduction would number them."""
        node, _, _ = _numbered(self.node, None, self.leaves)
        return to_text(node)

    def __repr__(self):
        return f"{type(self).__module__}.LazyTensor(formula={self.formula}, shape={self.shape})"

    # Arithmetic (with a complex operand, on self + 0i, as pykeops promotes)
    def _is_complex_value(self, other) -> bool:
        if isinstance(other, LazyTensorBase):
            return other.is_complex
        if isinstance(other, numbers.Complex) and not isinstance(other, (numbers.Real, np.ndarray)):
            return True
        return self._is_array(other) and self._is_complex_array(other)

    def __add__(self, other):
        if self._is_complex_value(other):
            return self.real2complex() + other
        return self._op("Add", other)

    def __radd__(self, other):
        if self._is_complex_value(other):
            return self.real2complex().__radd__(other)
        return self._lift(other)._op("Add", self)

    def __sub__(self, other):
        if self._is_complex_value(other):
            return self.real2complex() - other
        return self._op("Subtract", other)

    def __rsub__(self, other):
        if self._is_complex_value(other):
            return self.real2complex().__rsub__(other)
        return self._lift(other)._op("Subtract", self)

    def __mul__(self, other):
        if self._is_complex_value(other):
            return self.real2complex() * other
        return self._op("Mult", other)

    def __rmul__(self, other):
        if self._is_complex_value(other):
            return self.real2complex().__rmul__(other)
        return self._lift(other)._op("Mult", self)

    def __truediv__(self, other):
        if self._is_complex_value(other):
            return self.real2complex() / other
        return self._op("Divide", other)

    def __rtruediv__(self, other):
        if self._is_complex_value(other):
            return self.real2complex().__rtruediv__(other)
        if _is_number(other) and other == 1:
            return self._op("Inv")
        return self._lift(other)._op("Divide", self)

    # pykeops's named forms of the operators (its keyword arguments are formula options it ignores too)
    def addop(self, other, **kwargs):
        return self + other

    def subop(self, other, **kwargs):
        return self - other

    def mulop(self, other, **kwargs):
        return self * other

    def divop(self, other, **kwargs):
        return self / other

    def __neg__(self):
        return self._op("Minus")

    def __abs__(self):
        return self._op("Abs")

    def __or__(self, other):
        """`(x | y)`: the scalar product of two vectors of one dimension."""
        return self._op("Scalprod", other)

    def __ror__(self, other):
        return self._lift(other)._op("Scalprod", self)

    def __pow__(self, other):
        if isinstance(other, numbers.Integral) and not isinstance(other, bool):
            return self._op("Pow", params=(int(other),))
        if _is_number(other):
            if other == 0.5:
                return self._op("Sqrt")
            if other == -0.5:
                return self._op("Rsqrt")
            if float(other).is_integer() and abs(other) <= MAX_INT_PARAM:
                return self._op("Pow", params=(int(other),))
        other = self._lift(other)
        if other.ndim not in (1, self.ndim):
            raise DimensionError(f"LazyTensor: exponent of dimension {other.ndim} for a base of dimension {self.ndim}")
        return self._op("Powf", other)

    def power(self, other):
        return self ** other

    # Comparisons give 0 / 1, built from Step(x) = (x >= 0) so they need no ops of their own.
    def __ge__(self, other):
        return self._op("Subtract", other).step()

    def __le__(self, other):
        return self._lift(other)._op("Subtract", self).step()

    def __gt__(self, other):
        return 1 - (self <= other)

    def __lt__(self, other):
        return 1 - (self >= other)

    def __eq__(self, other):
        return (self >= other) * (self <= other)

    def __ne__(self, other):
        return 1 - (self == other)

    # Elementwise functions
    def sinc(self):
        return (math.pi * self).sinxdivx()

    def round(self, decimals: int = 0):
        return self._op("Round", params=(_integer(decimals, "round: decimals"),))

    def clamp(self, low, high):
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (low, high)):
            return self._op("ClampInt", params=(int(low), int(high)))
        return self._op("Clamp", low, high)

    def mod(self, modulus, offset=0):
        return self._op("Mod", modulus, offset)

    # Vector operations
    def norm(self, dim=-1):
        if dim not in (-1, self.dim() - 1):
            raise ArgumentError("LazyTensor.norm: only the norm over the last (vector) axis is supported")
        return self.norm2()

    def weightedsqnorm(self, weights):
        """The squared norm of self weighted by a scalar, a diagonal (D) or a full D x D matrix (row-major)."""
        return self._lift(weights)._op("WeightedSqNorm", self)

    def weightedsqdist(self, other, weights):
        return (self - other).weightedsqnorm(weights)

    def __getitem__(self, key):
        """`x[k]`, `x[..., k]`, `x[:, :, k]` and slices `x[..., a:b]`: indexing along the vector axis only."""
        if isinstance(key, tuple):
            if not key:
                raise ArgumentError("LazyTensor: empty index")
            front, key = key[:-1], key[-1]
            ellipses = sum(k is Ellipsis for k in front)
            plain = all(k is Ellipsis or k == slice(None) for k in front)
            if not plain or ellipses > 1 or (not ellipses and len(front) not in (0, self.dim() - 1)):
                raise ArgumentError("LazyTensor: only the last (vector) axis can be indexed, as x[..., k]")
        if isinstance(key, slice):
            start, stop, step = key.indices(self.ndim)
            if step != 1 or stop <= start:
                raise ArgumentError(f"LazyTensor: slice {key} must select a non-empty range with step 1")
            return self.extract(start, stop - start)
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            index = int(key) + (self.ndim if key < 0 else 0)
            return self.elem(index)
        raise ArgumentError(f"LazyTensor: cannot index with {key!r}; use an integer or a slice")

    @staticmethod
    def concatenate(lazies, axis=-1):
        if not isinstance(lazies, (tuple, list)) or not lazies:
            raise ArgumentError("LazyTensor.concatenate takes a non-empty tuple of LazyTensors")
        if axis not in (-1, lazies[0].dim() - 1):
            raise ArgumentError("LazyTensor.concatenate: only the last (vector) axis can be concatenated")
        out = lazies[0]
        for other in lazies[1:]:
            out = out.concat(other)
        return out

    @staticmethod
    def cat(lazies, dim=-1):
        return LazyTensorBase.concatenate(lazies, dim)

    def keops_tensordot(self, other, dimfa, dimfb, contfa, contfb, *permute):
        """numpy.tensordot of self and other read as row-major tensors of shapes dimfa and dimfb, contracting
        the axes contfa of self with contfb of other; an optional permutation sends output axis k to permute[k]."""
        lists = [_int_list(v, name) for v, name in ((dimfa, "dimfa"), (dimfb, "dimfb"), (contfa, "contfa"),
                                                    (contfb, "contfb"))]
        if len(permute) > 1:
            raise ArgumentError("keops_tensordot takes at most one permutation after contfb")
        lists.append(_int_list(permute[0], "permute") if permute else ())
        return self._op("TensorDot", other, params=tuple(lists))

    def keops_kron(self, other, dimfself, dimfother):
        """numpy.kron of self and other read as row-major tensors with the same number of axes."""
        return self._op("Kron", other, params=(_int_list(dimfself, "dimfself"), _int_list(dimfother, "dimfother")))

    def bspline(self, x, k=0):
        """The B-spline basis functions of order k on the knots self (sorted), at the scalar x."""
        return self._op("BSpline", x, params=(_integer(k, "bspline: k"),))

    def grad_matrix(self, v):
        """The gradients of self's components with respect to the variable LazyTensor v, row after row."""
        return self._op("GradMatrix", self._variable(v, "grad_matrix"))

    def trace_operator(self, v):
        """The trace of self, a linear function of the variable LazyTensor v (usually a symbolic Vi/Vj/Pm)."""
        return _drop_unused_symbols(self._op("TraceOperator", self._variable(v, "trace_operator")))

    def auto_factorize(self):
        """self: common sub-formulas are shared nodes already."""
        return self

    def __min__(self, **options):
        return self.min(**options)

    def __max__(self, **options):
        return self.max(**options)

    # Complex numbers (a ComplexLazyTensor of dimension d is a formula of dimension 2d, (re, im) interleaved)
    def real2complex(self):
        """self + 0i, as a ComplexLazyTensor."""
        return self._op("Real2Complex", cls=self._complex_class())

    def imag2complex(self):
        """i * self, as a ComplexLazyTensor."""
        return self._op("Imag2Complex", cls=self._complex_class())

    def exp1j(self):
        """exp(i * self), as a ComplexLazyTensor."""
        return self._op("ComplexExp1j", cls=self._complex_class())

    # Symbolic derivatives (engine.formula.autodiff)
    def grad(self, v, e):
        """e^T d(self)/dv: the gradient with respect to the variable LazyTensor `v`, against `e`."""
        return self._derivative("Grad", v, e)

    def diff(self, v, u):
        return self._derivative("Diff", v, u)

    def divergence(self, v):
        return self._derivative("Divergence", v)

    def laplacian(self, v):
        return self._derivative("Laplacian", v)

    def _variable(self, v, name):
        v = self._lift(v)
        if v.node.op != "Var":
            raise ArgumentError(f"LazyTensor.{name}: differentiate with respect to a variable LazyTensor "
                                f"(built from an array or Vi/Vj/Pm), not {v.formula}")
        return v

    def _derivative(self, name, v, *rest):
        v = self._variable(v, name.lower())
        joined, nodes = _join((self, v) + tuple(self._lift(r) for r in rest))
        return joined(derivative_op(name, nodes))

    # ---- reductions -------------------------------------------------------------------------------------------
    def _axis(self, axis, dim, name) -> int:
        if dim is not None:
            if axis is not None and axis != dim:
                raise ArgumentError(f"{name}: axis={axis} and dim={dim} disagree")
            axis = dim
        if axis is None:
            raise ArgumentError(f"{name}: give dim=0 (reduce over i) or dim=1 (reduce over j)"
                                + (f", counted after the {self.nbatchdims} batch dimensions" if self.batchdims else ""))
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise ArgumentError(f"{name}: axis must be an integer, got {axis!r}")
        shift = int(axis) + 3 if axis < 0 else int(axis) - self.nbatchdims
        if shift not in (0, 1):
            raise ArgumentError(f"{name}: axis {axis} is not a reduction axis; use {self.nbatchdims} (over i) or "
                                f"{self.nbatchdims + 1} (over j)")
        return shift

    def _is_vector_axis(self, axis) -> bool:
        """sum / min / max ... over the vector axis are formula ops (Sum, Min, ...), not reductions."""
        return axis in (-1, self.dim() - 1)

    def reduction(self, reduction_op: str, other=None, opt_arg=None, axis=None, dim=None, call=True, **options):
        """Reduce with the engine's reduction `reduction_op` over i (axis 0) or j (axis 1)."""
        axis = self._axis(axis, dim, reduction_op)
        reduction_op = called(reduction_op, other is not None)
        operands = (self,) + ((self._lift(other),) if other is not None else ())
        joined, nodes = _join(operands)
        result = LazyReduction(type(self), joined(nodes[0]), nodes[1] if other is not None else None,
                               reduction_op, axis, opt_arg, options)
        return result() if call and not result.symbolic else result

    # sum, min, argKmin, logsumexp, ... (and each as `<name>_reduction`): made from the reduction table below
    # (_reduction_methods), as the elementwise methods are made from the op table (_op_methods)

    # ---- linear algebra ----------------------------------------------------------------------------------------
    def __matmul__(self, v, **options):
        """`K @ v`: sum_j K_ij v_j for a LazyTensor K of vector dimension 1 and an array v of M (or (..., M, E)).

        `K.__matmul__(v, backend=..., out=..., sum_scheme=...)` takes a reduction's options, as in pykeops."""
        if self.ndim != (2 if self.is_complex else 1):
            raise DimensionError(f"K @ v needs a LazyTensor of vector dimension 1; this one has shape {self.shape}")
        shape = tuple(v.shape)
        column = self._lift(self._reshape(v, (1, shape[0], 1) if len(shape) == 1 else
                                          shape[:-2] + (1,) + shape[-2:]))
        product = self * column
        out = options.get("out")
        if len(shape) == 1 and out is not None:
            options["out"] = self._reshape(out, (-1, 1))        # a view: the reduction writes into `out` itself
        kv = product.sum(dim=product.dim() - 2, **options)
        if out is not None:
            return out
        return self._reshape(kv, (-1,)) if len(shape) == 1 else kv

    def t(self):
        """The transpose: i and j exchanged (shape (..., M, N, D)), ranges swapped to match."""
        return self._derived(swap_ij(self.node), [v.swapped() for v in self.leaves], self.batchdims,
                             self.nj, self.ni, swap_axes(self.ranges), self.backend, self._dtype)

    @property
    def T(self):
        return self.t()

    def matvec(self, v):
        """For scipy.sparse.linalg.aslinearoperator: `K @ v`, also for numpy vectors given to a torch LazyTensor."""
        return self._scipy_product(self, v)

    def rmatvec(self, v):
        return self._scipy_product(self.T, v)

    matmat, rmatmat = matvec, rmatvec

    def _scipy_product(self, operator, v):
        if self._is_array(v) or not isinstance(v, np.ndarray):
            return operator @ v
        # scipy works in numpy: a torch operator gets a tensor of its own dtype and answers in numpy
        like = next((x.value for x in self.leaves if self._is_array(x.value)), None)
        return _numpy(operator @ self._from_list(v, self._dtype or v.dtype.name, like))

    def solve(self, other, var=None, call=True, **options):
        """`a` with sum_j self_ij a_j + alpha a_i = other_i (conjugate gradient; `alpha=`, `eps=` in options).

        `self` must be symmetric positive (semi-)definite, like a kernel matrix K(x_i, x_j); `other` is an array of
        the i points (N, E) or a variable LazyTensor. With `var` (a symbolic variable such as `Vj(0, E)`), `self` is
        read as linear in `var` instead of being multiplied by it.
        """
        if not call:            # pykeops returns the solve to be called later (with no arguments)
            return _DeferredSolve(self, other, var, options)
        solver, args, options = self._solver(other, var, dict(options))
        return solver(*args, **options)

    def _solver(self, other, var, options):
        """The KernelSolve for `self.solve(other, var)`, its arrays in argument order and the options of its call."""
        rhs = other if isinstance(other, LazyTensorBase) else type(self)(other, axis=0)
        if rhs.node.op != "Var" or rhs.leaves[0].symbol is not None or rhs.leaves[0].cat == P:
            raise ArgumentError("solve: the right-hand side must be an array (or a variable LazyTensor) of i or "
                                "j points")
        axis = 1 if rhs.leaves[0].cat == I else 0        # reduce over the other index
        if var is None:
            unknown = type(self)((_next_symbol(self.leaves), rhs.ndim, axis))
            lazy = self * unknown
        else:
            unknown, lazy = self._lift(var), self
            if unknown.node.op != "Var" or unknown.leaves[0].symbol is None:
                raise ArgumentError("solve: var must be a symbolic variable, such as Vj(index, dim)")
        joined, nodes = _join((lazy, unknown))
        formula, (position,), order = _numbered(nodes[0], None, joined.leaves, keep=(nodes[1],))
        if any(v is None or (v.symbol is not None and k != position) for k, v in enumerate(order)):
            raise ArgumentError("solve: symbolic variables other than the unknown are not supported")
        args = _arguments(order, joined.leaves, joined.dtype, type(self))
        args[position] = rhs.leaves[0].value         # pykeops' KernelSolve takes b in the unknown's place
        build = {k: options.pop(k) for k in PLAN_OPTIONS if k in options}
        for key, value in (("ranges", joined.ranges), ("backend", joined.backend)):
            if value is not None:
                options.setdefault(key, value)
        # KernelSolve checks that the formula is linear in the unknown; it reads formula text, which to_text gives
        # exactly (the variables keep their positions through the Var(pos, dim, cat) aliases).
        aliases = [f"v{k} = Var({k},{v.dim},{v.cat})" for k, v in enumerate(order)]
        solver = self._kernel_solve_class()(to_text(formula), aliases, f"v{position}", axis, **build)
        return solver, args, options

    # scipy.sparse.linalg.aslinearoperator reads `shape` (2-d) and `dtype`
    @property
    def dtype(self):
        return None if self._dtype is None else np.dtype(self._dtype)



# ---- methods made from the tables ----------------------------------------------------------------------------------

def _op_method(name: str, op: str, operands: tuple[str, ...]):
    """`x.name(*operands, *params)`: the op `op` of the op table applied to x and the operands (LazyTensors, arrays,
    numbers), with the row's integer params."""
    row = OPS[op]
    if row.arity != 1 + len(operands):
        raise AssertionError(f"LAZY_METHODS: {name} names {len(operands)} operands for {op} of arity {row.arity}")
    signature = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                   for n in ("self",) + operands + row.params])

    def method(self, *args, **kwargs):
        values = list(signature.bind(self, *args, **kwargs).arguments.values())[1:]
        params = tuple(_integer(v, f"{name}: {p}") for v, p in zip(values[len(operands):], row.params))
        return self._op(op, *values[:len(operands)], params=params)

    method.__name__ = method.__qualname__ = name
    method.__signature__ = signature
    method.__doc__ = f"{op}({', '.join(('self',) + operands + row.params)})" + \
        (f": {row.doc}" if row.doc else "") + " (a row of the op table)."
    return method


def _reduction_method(op: str, over_vector: bool):
    """The reduction `op` of the reduction table as a method: over i (dim=0) or j (dim=1), counted after the batch
    dimensions; with `over_vector` (sum, min, max, argmin, argmax, as in pykeops) over the vector axis, the default,
    it is the op of the same name instead. Its arguments follow the reduction's facts: K first for the K-best family,
    the weight first for a weighted reduction, weight= (or other=) for one with a weighted form (logsumexp)."""
    reduction = REDUCTIONS[op]
    if reduction.needs_k:
        def method(self, K, axis=None, dim=None, **options):
            return self.reduction(op, opt_arg=K, axis=axis, dim=dim, **options)
    elif reduction.weighted:
        def method(self, weight, axis=None, dim=None, **options):
            return self.reduction(op, other=weight, axis=axis, dim=dim, **options)
    elif reduction.weighted_form:
        def method(self, axis=None, dim=None, weight=None, other=None, **options):
            # `other` is pykeops's `reduction` keyword for the weight, which its logsumexp passes on
            if weight is not None and other is not None:
                raise ArgumentError(f"{reduction.lazy_method}: give the weight once, as weight= (or other=)")
            return self.reduction(op, other=other if weight is None else weight, axis=axis, dim=dim, **options)
    elif over_vector:
        def method(self, axis=-1, dim=None, **options):
            axis = axis if dim is None else dim
            if self._is_vector_axis(axis):
                return self._op(op)
            return self.reduction(op, axis=axis, **options)
    else:
        def method(self, axis=None, dim=None, **options):
            return self.reduction(op, axis=axis, dim=dim, **options)
    method.__doc__ = f"The {op} reduction (engine.reductions) over dim=0 (i) or dim=1 (j)" + \
        (", or the op over the vector axis (dim=-1, the default)" if over_vector else "") + "."
    return method


def _install_methods(cls) -> None:
    for name, (op, operands) in LAZY_METHODS.items():
        setattr(cls, name, _op_method(name, op, operands))
    for op, reduction in REDUCTIONS.items():
        name = reduction.lazy_method
        if name is None:
            continue
        over_vector = op in OPS and not (reduction.needs_k or reduction.weighted or reduction.weighted_form)
        for spelling, vector in ((name, over_vector), (f"{name}_reduction", False)):
            method = _reduction_method(op, vector)
            method.__name__ = method.__qualname__ = spelling
            setattr(cls, spelling, method)


_install_methods(LazyTensorBase)


class _DeferredSolve:
    """`K.solve(b, call=False)`: the solve, run when called (options given then add to those given before). Its
    KernelSolve is built once, on the first call, unless a call gives options that shape the plan (PLAN_OPTIONS)."""

    def __init__(self, lazy, other, var, options):
        self.lazy, self.other, self.var, self.options = lazy, other, var, options

    def __call__(self, *args, **options):
        if args:
            raise ArgumentError("a solve built with call=False takes no arrays: its right-hand side is already set")
        if any(key in PLAN_OPTIONS for key in options):
            return self.lazy.solve(self.other, self.var, call=True, **{**self.options, **options})
        solver, arrays, given = self._parts
        return solver(*arrays, **{**given, **options})

    @functools.cached_property
    def _parts(self):
        return self.lazy._solver(self.other, self.var, dict(self.options))

    @property
    def callfun(self):
        """pykeops's `callfun`: the KernelSolve itself, called as `callfun(*variables, alpha=...)`."""
        return self._parts[0]

    @property
    def variables(self):
        """The arrays of the solve, in the KernelSolve's argument order (the right-hand side in the unknown's place)."""
        return tuple(self._parts[1])


class _Joined:
    """The facts shared by the operands of one operation: their merged variables, shapes and options."""

    def __init__(self, first: LazyTensorBase):
        self.first = first
        self.leaves: list[Variable] = []
        self.batchdims: tuple[int, ...] = ()
        self.ni = self.nj = None
        self.ranges = self.backend = self.dtype = None

    def add(self, lazy: LazyTensorBase) -> Node:
        """Merge `lazy`'s facts; returns its formula renumbered into the merged variable list."""
        mapping = {}
        for pos, v in enumerate(lazy.leaves):
            for k, known in enumerate(self.leaves):
                if known.same_as(v):
                    mapping[pos] = k
                    break
            else:
                mapping[pos] = len(self.leaves)
                self.leaves.append(v)
        self.ni = _agree(self.ni, lazy.ni, "numbers of i points")
        self.nj = _agree(self.nj, lazy.nj, "numbers of j points")
        self.dtype = _agree(self.dtype, lazy._dtype, "dtypes (cast the arrays to one dtype)")
        self.backend = _agree(self.backend, lazy.backend, "backends")
        self.ranges = _agree_ranges(self.ranges, lazy.ranges)
        try:
            self.batchdims = tuple(np.broadcast_shapes(self.batchdims, lazy.batchdims))
        except ValueError:
            raise ArgumentError(f"LazyTensor: batch dimensions {self.batchdims} and {lazy.batchdims} do not "
                                "broadcast") from None
        return _renumber(lazy.node, mapping)

    def __call__(self, node: Node, cls=None) -> LazyTensorBase:
        return self.first._derived(node, self.leaves, self.batchdims, self.ni, self.nj, self.ranges,
                                   self.backend, self.dtype, cls)


def _join(operands) -> tuple:
    """(a function node -> LazyTensor carrying the operands' merged facts, the operands' renumbered nodes)."""
    joined = _Joined(operands[0])
    nodes = [joined.add(lazy) for lazy in operands]
    return joined, nodes


def _agree(a, b, what):
    if a is None or b is None or a == b:
        return b if a is None else a
    raise ArgumentError(f"LazyTensor: incompatible {what}: {a} and {b}")


def _agree_ranges(a, b):
    if a is None or b is None or a is b:
        return b if a is None else a
    same = len(a) == len(b) and all(np.array_equal(_numpy(x), _numpy(y)) for x, y in zip(a, b))
    if not same:
        raise ArgumentError("LazyTensor: the operands carry different ranges")
    return a


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _renumber(node: Node, mapping: dict[int, int]) -> Node:
    """`node` with each Var(pos, ...) moved to Var(mapping[pos], ...)."""
    if all(k == v for k, v in mapping.items()):
        return node
    done: dict[int, Node] = {}
    for n in node.postorder():
        if n.op == "Var":
            pos, dim, cat = n.params
            done[id(n)] = Node("Var", (), (mapping[pos], dim, cat), dim)
        else:
            done[id(n)] = Node(n.op, tuple(done[id(c)] for c in n.children), n.params, n.dim)
    return done[id(node)]


def _numbered(node: Node, node2: Node | None, variables, keep=()):
    """Number the variables of a reduction: symbolic ones at their own index, arrays after them.

    Returns (node, node2 or the positions of the `keep` nodes, the Variable at each final position). Variables
    that simplification removed from the formula stay arguments: they still set the numbers of i and j points.
    """
    symbols = [v.symbol for v in variables if v.symbol is not None]
    first = max(symbols) + 1 if symbols else 0
    order: list[Variable | None] = [None] * first
    mapping = {}
    for pos, v in enumerate(variables):
        if v.symbol is not None:
            mapping[pos] = v.symbol
            order[v.symbol] = v
        else:
            mapping[pos] = len(order)
            order.append(v)
    if keep:
        return _renumber(node, mapping), [mapping[k.params[0]] for k in keep], order
    return _renumber(node, mapping), (None if node2 is None else _renumber(node2, mapping)), order


def _arguments(order, variables, dtype, binding) -> list:
    """The argument list of a reduction: arrays as given, lists of numbers as arrays of the common dtype."""
    like = next((v.value for v in variables if v.symbol is None and binding._is_array(v.value)), None)
    args = []
    for v in order:
        if v is None or v.symbol is not None:
            args.append(None)          # filled by the caller's symbolic arguments
        elif isinstance(v.value, list):
            args.append(binding._from_list(v.value, dtype or "float32", like))
        else:
            args.append(v.value)
    return args


def _is_symbolic(v) -> bool:
    return v is None or v.symbol is not None


def _next_symbol(*variable_lists) -> int:
    symbols = [v.symbol for vs in variable_lists for v in vs if v.symbol is not None]
    return max(symbols) + 1 if symbols else 0


class LazyReduction:
    """A reduction of a LazyTensor, ready to run: called at once unless it waits for symbolic arguments.

    `reduction(..., call=False)` returns one; calling it with the symbolic variables' arrays (in index order) runs
    it, like a pykeops Genred.
    """

    def __init__(self, binding, lazy: LazyTensorBase, formula2: Node | None, reduction_op: str, axis: int, opt_arg,
                 options: dict):
        self.binding, self.reduction_op, self.axis, self.opt_arg = binding, reduction_op, axis, as_k(opt_arg)
        self.complex = lazy.is_complex and getattr(REDUCTIONS.get(reduction_op), "linear", False)
        self.formula, self.formula2, self.order = _numbered(lazy.node, formula2, lazy.leaves)
        self.symbolic = sum(1 for v in self.order if v is None or v.symbol is not None)
        self.batchdims = lazy.batchdims
        self.rows = lazy.ni if axis == 1 else lazy.nj
        self.dtype = lazy._dtype
        self.plan_options, self.call_options = _split_options(options)
        if lazy.ranges is not None:
            self.call_options.setdefault("ranges", lazy.ranges)
        if lazy.backend is not None:
            self.call_options.setdefault("backend", lazy.backend)
        self.arguments = _arguments(self.order, lazy.leaves, lazy._dtype, binding)
        self._plans: dict[str, Plan] = {}

    def __call__(self, *symbolic_args, **options):
        return self._run(symbolic_args, None, options)

    @property
    def variables(self) -> tuple:
        """The fixed (not symbolic) arrays, in argument order: what pykeops passes after the symbolic ones."""
        return tuple(a for a, v in zip(self.arguments, self.order) if not _is_symbolic(v))

    def callfun(self, *arrays, **options):
        """pykeops's `callfun`: the reduction as a Genred over every argument, the symbolic arrays first, then the
        fixed ones (`r.callfun(*args, *r.variables)`), which may be given anew."""
        fixed = len(self.variables)
        if len(arrays) != self.symbolic + fixed:
            raise ArgumentError(f"{self.reduction_op}.callfun: expected {self.symbolic} symbolic and {fixed} fixed "
                                f"array(s), got {len(arrays)}")
        return self._run(arrays[:self.symbolic], arrays[self.symbolic:], options)

    def _run(self, symbolic_args, fixed_args, options):
        plan_options, call_options = _split_options(options)
        plan_options = {"dtype_acc": "auto", "fast_math": True, **self.plan_options, **plan_options}
        call_options = {**self.call_options, **call_options}
        if len(symbolic_args) != self.symbolic:
            raise ArgumentError(f"{self.reduction_op}: expected {self.symbolic} array(s) for the symbolic "
                                f"variables, got {len(symbolic_args)}")
        args = list(self.arguments)
        given, fixed = iter(symbolic_args), iter(fixed_args) if fixed_args is not None else None
        for k, v in enumerate(self.order):
            if _is_symbolic(v):
                args[k] = next(given)
            elif fixed is not None:
                args[k] = next(fixed)
        if self.dtype is None and symbolic_args and any(isinstance(v.value, list) for v in self.order if v):
            dtype = self.binding._dtype_name(symbolic_args[0])
            args = [self.binding._from_list(v.value, dtype, symbolic_args[0])
                    if v is not None and isinstance(v.value, list) else a for v, a in zip(self.order, args)]
        plan = self._plan(plan_options["dtype_acc"], plan_options["fast_math"])
        out = self._shaped(self.binding._reduce(plan, args, call_options))
        return self.binding._complex_values(out) if self.complex else out

    def _plan(self, dtype_acc: str, fast_math: bool) -> Plan:
        if (dtype_acc, fast_math) not in self._plans:
            names = {f"v{k}": var(k, v.dim, v.cat) for k, v in enumerate(self.order) if v is not None}
            self._plans[dtype_acc, fast_math] = plan_from_nodes(self.formula, self.formula2, self.reduction_op,
                                                                self.axis, self.opt_arg, dtype_acc, names,
                                                                len(self.order), fast_math)
        return self._plans[dtype_acc, fast_math]

    def _shaped(self, out):
        if isinstance(out, tuple):
            return tuple(self._shaped(o) for o in out)
        shape = tuple(out.shape)
        if self.batchdims and shape[:-2] != self.batchdims:
            shape = self.batchdims + shape[-2:]
        if REDUCTIONS[self.reduction_op].needs_k:          # (..., K * dim) -> (..., K, dim)
            shape = shape[:-1] + (self.opt_arg, shape[-1] // self.opt_arg)
            if shape[-1] == 1:
                shape = shape[:-1]
        return out if shape == tuple(out.shape) else self.binding._reshape(out, shape)


def _split_options(options: dict) -> tuple[dict, dict]:
    plan, call = {}, {}
    for key, value in options.items():
        if key == "dtype_acc":
            plan["dtype_acc"] = value
        elif key == "use_fast_math":
            plan["fast_math"] = bool(value)
        elif key == "use_double_acc":
            if value:
                plan["dtype_acc"] = "float64"
        elif key in CALL_OPTIONS:
            call[key] = value
        elif key == "sum_scheme":
            check_sum_scheme(value)
        elif key not in IGNORED_OPTIONS:
            raise TypeError(f"unexpected keyword argument {key!r} for a LazyTensor reduction "
                            f"(known: {', '.join(PLAN_OPTIONS + CALL_OPTIONS)})")
    return plan, call


def _drop_unused_symbols(lazy: LazyTensorBase) -> LazyTensorBase:
    """`lazy` without the symbolic variables its formula no longer reads (a trace's variable), so that calling
    its reduction does not ask for their arrays."""
    used = {n.params[0] for n in lazy.node.variables()}
    keep = [k for k, v in enumerate(lazy.leaves) if v.symbol is None or k in used]
    if len(keep) == len(lazy.leaves):
        return lazy
    node = _renumber(lazy.node, {old: new for new, old in enumerate(keep)})
    return lazy._derived(node, [lazy.leaves[k] for k in keep], lazy.batchdims, lazy.ni, lazy.nj, lazy.ranges,
                         lazy.backend, lazy._dtype)


def _int_list(value, what: str) -> tuple:
    values = (value,) if isinstance(value, numbers.Integral) else tuple(value)
    return tuple(_integer(v, f"{what} entries") for v in values)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.ndarray))


def _integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"LazyTensor.{what} must be an integer, got {value!r}")
    return int(value)


def _no_axis(axis, what: str, allowed=(None,)):
    if axis not in allowed:
        raise ArgumentError(f"LazyTensor: axis={axis!r} cannot be given with {what}")


def variable_helpers(cls):
    """`Vi`, `Vj`, `Pm` for a binding: `Vi(x)` is `cls(x, axis=0)`, `Vi(index, dim)` a symbolic i variable."""

    def helper(axis, name):
        def make_variable(x_or_index, dim=None):
            if dim is None:
                return cls(x_or_index, axis=axis)
            return cls((_integer(x_or_index, f"{name}: index"), _integer(dim, f"{name}: dim"), axis))
        make_variable.__name__ = make_variable.__qualname__ = name
        make_variable.__doc__ = (f"{name}(x): x as a LazyTensor {('indexed by i', 'indexed by j', 'parameter')[axis]}; "
                                 f"{name}(index, dim): a symbolic one, given when the reduction is called.")
        return make_variable

    return helper(0, "Vi"), helper(1, "Vj"), helper(2, "Pm")
