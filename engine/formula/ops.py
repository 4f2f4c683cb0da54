"""The op table: one row per operation of the formula language.

Every reader of the language works from these rows: the parser (keyword, arity, parameters), dimension checking
(`dim`), the reference evaluator (`numpy`), the C emitter (`c`), autodiff (`grad`) and composite expansion
(`expand`). Adding an op is adding a row; `parse.validate_table()` runs when the package loads and checks every row.
This module is a data leaf: it imports no other module of the language (see EXPANSIONS).

Conventions
- Operands are formulas; `params` are integer literals written after them (`Pow(x, 3)`, `Elem(x, 2)`), or integer
  lists written `Ind(2, 3)` for the params a row names in `lists` (TensorDot's shapes and axes).
- numpy implementations receive arrays of shape (..., dim) and return (..., out_dim); dim-1 operands broadcast.
- `c` is a C expression for one output component of an elementwise op, with `{0}`, `{1}`, `{2}` standing for the
  operands' matching components (the emitter handles broadcasting), or None for structural ops that the emitter
  lays out itself (sums over entries, slices, products). Helpers named `kred_*` live in the C prelude.
- `grad` holds, per operand, its cotangent as a formula over `x`, `y`, `z` (the operands, in order), `out` (this
  node's value) and `g` (the cotangent of this node, of dimension `out_dim`). `{d0}`, `{d1}` are operand dims, `{p0}`,
  `{p1}` the params, `{dout}` the output dim. A cotangent of dimension `out_dim` for a dim-1 operand is summed back by
  autodiff. None means "not differentiable / zero". A callable gets the params and returns the texts.
- Singular points follow pykeops's conventions, so a gradient is finite wherever pykeops's is (a Sinkhorn p=1 or an
  energy distance between coinciding points must not be NaN): `Rsqrt(0) = 0`, so `Sqrt`'s rule is `g/2 * Rsqrt(x)`
  (0 at 0, the subgradient torch.cdist takes; Norm2, SqDist's square root, Exp(-Norm2) inherit it), `Rsqrt`'s
  `-g/2 * out^3` is 0 at 0, `Normalize(0)` has gradient 0, `Asin`/`Acos` have 0 at +-1; `Abs` takes the subgradient
  `Sign(0) = 0`, `Sign`, `Step`, `Floor`, `Round` have 0; `ReLU` has 1 at 0 (`Step(0) = 1`, as KeOps); `Atan2` has 0
  at the origin (`1/(x^2+y^2)` written `Rsqrt(...)^2`); `SinXDivX` has 0 at 0; `Powf(x, y)` has torch's
  `y x^(y-1)` in x (0, 1 or +inf at x = 0 by y) and 0 in y at x = 0 (torch's mask); `Log`, `Inv` and negative
  integer `Pow` are +-inf at 0, as in torch and pykeops (a true pole, not a kink).
- `expand` rewrites a composite into primitives: a formula text over `x`, `y`, `z` and `{p0}`..., or a callable
  `(children, params) -> Node` when the expansion depends on dimensions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from ..errors import DimensionError

MAX_DIM = 1 << 16          # any node's dimension (refuses Zero(10**9) or a runaway TensorProd)
MAX_INT_PARAM = 1 << 20    # integer parameters (exponents, indices, IntCst values)
MAX_LIST_PARAM = 16        # entries of an integer-list parameter `Ind(...)` (tensor shapes and axes)
MAX_TERMS = 1 << 14        # scalar terms (or nodes) a composite may expand into: TensorDot, BSpline, complex ops...


# What needs a reader of this table is registered by the module that owns the reader when the formula package loads
# (so this table imports none of them): the parser registers every text template (`expand` given as a str),
# autodiff the derivative ops: the expansions of rows whose `expand` is `Registered(name)`, and the parser's
# derivative keywords (`Grad(f, v, e)`, `Diff`, `Divergence`, `Laplacian`: name -> function of the operand list).
EXPANSIONS: dict[str, Callable] = {}
DERIVATIVES: dict[str, Callable] = {}


@dataclass(frozen=True)
class Registered:
    """A row's `expand` that another module registers in EXPANSIONS under `name`."""
    name: str

    def __call__(self, children, params, make):
        return EXPANSIONS[self.name](children, params, make)


@dataclass(frozen=True)
class Op:
    name: str
    arity: int                                  # operands that are formulas
    params: tuple[str, ...] = ()                # integer parameters written after the operands
    dim: Callable | None = None                 # (operand dims, params) -> out dim; raises DimensionError
    numpy: Callable | None = None               # (*operand arrays, params=..., out_dim=...) -> array
    c: str | None = None                        # per-component C expression for elementwise ops
    grad: tuple | Callable | None = None        # cotangent formulas, one per operand
    expand: str | Callable | None = None        # composite expansion into primitives
    broadcast: bool = False                     # elementwise with dim-1 broadcasting of operands
    leaf: bool = False
    doc: str = ""
    differentiable: tuple[bool, ...] = field(default=())
    lists: tuple[str, ...] = ()                 # the params that are integer lists, written Ind(2, 3)
    defaults: tuple = ()                        # values of trailing params that may be left out


# Dimension rules -------------------------------------------------------------------------------------

def _same(dims, params, op):
    return dims[0]


def _broadcast(dims, params, op):
    out = max(dims)
    if any(d not in (1, out) for d in dims):
        raise DimensionError(f"{op}: dimensions {' and '.join(map(str, dims))} differ")
    return out


def _scalar(dims, params, op):
    return 1


