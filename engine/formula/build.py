"""`make`: the one way to build a node from an op name, operands and params.

It checks arity, params and dimensions against the op table, expands composites into primitives and applies the
simplification rules, so every node in the system is well-formed and in normal form.
"""
from __future__ import annotations

import math

from ..errors import DimensionError, FormulaError
from .nodes import Node
from .ops import EXPANSIONS, MAX_DIM, MAX_INT_PARAM, MAX_LIST_PARAM, OPS
from .simplify import apply_rules


def make(op: str, children: tuple = (), params: tuple = ()) -> Node:
    row = OPS.get(op)
    if row is None:
        raise FormulaError(f"unknown op {op!r}")
    if len(children) != row.arity:
        raise FormulaError(f"{op}: expects {row.arity} operand(s), got {len(children)}")
    if len(params) != len(row.params):
        names = ", ".join(row.params) or "none"
        raise FormulaError(f"{op}: expects {len(row.params)} integer parameter(s) ({names}), got {len(params)}")
    params = tuple(_check_param(op, p) for p in params)
    for name, p in zip(row.params, params):
        if isinstance(p, tuple) != (name in row.lists):
            raise FormulaError(f"{op}: parameter {name} must be "
                               + ("an integer list such as Ind(2, 3)" if name in row.lists else "an integer"))
    if op == "Var":
        return _make_var(*params)
    dim = row.dim(tuple(c.dim for c in children), params, op)
    if not 1 <= dim <= MAX_DIM:
        raise DimensionError(f"{op}: dimension {dim} is outside 1..{MAX_DIM}")
    if row.expand is not None:
        return _expand(row, children, params)
    return apply_rules(op, children, params, dim, make) or Node(op, children, params, dim)


def _check_param(op: str, p):
    if op == "Const":
        p = float(p)
        if not math.isfinite(p):
            raise FormulaError(f"Const: value {p} is not finite")
        return p
    if isinstance(p, tuple):        # an integer list, written Ind(2, 3) (TensorDot's shapes and axes)
        if len(p) > MAX_LIST_PARAM:
            raise FormulaError(f"{op}: an integer list has {len(p)} entries; the limit is {MAX_LIST_PARAM}")
        if any(isinstance(q, tuple) for q in p):
            raise FormulaError(f"{op}: integer lists cannot be nested")
        return tuple(_check_param(op, q) for q in p)
    if isinstance(p, bool) or not isinstance(p, int):
        raise FormulaError(f"{op}: parameters must be integers, got {p!r}")
    if abs(p) > MAX_INT_PARAM:
        raise FormulaError(f"{op}: parameter {p} is outside ±{MAX_INT_PARAM}")
    return p


def _make_var(pos: int, dim: int, cat: int) -> Node:
    if pos < 0:
        raise FormulaError(f"Var: position {pos} is negative")
    if not 1 <= dim <= MAX_DIM:
        raise DimensionError(f"Var: dimension {dim} is outside 1..{MAX_DIM}")
    if cat not in (0, 1, 2):
        raise FormulaError(f"Var: category {cat} must be 0 (i), 1 (j) or 2 (parameter)")
    return Node("Var", (), (pos, dim, cat), dim)


def _expand(row, children, params) -> Node:
    # text templates are the parser's to read: it registers them in EXPANSIONS (see ops.py)
    expand = row.expand if callable(row.expand) else EXPANSIONS[row.name]
    return expand(children, params, make)
