"""The op table: one row per operation of the formula language.

Every reader of the language works from these rows: the parser (keyword, arity, parameters), dimension checking
(`dim`), the reference evaluator (`numpy`), the C emitter (`c`), autodiff (`grad`) and composite expansion
(`expand`). Adding an op is adding a row; `validate_table()` runs at import and checks every row.

Conventions
- Operands are formulas; `params` are integer literals written after them (`Pow(x, 3)`, `Elem(x, 2)`).
- numpy implementations receive arrays of shape (..., dim) and return (..., out_dim); dim-1 operands broadcast.
- `c` is a C expression for one output component of an elementwise op, with `{0}`, `{1}`, `{2}` standing for the
  operands' matching components (the emitter handles broadcasting), or None for structural ops that the emitter
  lays out itself (sums over entries, slices, products). Helpers named `kred_*` live in the C prelude.
- `grad` holds, per operand, its cotangent as a formula over `x`, `y`, `z` (the operands, in order), `out` (this
  node's value) and `g` (the cotangent of this node, of dimension `out_dim`). `{d0}`, `{d1}` are operand dims, `{p0}`,
  `{p1}` the params, `{dout}` the output dim. A cotangent of dimension `out_dim` for a dim-1 operand is summed back by
  autodiff. None means "not differentiable / zero". A callable gets the params and returns the texts.
- `expand` rewrites a composite into primitives: a formula text over `x`, `y`, `z` and `{p0}`..., or a callable
  `(children, params) -> Node` when the expansion depends on dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import DimensionError

MAX_DIM = 1 << 16          # any node's dimension (refuses Zero(10**9) or a runaway TensorProd)
MAX_INT_PARAM = 1 << 20    # integer parameters (exponents, indices, IntCst values)


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
    _elementwise("Sqrt", 1, _unary(np.sqrt), "kred_sqrt({0})", ("g/(IntCst(2)*out)",)),
    _elementwise("Rsqrt", 1, _np_rsqrt, "kred_rsqrt({0})", ("Const(-0.5)*g*Pow(out,3)",)),
    Op("Pow", 1, ("exponent",), dim=_same, numpy=_np_pow, c="kred_powi({0}, {p0})", grad=_grad_pow),
    _elementwise("Powf", 2, lambda x, y, **_: x ** y, "kred_pow({0}, {1})", ("g*y*Powf(x,y-IntCst(1))", "g*out*Log(x)")),
    _elementwise("Exp", 1, _unary(np.exp), "kred_exp({0})", ("g*out",)),
    _elementwise("Log", 1, _unary(np.log), "kred_log({0})", ("g/x",)),
    _elementwise("XLogX", 1, _np_xlogx, "kred_xlogx({0})", ("g*(Log(x)+IntCst(1))",)),
    _elementwise("Sin", 1, _unary(np.sin), "kred_sin({0})", ("g*Cos(x)",)),
    _elementwise("Cos", 1, _unary(np.cos), "kred_cos({0})", ("-g*Sin(x)",)),
    _elementwise("Asin", 1, _unary(np.arcsin), "kred_asin({0})", ("g*Rsqrt(IntCst(1)-Square(x))",)),
    _elementwise("Acos", 1, _unary(np.arccos), "kred_acos({0})", ("-g*Rsqrt(IntCst(1)-Square(x))",)),
    _elementwise("Atan", 1, _unary(np.arctan), "kred_atan({0})", ("g/(IntCst(1)+Square(x))",)),
    _elementwise("Atan2", 2, lambda y, x, **_: np.arctan2(y, x), "kred_atan2({0}, {1})",
                 ("g*y/(Square(x)+Square(y))", "-g*x/(Square(x)+Square(y))")),
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
]

OPS: dict[str, Op] = {row.name: row for row in ROWS}


def validate_table() -> None:
    """Check every row once at import: names unique, arities consistent, grad/expand formulas parse."""
    from .parse import parse_template  # local: the parser itself reads this table

    if len(OPS) != len(ROWS):
        raise AssertionError("op table: duplicate op names")
    for row in ROWS:
        if row.leaf:
            continue
        if (row.numpy is None) == (row.expand is None):
            raise AssertionError(f"op table: {row.name} needs exactly one of numpy or expand")
        if row.broadcast and row.c is None:
            raise AssertionError(f"op table: elementwise {row.name} has no C template")
        if isinstance(row.expand, str):
            parse_template(row.expand, arity=row.arity, context=f"{row.name}.expand")
        if isinstance(row.grad, tuple):
            if len(row.grad) != row.arity:
                raise AssertionError(f"op table: {row.name} has {len(row.grad)} gradient rules for {row.arity} operands")
            for rule in row.grad:
                if rule is not None:
                    parse_template(rule, arity=row.arity, context=f"{row.name}.grad", with_grad=True)