def _equal_to_scalar(dims, params, op):
    if dims[0] != dims[1]:
        raise DimensionError(f"{op}: dimensions {dims[0]} and {dims[1]} differ")
    return 1


def _needs_scalar(dims, op, which=0):
    if dims[which] != 1:
        raise DimensionError(f"{op}: operand {which + 1} must have dimension 1, not {dims[which]}")


def _dim_sumt(dims, params, op):
    _needs_scalar(dims, op)
    return params[0]


def _dim_elem(dims, params, op):
    if not 0 <= params[0] < dims[0]:
        raise DimensionError(f"{op}: index {params[0]} out of range for dimension {dims[0]}")
    return 1


def _dim_elemt(dims, params, op):
    _needs_scalar(dims, op)
    n, m = params
    if not 0 <= m < n:
        raise DimensionError(f"{op}: index {m} out of range for dimension {n}")
    return n


def _dim_extract(dims, params, op):
    start, length = params
    if start < 0 or length < 1 or start + length > dims[0]:
        raise DimensionError(f"{op}: slice [{start}, {start + length}) out of range for dimension {dims[0]}")
    return length


def _dim_extractt(dims, params, op):
    start, n = params
    if start < 0 or start + dims[0] > n:
        raise DimensionError(f"{op}: dimension {dims[0]} at {start} does not fit in dimension {n}")
    return n


def _dim_onehot(dims, params, op):
    _needs_scalar(dims, op)
    if params[0] < 1:
        raise DimensionError(f"{op}: dimension must be positive, not {params[0]}")
    return params[0]


def _dim_matvec(dims, params, op):
    a, v = dims
    if a % v:
        raise DimensionError(f"{op}: matrix dimension {a} is not a multiple of vector dimension {v}")
    return a // v


def _dim_vecmat(dims, params, op):
    v, a = dims
    if a % v:
        raise DimensionError(f"{op}: matrix dimension {a} is not a multiple of vector dimension {v}")
    return a // v


def _dim_clampint(dims, params, op):
    if params[0] > params[1]:
        raise DimensionError(f"{op}: lower bound {params[0]} exceeds upper bound {params[1]}")
    return dims[0]


def _dim_leaf_param(dims, params, op):
    if params[0] < 1:
        raise DimensionError(f"{op}: dimension must be positive, not {params[0]}")
    return params[0]


def _dim_weighted(dims, params, op):
    s, x = dims[0], dims[1]
    if len(dims) == 3 and dims[1] != dims[2]:
        raise DimensionError(f"{op}: dimensions {dims[1]} and {dims[2]} differ")
    if s not in (1, x, x * x):
        raise DimensionError(f"{op}: weight dimension {s} must be 1, {x} or {x * x}")
    return 1


# numpy implementations -------------------------------------------------------------------------------

def _np_xlogx(x, **_):
    return np.where(x == 0, 0.0, x * np.log(np.where(x == 0, 1.0, x))).astype(x.dtype, copy=False)


def _np_sinxdivx(x, **_):
    safe = np.where(x == 0, 1.0, x)
    return np.where(x == 0, 1.0, np.sin(safe) / safe).astype(x.dtype, copy=False)


def _np_rsqrt(x, **_):
    with np.errstate(divide="ignore"):
        return np.where(x == 0, 0.0, 1 / np.sqrt(x)).astype(x.dtype, copy=False)


def _np_pow(x, params, **_):
    return x ** params[0] if params[0] >= 0 else 1 / x ** (-params[0])


def _np_round(x, params, **_):
    scale = 10.0 ** params[0]
    return (np.round(x * scale) / scale).astype(x.dtype, copy=False)


def _np_mod(x, n, d, **_):
    return x - n * np.floor((x - d) / n)


def _np_elemt(x, params, **_):
    n, m = params
    out = np.zeros(x.shape[:-1] + (n,), x.dtype)
    out[..., m] = x[..., 0]
    return out


def _np_extractt(x, params, **_):
    start, n = params
    out = np.zeros(x.shape[:-1] + (n,), x.dtype)
    out[..., start:start + x.shape[-1]] = x
    return out


def _np_concat(x, y, **_):
    shape = np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    return np.concatenate([np.broadcast_to(x, shape + x.shape[-1:]), np.broadcast_to(y, shape + y.shape[-1:])], -1)


def _np_onehot(x, params, **_):
    n = params[0]
    k = np.round(x[..., 0]).astype(np.int64)
    return (np.arange(n) == k[..., None]).astype(x.dtype)


def _np_matvec(a, v, out_dim, **_):
    m = v.shape[-1]
    return np.einsum("...nm,...m->...n", a.reshape(a.shape[:-1] + (out_dim, m)), v)


def _np_vecmat(v, a, out_dim, **_):
    n = v.shape[-1]
    return np.einsum("...n,...nm->...m", v, a.reshape(a.shape[:-1] + (n, out_dim)))


def _np_tensorprod(a, b, **_):
    return (a[..., :, None] * b[..., None, :]).reshape(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]) + (-1,))


def _np_argext(fn):
    def impl(x, **_):
        return fn(x, axis=-1)[..., None].astype(x.dtype)
    return impl


def _unary(fn):
    return lambda x, **_: fn(x)


# Composite expansions that depend on dimensions --------------------------------------------------------

def _expand_weighted_sqnorm(children, params, make):
    s, x = children
    if s.dim == 1:
        return make("Mult", (s, make("SqNorm2", (x,))))
    if s.dim == x.dim:
        return make("Sum", (make("Mult", (s, make("Square", (x,)))),))
    return make("Sum", (make("Mult", (x, make("MatVecMult", (s, x)))),))


def _expand_weighted_sqdist(children, params, make):
    s, x, y = children
    return make("WeightedSqNorm", (s, make("Subtract", (x, y))))


def _vector(parts, make):
    """The scalar nodes `parts` as one vector (a balanced tree of Concat, so no chain is deep)."""
    while len(parts) > 1:
        parts = [make("Concat", (parts[k], parts[k + 1])) if k + 1 < len(parts) else parts[k]
                 for k in range(0, len(parts), 2)]
    return parts[0]


def _total(terms, make):
    """The sum of `terms` (a balanced tree of Add)."""
    while len(terms) > 1:
        terms = [make("Add", (terms[k], terms[k + 1])) if k + 1 < len(terms) else terms[k]
                 for k in range(0, len(terms), 2)]
    return terms[0]


def _elem(x, k, make):
    return make("Elem", (x,), (k,))


MAX_CONTRACTION = 1 << 20   # multiply-adds per pair a TensorDot (a loop in the kernels) may take


class TensorAxes(NamedTuple):
    """TensorDot(a, b, shape_a, shape_b, axes_a, axes_b, permute), read once: numpy.tensordot's output axes are the
    free axes of a then those of b (`free_a`, `free_b`, in order), axis k of which lands at `permute[k]`."""
    shape_a: tuple
    shape_b: tuple
    axes_a: tuple
    axes_b: tuple
    permute: tuple          # always written out (identity when the formula leaves it out)
    free_a: tuple
    free_b: tuple
    out_shape: tuple        # the output's shape, after the permutation


def tensor_axes(dims, params, op) -> TensorAxes:
    """Check TensorDot's params against its operands' dimensions (DimensionError if inconsistent) and read them."""
    shape_a, shape_b, axes_a, axes_b, permute = params
    if math.prod(shape_a) != dims[0] or math.prod(shape_b) != dims[1]:
        raise DimensionError(f"{op}: shapes {list(shape_a)} and {list(shape_b)} do not hold dimensions "
                             f"{dims[0]} and {dims[1]}")
    if any(d < 1 for d in shape_a + shape_b):
        raise DimensionError(f"{op}: shape entries must be positive")
    if len(axes_a) != len(axes_b) or len(set(axes_a)) != len(axes_a) or len(set(axes_b)) != len(axes_b):
        raise DimensionError(f"{op}: contracted axes {list(axes_a)} and {list(axes_b)} must pair up, each once")
    if not all(0 <= k < len(shape_a) for k in axes_a) or not all(0 <= k < len(shape_b) for k in axes_b):
        raise DimensionError(f"{op}: a contracted axis is out of range")
    if any(shape_a[k] != shape_b[l] for k, l in zip(axes_a, axes_b)):
        raise DimensionError(f"{op}: contracted axes {list(axes_a)} and {list(axes_b)} differ in size")
    free_a = tuple(k for k in range(len(shape_a)) if k not in axes_a)
    free_b = tuple(k for k in range(len(shape_b)) if k not in axes_b)
    shape = [shape_a[k] for k in free_a] + [shape_b[k] for k in free_b]
    if permute and sorted(permute) != list(range(len(shape))):
        raise DimensionError(f"{op}: permute {list(permute)} is not a permutation of the {len(shape)} output axes")
    permute = tuple(permute) or tuple(range(len(shape)))
    products = math.prod(shape) * math.prod(shape_a[k] for k in axes_a)
    if products > MAX_CONTRACTION:
        raise DimensionError(f"{op}: {products} products per pair exceed the limit of {MAX_CONTRACTION}")
    out_shape = [0] * len(shape)
    for k, size in enumerate(shape):
        out_shape[permute[k]] = size
    return TensorAxes(tuple(shape_a), tuple(shape_b), tuple(axes_a), tuple(axes_b), permute, free_a, free_b,
                      tuple(out_shape))


def _dim_tensordot(dims, params, op):
    return max(1, math.prod(tensor_axes(dims, params, op).out_shape))


def _np_tensordot(a, b, params, out_dim, **_):
    """numpy.tensordot over the last axis of `a` and `b` (leading axes broadcast), as einsum subscripts."""
    t = tensor_axes((a.shape[-1], b.shape[-1]), params, "TensorDot")
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    sub_a = [next(letters) for _ in t.shape_a]
    sub_b = [next(letters) for _ in t.shape_b]
    for k, l in zip(t.axes_a, t.axes_b):
        sub_b[l] = sub_a[k]
    order = [sub_a[k] for k in t.free_a] + [sub_b[k] for k in t.free_b]
    out = [""] * len(order)
    for k, letter in enumerate(order):
        out[t.permute[k]] = letter
    lead = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    result = np.einsum(f"...{''.join(sub_a)},...{''.join(sub_b)}->...{''.join(out)}",
                       a.reshape(a.shape[:-1] + t.shape_a), b.reshape(b.shape[:-1] + t.shape_b))
    return result.reshape(lead + (out_dim,))


def _ind(values) -> str:
    return f"Ind({','.join(map(str, values))})"


def _grad_tensordot(params):
    """TensorDot is linear in each operand: its cotangents are TensorDots of g (the output's shape) with the other
    operand, contracting the other operand's free axes, permuted back into the operand's axis order."""
    shape_a, shape_b, axes_a, axes_b, permute = params
    free_a = tuple(k for k in range(len(shape_a)) if k not in axes_a)
    free_b = tuple(k for k in range(len(shape_b)) if k not in axes_b)
    permute = tuple(permute) or tuple(range(len(free_a) + len(free_b)))
    shape = [shape_a[k] for k in free_a] + [shape_b[k] for k in free_b]
    g_shape = [0] * len(shape)
    for k, size in enumerate(shape):
        g_shape[permute[k]] = size

    def cotangent(other, shape_other, free_mine, free_other, axes_mine, axes_other, offset_mine, offset_other):
        # contract g's axes holding the other operand's free axes with those axes of the other operand
        axes_g = [permute[offset_other + j] for j in range(len(free_other))]
        # the result: g's remaining axes (by position in g), then the other operand's contracted axes (in order)
        kept = sorted(range(len(free_mine)), key=lambda k: permute[offset_mine + k])
        lands = [free_mine[k] for k in kept] + [axes_mine[axes_other.index(l)] for l in sorted(axes_other)]
        return (f"TensorDot(g, {other}, {_ind(g_shape)}, {_ind(shape_other)}, {_ind(axes_g)}, "
                f"{_ind(free_other)}, {_ind(lands)})")

    return (cotangent("y", shape_b, free_a, free_b, axes_a, axes_b, 0, len(free_a)),
            cotangent("x", shape_a, free_b, free_a, axes_b, axes_a, len(free_a), 0))


def _kron_params(params, op):
    shape_a, shape_b = params
    if len(shape_a) != len(shape_b):
        raise DimensionError(f"{op}: shapes {list(shape_a)} and {list(shape_b)} have different numbers of axes")
    n = len(shape_a)
    return shape_a, shape_b, (), (), tuple(range(0, 2 * n, 2)) + tuple(range(1, 2 * n, 2))


def _dim_kron(dims, params, op):
    return _dim_tensordot(dims, _kron_params(params, op), op)


def _expand_kron(children, params, make):
    return make("TensorDot", children, _kron_params(params, "Kron"))


def _dim_weight(kind):
    def rule(dims, params, op):
        s, x = dims
        want = {"iso": 1, "diag": x, "sym": x * x}[kind]
        if s != want:
            raise DimensionError(f"{op}: the weight has dimension {s}; it must be {want} for a vector of dimension {x}")
        return 1
    return rule


def _dim_ratio(dims, params, op):
    if params[-1] == 0:
        raise DimensionError(f"{op}: division by zero")
    return 1


def _expand_ratio(children, params, make):
    numerator, denominator = (1, params[0]) if len(params) == 1 else params
    return make("Const", (), (numerator / denominator,))


def _dim_bspline(dims, params, op):
    knots, x = dims
    order = params[0]
    _needs_scalar(dims, op, 1)
    if order < 0 or knots < order + 2:
        raise DimensionError(f"{op}: order {order} needs order >= 0 and at least {order + 2} knots, not {knots}")
    return knots - order - 1


def _expand_bspline(children, params, make):
    """Cox-de Boor: B_j^0 = [t_j <= x < t_j+1]; B_j^k = w_j^k B_j^k-1 + (1 - w_j+1^k) B_j+1^k-1 with
    w_j^k = (x - t_j) / (t_j+k - t_j), taken as 0 where the knots coincide (as KeOps does)."""
    knots, x = children
    order = params[0]
    if knots.dim * (order + 1) > MAX_TERMS:
        raise DimensionError(f"BSpline: {knots.dim} knots of order {order} exceed the limit of {MAX_TERMS} terms")
    one, zero = make("IntCst", (), (1,)), make("Zero", (), (1,))
    t = [_elem(knots, k, make) for k in range(knots.dim)]

    def step(v):
        return make("Step", (v,))

    def ratio(j, k):            # IfElse(c, a, b) is a where c >= 0: knots t_j >= t_j+k give 0
        gap = make("Subtract", (t[j + k], t[j]))
        return make("IfElse", (make("Minus", (gap,)), zero, make("Divide", (make("Subtract", (x, t[j])), gap))))

    def inside(j):              # t_j <= x < t_j+1
        below_next = make("Subtract", (one, step(make("Subtract", (x, t[j + 1])))))
        return make("Mult", (step(make("Subtract", (x, t[j]))), below_next))

    basis = [inside(j) for j in range(knots.dim - 1)]
    for k in range(1, order + 1):
        basis = [make("Add", (make("Mult", (ratio(j, k), basis[j])),
                              make("Mult", (make("Subtract", (one, ratio(j + 1, k))), basis[j + 1]))))
                 for j in range(len(basis) - 1)]
    return _vector(basis, make)


def _dim_softdtw(dims, params, op):
    _needs_scalar(dims, op, 2)
    if dims[0] * dims[1] > MAX_TERMS:
        raise DimensionError(f"{op}: series of lengths {dims[0]} and {dims[1]} exceed the limit of {MAX_TERMS} cells")
    return 1


def _expand_softdtw(children, params, make):
    """Soft-DTW with squared differences: R_ij = (x_i - y_j)^2 + softmin_gamma(R_i-1,j-1, R_i-1,j, R_i,j-1), the
    first row and column summing along their edge (as KeOps does); softmin_g(r) = m - g log sum exp((m - r) / g)
    with m = min(r), so that no exponential overflows."""
    x, y, gamma = children
    xs = [_elem(x, i, make) for i in range(x.dim)]
    ys = [_elem(y, j, make) for j in range(y.dim)]
    R = {}
    for j in range(y.dim):
        for i in range(x.dim):
            cost = make("Square", (make("Subtract", (xs[i], ys[j])),))
            if i == 0 and j == 0:
                R[i, j] = cost
            elif i == 0 or j == 0:
                R[i, j] = make("Add", (cost, R[(i - 1, j) if j == 0 else (i, j - 1)]))
            else:
                previous = [R[i - 1, j - 1], R[i, j - 1], R[i - 1, j]]
                low = make("Min", (_vector(previous, make),))
                spread = _total([make("Exp", (make("Divide", (make("Subtract", (low, r)), gamma)),))
                                 for r in previous], make)
                softmin = make("Subtract", (low, make("Mult", (gamma, make("Log", (spread,))))))
                R[i, j] = make("Add", (cost, softmin))
    return R[x.dim - 1, y.dim - 1]


def _dim_difference_matrix(dims, params, op):
    return dims[0] * dims[1]


def _expand_difference_matrix(children, params, make):
    """(x_k - y_l) for k, l, row-major: x ⊗ 1 - 1 ⊗ y."""
    x, y = children
    one = make("IntCst", (), (1,))
    ones = [make("SumT", (one,), (d,)) for d in (x.dim, y.dim)]
    return make("Subtract", (make("TensorProd", (x, ones[1])), make("TensorProd", (ones[0], y))))


def _dim_derivative_matrix(dims, params, op):
    return dims[0] * dims[1]


def _dim_trace(dims, params, op):
    if dims[0] not in (1, dims[1]):
        raise DimensionError(f"{op}: a linear map of a vector of dimension {dims[1]} must have dimension "
                             f"{dims[1]} or 1, not {dims[0]}")
    return 1



# Complex numbers: a complex vector of dimension d is a real vector of dimension 2d, (re, im) interleaved (as in
# KeOps). Every complex op is a composite of real ones, so gradients and C code come from the real rows.

def _even(dims, op):
    for d in dims:
        if d % 2:
            raise DimensionError(f"{op}: a complex operand has an even dimension (re, im interleaved), not {d}")
        if d > MAX_TERMS:           # complex ops expand entry by entry
            raise DimensionError(f"{op}: dimension {d} exceeds the limit of {MAX_TERMS} for complex operands")


def _dim_complex(out):
    """Dimension rule of a complex op: `out` maps the operand dims to the output dim after the checks."""
    def rule(dims, params, op):
        _even(dims, op)
        if len(dims) == 2 and dims[0] != dims[1] and 2 not in dims:
            raise DimensionError(f"{op}: complex dimensions {dims[0] // 2} and {dims[1] // 2} differ")
        return out(dims, params)
    return rule


def _dim_from_real(dims, params, op):
    _even((2 * dims[0],), op)
    return 2 * dims[0]


def _dim_real_scal(dims, params, op):
    _needs_scalar(dims, op)
    _even(dims[1:], op)
    return dims[1]


def _dim_complex_sumt(dims, params, op):
    if dims[0] != 2 or params[0] < 1:
        raise DimensionError(f"{op}: repeats one complex number (dimension 2) a positive number of times")
    _even((2 * params[0],), op)
    return 2 * params[0]


def _part(z, offset, make):
    """The real (offset 0) or imaginary (offset 1) parts of the interleaved z, as a vector."""
    return _vector([_elem(z, k, make) for k in range(offset, z.dim, 2)], make)


def _interleave(re, im, make):
    n = max(re.dim, im.dim)
    pick = (lambda v, k: v if v.dim == 1 else _elem(v, k, make))
    return _vector([part for k in range(n) for part in (pick(re, k), pick(im, k))], make)


def _complex(build):
    """An expansion from (re, im) parts: `build(parts of each operand, make) -> (re, im)` or a real node."""
    def expand(children, params, make):
        out = build([(_part(z, 0, make), _part(z, 1, make)) for z in children], make)
        return _interleave(*out, make) if isinstance(out, tuple) else out
    return expand


def _cmul(z, w, make):
    (a, b), (c, d) = z, w
    return (make("Subtract", (make("Mult", (a, c)), make("Mult", (b, d)))),
            make("Add", (make("Mult", (a, d)), make("Mult", (b, c)))))


def _cdiv(z, w, make):
    (a, b), (c, d) = z, w
    norm = make("Add", (make("Square", (c,)), make("Square", (d,))))
    re = make("Add", (make("Mult", (a, c)), make("Mult", (b, d))))
    im = make("Subtract", (make("Mult", (b, c)), make("Mult", (a, d))))
    return make("Divide", (re, norm)), make("Divide", (im, norm))


def _cexp(z, make):
    (a, b), = z
    scale = make("Exp", (a,))
    return make("Mult", (scale, make("Cos", (b,)))), make("Mult", (scale, make("Sin", (b,))))


def _square_abs(z, make):
    (a, b), = z
    return make("Add", (make("Square", (a,)), make("Square", (b,))))


def _expand_from_real(kind):
    def expand(children, params, make):
        x, = children
        zero = make("Zero", (), (x.dim,))
        if kind == "real":
            return _interleave(x, zero, make)
        if kind == "imag":
            return _interleave(zero, x, make)
        return _interleave(make("Cos", (x,)), make("Sin", (x,)), make)
    return expand


def _expand_complex_sumt(children, params, make):
    z, = children
    return _vector([_elem(z, k % 2, make) for k in range(2 * params[0])], make)


def _grad_pow(params):
    p = params[0]
    if p == 0:
        return (None,)
    if p == 1:
        return ("g",)
    if p == 2:
        return ("IntCst(2)*x*g",)
    return (f"IntCst({p})*Pow(x,{p - 1})*g",)


# The table -------------------------------------------------------------------------------------------

def _elementwise(name, arity, numpy, c, grad, **kw):
    rule = _same if arity == 1 else _broadcast
    return Op(name, arity, dim=rule, numpy=numpy, c=c, grad=grad, broadcast=arity > 1, **kw)


ROWS: list[Op] = [
    # Leaves
    Op("Var", 0, ("pos", "dim", "cat"), leaf=True, doc="a variable: position, dimension, category (0=i, 1=j, 2=param)"),
    Op("IntCst", 0, ("value",), dim=lambda d, p, op: 1, c="{p0}", leaf=True, doc="an integer constant"),
    Op("Const", 0, ("value",), dim=lambda d, p, op: 1, leaf=True, doc="a real constant (float literal)"),
    Op("Zero", 0, ("dim",), dim=_dim_leaf_param, leaf=True, doc="the zero vector"),
    # Arithmetic, elementwise with dim-1 broadcasting
    _elementwise("Add", 2, lambda x, y, **_: x + y, "{0} + {1}", ("g", "g")),
    _elementwise("Subtract", 2, lambda x, y, **_: x - y, "{0} - {1}", ("g", "-g")),
    _elementwise("Mult", 2, lambda x, y, **_: x * y, "{0} * {1}", ("g*y", "g*x")),
    _elementwise("Divide", 2, lambda x, y, **_: x / y, "{0} / {1}", ("g/y", "-g*out/y")),
    _elementwise("Minus", 1, _unary(np.negative), "-{0}", ("-g",)),
    _elementwise("Inv", 1, lambda x, **_: 1 / x, "1 / {0}", ("-g*Square(out)",)),
    _elementwise("Square", 1, _unary(np.square), "{0} * {0}", ("IntCst(2)*x*g",)),
    _elementwise("Sqrt", 1, _unary(np.sqrt), "kred_sqrt({0})", ("Const(0.5)*g*Rsqrt(x)",)),
    _elementwise("Rsqrt", 1, _np_rsqrt, "kred_rsqrt({0})", ("Const(-0.5)*g*Pow(out,3)",)),
    Op("Pow", 1, ("exponent",), dim=_same, numpy=_np_pow, c="kred_powi({0}, {p0})", grad=_grad_pow),
    _elementwise("Powf", 2, lambda x, y, **_: x ** y, "kred_pow({0}, {1})",
                 ("g*y*Powf(x,y-IntCst(1))", "IfElse(-Abs(x),Zero({dout}),g*out*Log(x))")),
    _elementwise("Exp", 1, _unary(np.exp), "kred_exp({0})", ("g*out",)),
    _elementwise("Log", 1, _unary(np.log), "kred_log({0})", ("g/x",)),
    _elementwise("XLogX", 1, _np_xlogx, "kred_xlogx({0})", ("g*(Log(x)+IntCst(1))",)),
    _elementwise("Sin", 1, _unary(np.sin), "kred_sin({0})", ("g*Cos(x)",)),
    _elementwise("Cos", 1, _unary(np.cos), "kred_cos({0})", ("-g*Sin(x)",)),
    _elementwise("Asin", 1, _unary(np.arcsin), "kred_asin({0})", ("g*Rsqrt(IntCst(1)-Square(x))",)),
    _elementwise("Acos", 1, _unary(np.arccos), "kred_acos({0})", ("-g*Rsqrt(IntCst(1)-Square(x))",)),
    _elementwise("Atan", 1, _unary(np.arctan), "kred_atan({0})", ("g/(IntCst(1)+Square(x))",)),
    _elementwise("Atan2", 2, lambda y, x, **_: np.arctan2(y, x), "kred_atan2({0}, {1})",
                 ("g*y*Square(Rsqrt(Square(x)+Square(y)))", "-g*x*Square(Rsqrt(Square(x)+Square(y)))")),
    _elementwise("SinXDivX", 1, _np_sinxdivx, "kred_sinxdivx({0})",
                 ("g*IfElse(Square(x)-Const(1e-30),(Cos(x)-out)/x,Zero(1))",)),
    _elementwise("Abs", 1, _unary(np.abs), "kred_abs({0})", ("g*Sign(x)",)),
    _elementwise("Sign", 1, _unary(np.sign), "kred_sign({0})", (None,)),
    _elementwise("Step", 1, lambda x, **_: (x >= 0).astype(x.dtype), "kred_step({0})", (None,)),
    _elementwise("ReLU", 1, lambda x, **_: np.maximum(x, 0), "kred_relu({0})", ("g*Step(x)",)),
    _elementwise("Clamp", 3, lambda x, a, b, **_: np.minimum(np.maximum(x, a), b), "kred_clamp({0}, {1}, {2})",
                 ("g*Step(x-y)*Step(z-x)", "g*Step(y-x)", "g*Step(x-z)")),
    Op("ClampInt", 1, ("low", "high"), dim=_dim_clampint,
       numpy=lambda x, params, **_: np.clip(x, params[0], params[1]), c="kred_clamp({0}, {p0}, {p1})",
       grad=("g*Step(x-IntCst({p0}))*Step(IntCst({p1})-x)",)),
    _elementwise("IfElse", 3, lambda c, a, b, **_: np.where(c >= 0, a, b), "({0} >= 0 ? {1} : {2})",
                 (None, "IfElse(x,g,Zero({dout}))", "IfElse(x,Zero({dout}),g)")),
    _elementwise("Floor", 1, _unary(np.floor), "kred_floor({0})", (None,)),
    Op("Round", 1, ("decimals",), dim=_same, numpy=_np_round, c="kred_round({0}, {p0})", grad=(None,)),
    _elementwise("Mod", 3, _np_mod, "kred_mod({0}, {1}, {2})", ("g", "-g*Floor((x-z)/y)", None)),
    # Reductions over a vector's entries
    Op("Sum", 1, dim=_scalar, numpy=lambda x, **_: x.sum(-1, keepdims=True), grad=("SumT(g,{d0})",)),
    Op("Max", 1, dim=_scalar, numpy=lambda x, **_: x.max(-1, keepdims=True), grad=("g*OneHot(ArgMax(x),{d0})",)),
    Op("Min", 1, dim=_scalar, numpy=lambda x, **_: x.min(-1, keepdims=True), grad=("g*OneHot(ArgMin(x),{d0})",)),
    Op("ArgMax", 1, dim=_scalar, numpy=_np_argext(np.argmax), grad=(None,)),
    Op("ArgMin", 1, dim=_scalar, numpy=_np_argext(np.argmin), grad=(None,)),
    # Shape ops
    Op("SumT", 1, ("dim",), dim=_dim_sumt, numpy=lambda x, params, **_: np.repeat(x, params[0], -1),
       grad=("Sum(g)",)),
    Op("Elem", 1, ("index",), dim=_dim_elem, numpy=lambda x, params, **_: x[..., params[0]:params[0] + 1],
       grad=("ElemT(g,{d0},{p0})",)),
    Op("ElemT", 1, ("dim", "index"), dim=_dim_elemt, numpy=_np_elemt, grad=("Elem(g,{p1})",)),
    Op("Extract", 1, ("start", "length"), dim=_dim_extract,
       numpy=lambda x, params, **_: x[..., params[0]:params[0] + params[1]], grad=("ExtractT(g,{p0},{d0})",)),
    Op("ExtractT", 1, ("start", "dim"), dim=_dim_extractt, numpy=_np_extractt, grad=("Extract(g,{p0},{d0})",)),
    Op("Concat", 2, dim=lambda d, p, op: d[0] + d[1], numpy=_np_concat,
       grad=("Extract(g,0,{d0})", "Extract(g,{d0},{d1})")),
    Op("OneHot", 1, ("dim",), dim=_dim_onehot, numpy=_np_onehot, grad=(None,)),
    # Linear algebra on vectors (matrices are stored row-major)
    Op("MatVecMult", 2, dim=_dim_matvec, numpy=_np_matvec, grad=("TensorProd(g,y)", "VecMatMult(g,x)")),
    Op("VecMatMult", 2, dim=_dim_vecmat, numpy=_np_vecmat, grad=("MatVecMult(y,g)", "TensorProd(x,g)")),
    Op("TensorProd", 2, dim=lambda d, p, op: d[0] * d[1], numpy=_np_tensorprod,
       grad=("MatVecMult(g,y)", "VecMatMult(x,g)")),
    # Composites: rewritten into the primitives above when built
    Op("Scalprod", 2, dim=_equal_to_scalar, expand="Sum(x*y)"),
    Op("SqNorm2", 1, dim=_scalar, expand="Sum(Square(x))"),
    Op("Norm2", 1, dim=_scalar, expand="Sqrt(Sum(Square(x)))"),
    Op("Normalize", 1, dim=_same, expand="x*Rsqrt(Sum(Square(x)))"),
    Op("SqDist", 2, dim=_equal_to_scalar, expand="Sum(Square(x-y))"),
    Op("WeightedSqNorm", 2, dim=_dim_weighted, expand=_expand_weighted_sqnorm),
    Op("WeightedSqDist", 3, dim=_dim_weighted, expand=_expand_weighted_sqdist),
    Op("SqNormIso", 2, dim=_dim_weight("iso"), expand="x*Sum(Square(y))", doc="s |x|^2, s scalar"),
    Op("SqNormDiag", 2, dim=_dim_weight("diag"), expand="Sum(x*Square(y))", doc="sum_k s_k x_k^2"),
    Op("SymSqNorm", 2, dim=_dim_weight("sym"), expand="Sum(x*TensorProd(y,y))", doc="x^T A x, A row-major"),
    Op("IntInv", 0, ("value",), dim=_dim_ratio, expand=_expand_ratio, doc="1/n"),
    Op("RatCst", 0, ("numerator", "denominator"), dim=_dim_ratio, expand=_expand_ratio, doc="p/q"),
    # Comparisons: 1 where true, else 0 (not differentiable), with dim-1 broadcasting
    Op("LessThan", 2, dim=_broadcast, expand="IntCst(1)-Step(x-y)"),
    Op("LessOrEqual", 2, dim=_broadcast, expand="Step(y-x)"),
    Op("Equal", 2, dim=_broadcast, expand="Step(x-y)*Step(y-x)"),
    Op("NotEqual", 2, dim=_broadcast, expand="IntCst(1)-Step(x-y)*Step(y-x)"),
    # Tensors stored row-major in vectors
    Op("TensorDot", 2, ("shape_a", "shape_b", "axes_a", "axes_b", "permute"), dim=_dim_tensordot,
       numpy=_np_tensordot, grad=_grad_tensordot, lists=("shape_a", "shape_b", "axes_a", "axes_b", "permute"), defaults=((),),
       doc="numpy.tensordot(a, b, (axes_a, axes_b)), output axes optionally permuted"),
    Op("Kron", 2, ("shape_a", "shape_b"), dim=_dim_kron, expand=_expand_kron, lists=("shape_a", "shape_b"),
       doc="numpy.kron of tensors with the same number of axes"),
    Op("DifferenceMatrix", 2, dim=_dim_difference_matrix, expand=_expand_difference_matrix, doc="x_k - y_l"),
    # Sequences and splines
    Op("BSpline", 2, ("order",), dim=_dim_bspline, expand=_expand_bspline,
       doc="the B-spline basis of an order on the knots (operand 1), at the scalar operand 2"),
    Op("SoftDTW_SqDist", 3, dim=_dim_softdtw, expand=_expand_softdtw,
       doc="soft dynamic time warping of two series with squared differences, smoothed by the scalar gamma"),
    # Derivatives as matrices, and no-op factorisation (hash-consing already shares common sub-expressions)
    Op("GradMatrix", 2, dim=_dim_derivative_matrix, expand=Registered("GradMatrix"), doc="the transposed Jacobian"),
    Op("TraceOperator", 2, dim=_dim_trace, expand=Registered("TraceOperator"), doc="the trace of f, linear in v"),
    Op("Factorize", 2, dim=_same, expand="x", doc="f with g shared: kred shares every common sub-expression"),
    # Complex numbers, (re, im) interleaved
    Op("ComplexReal", 1, dim=_dim_complex(lambda d, p: d[0] // 2), expand=_complex(lambda z, make: z[0][0])),
    Op("ComplexImag", 1, dim=_dim_complex(lambda d, p: d[0] // 2), expand=_complex(lambda z, make: z[0][1])),
    Op("ComplexAngle", 1, dim=_dim_complex(lambda d, p: d[0] // 2),
       expand=_complex(lambda z, make: make("Atan2", (z[0][1], z[0][0])))),
    Op("ComplexSquareAbs", 1, dim=_dim_complex(lambda d, p: d[0] // 2), expand=_complex(_square_abs)),
    Op("ComplexAbs", 1, dim=_dim_complex(lambda d, p: d[0] // 2),
       expand=_complex(lambda z, make: make("Sqrt", (_square_abs(z, make),)))),
    Op("Conj", 1, dim=_dim_complex(lambda d, p: d[0]),
       expand=_complex(lambda z, make: (z[0][0], make("Minus", (z[0][1],))))),
    Op("ComplexExp", 1, dim=_dim_complex(lambda d, p: d[0]), expand=_complex(_cexp)),
    Op("ComplexSum", 1, dim=_dim_complex(lambda d, p: 2),
       expand=_complex(lambda z, make: (make("Sum", (z[0][0],)), make("Sum", (z[0][1],))))),
    Op("ComplexSumT", 1, ("dim",), dim=_dim_complex_sumt, expand=_expand_complex_sumt),
    Op("Real2Complex", 1, dim=_dim_from_real, expand=_expand_from_real("real")),
    Op("Imag2Complex", 1, dim=_dim_from_real, expand=_expand_from_real("imag")),
    Op("ComplexExp1j", 1, dim=_dim_from_real, expand=_expand_from_real("exp1j"), doc="exp(i x) of a real x"),
    Op("ComplexAdd", 2, dim=_dim_complex(lambda d, p: max(d)),
       expand=_complex(lambda zs, make: tuple(make("Add", (a, b)) for a, b in zip(*zs)))),
    Op("ComplexSubtract", 2, dim=_dim_complex(lambda d, p: max(d)),
       expand=_complex(lambda zs, make: tuple(make("Subtract", (a, b)) for a, b in zip(*zs)))),
    Op("ComplexMult", 2, dim=_dim_complex(lambda d, p: max(d)), expand=_complex(lambda zs, make: _cmul(*zs, make))),
    Op("ComplexDivide", 2, dim=_dim_complex(lambda d, p: max(d)), expand=_complex(lambda zs, make: _cdiv(*zs, make))),
    Op("ComplexRealScal", 2, dim=_dim_real_scal, expand="x*y", doc="a real scalar times a complex vector"),
]

OPS: dict[str, Op] = {row.name: row for row in ROWS}


# pykeops's LazyTensor spelling of the ops that are plain methods, `x.exp()`, `x.atan2(y)`, `x.elem(2)`: method ->
# (op, names of its other operands, in order); the row's integer `params` follow them, under their own names. The
# LazyTensor front end makes one method per entry (engine.lazytensor); the operand count is checked against the
# row's arity when it does.
LAZY_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{op.lower(): (op, ()) for op in ("Exp", "Log", "XLogX", "Sqrt", "Rsqrt", "Sin", "Cos", "Asin", "Acos", "Atan",
                                       "SinXDivX", "Abs", "Sign", "Step", "ReLU", "Square", "Floor", "SqNorm2",
                                       "Norm2", "Normalize")},
    "matvecmult": ("MatVecMult", ("other",)), "vecmatmult": ("VecMatMult", ("other",)),
    "tensorprod": ("TensorProd", ("other",)), "concat": ("Concat", ("other",)), "sqdist": ("SqDist", ("other",)),
    "atan2": ("Atan2", ("other",)), "factorize": ("Factorize", ("other",)),
    "difference_matrix": ("DifferenceMatrix", ("other",)),
    "softdtw_sqdist": ("SoftDTW_SqDist", ("other", "gamma")),
    "ifelse": ("IfElse", ("if_true", "if_false")),
    "elem": ("Elem", ()), "extract": ("Extract", ()), "one_hot": ("OneHot", ()),
}
