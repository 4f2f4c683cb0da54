"""Simplification rules, as data: each row is (op, what it does, rewrite).

A rewrite receives the operands, the params and the node's dimension, and returns a replacement node or None.
`apply_rules` keeps a replacement only when its dimension equals the node's, so no rule can change a formula's
meaning through broadcasting. The rules fold constants, remove zeros, ones and double negations, and put derivatives
in a normal form (signs and constant factors pulled outwards, repeated scalars `SumT` left to broadcasting) so
that hash-consing shares the terms that reverse mode builds: enough to keep the derivatives of Gaussian kernels
small.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .nodes import Node


class Rule(NamedTuple):
    op: str
    description: str
    rewrite: Callable


def is_zero(n: Node) -> bool:
    return n.op == "Zero" or (n.op in ("IntCst", "Const") and n.params[0] == 0)


def is_one(n: Node) -> bool:
    return n.op in ("IntCst", "Const") and n.params[0] == 1


def number(n: Node):
    """The value of a constant scalar node, else None."""
    if n.op in ("IntCst", "Const"):
        return n.params[0]
    if n.op == "Zero" and n.dim == 1:
        return 0
    return None


def constant(value, make) -> Node | None:
    """A node for a folded numeric value, when it stays in range."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**31):
        value = int(value)
        if abs(value) >= 1 << 20:
            return None
        return make("IntCst", (), (value,))
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return make("Const", (), (float(value),))


def _fold(fn):
    def rewrite(children, params, dim, make):
        values = [number(c) for c in children]
        if any(v is None for v in values):
            return None
        try:
            return constant(fn(*values), make)
        except (ZeroDivisionError, OverflowError):
            return None
    return rewrite


def _zero(dim, make):
    return make("Zero", (), (dim,))


def _is_constant(n: Node) -> bool:
    return n.op in ("IntCst", "Const")


def _without_sumt(children, params, dim, make, op):
    """An elementwise op where an operand `SumT(s, d)` can let `s` broadcast instead (apply_rules checks dims)."""
    for k, child in enumerate(children):
        if child.op == "SumT":
            rest = children[:k] + (child.children[0],) + children[k + 1:]
            if max(c.dim for c in rest) == dim:
                return make(op, rest)
    return None


def _constant_outwards(children, params, dim, make):
    """Mult: constants to the front and out of products, so `2*(x*3)` becomes `6*x`."""
    a, b = children
    if _is_constant(b) and not _is_constant(a):
        return make("Mult", (b, a))
    if a.op == "Mult" and _is_constant(a.children[0]):           # (c*x)*y -> c*(x*y)
        return make("Mult", (a.children[0], make("Mult", (a.children[1], b))))
    if b.op == "Mult" and _is_constant(b.children[0]):           # x*(c*y) -> c*(x*y), c*(c2*y) -> (c*c2)*y
        if _is_constant(a):           # only when c*c2 folds (not inf, not a huge integer): else the rule above undoes it
            folded = _fold(lambda u, v: u * v)((a, b.children[0]), (), 1, make)
            return None if folded is None else make("Mult", (folded, b.children[1]))
        return make("Mult", (b.children[0], make("Mult", (a, b.children[1]))))
    return None


def _minus_outwards(children, params, dim, make):
    a, b = children
    if a.op == "Minus" and b.op != "Minus":
        return make("Minus", (make("Mult", (a.children[0], b)),))
    if b.op == "Minus" and a.op != "Minus":
        return make("Minus", (make("Mult", (a, b.children[0])),))
    return None


def _sum_of_scaled(children, params, dim, make):
    """Sum(s * x) = s * Sum(x) for a scalar s; Sum(-x) = -Sum(x)."""
    x = children[0]
    if x.op == "Minus":
        return make("Minus", (make("Sum", (x.children[0],)),))
    if x.op == "Mult":
        s, rest = x.children
        if s.dim == 1 and rest.dim > 1:
            return make("Mult", (s, make("Sum", (rest,))))
        if rest.dim == 1 and s.dim > 1:
            return make("Mult", (rest, make("Sum", (s,))))
    return None


RULES: list[Rule] = [
    Rule("Add", "fold constants", _fold(lambda a, b: a + b)),
    Rule("Add", "0 + x = x", lambda c, p, d, make: c[1] if is_zero(c[0]) else None),
    Rule("Add", "x + 0 = x", lambda c, p, d, make: c[0] if is_zero(c[1]) else None),
    Rule("Subtract", "fold constants", _fold(lambda a, b: a - b)),
    Rule("Subtract", "x - 0 = x", lambda c, p, d, make: c[0] if is_zero(c[1]) else None),
    Rule("Subtract", "0 - x = -x", lambda c, p, d, make: make("Minus", (c[1],)) if is_zero(c[0]) else None),
    Rule("Mult", "fold constants", _fold(lambda a, b: a * b)),
    Rule("Mult", "0 * x = 0", lambda c, p, d, make: _zero(d, make) if is_zero(c[0]) or is_zero(c[1]) else None),
    Rule("Mult", "1 * x = x", lambda c, p, d, make: c[1] if is_one(c[0]) else None),
    Rule("Mult", "x * 1 = x", lambda c, p, d, make: c[0] if is_one(c[1]) else None),
    Rule("Mult", "(-a) * (-b) = a * b",
         lambda c, p, d, make: make("Mult", (c[0].children[0], c[1].children[0]))
         if c[0].op == "Minus" and c[1].op == "Minus" else None),
    Rule("Mult", "(-a) * b = -(a * b)", _minus_outwards),
    Rule("Mult", "constants to the front: x*c = c*x, (c*x)*y = c*(x*y)", _constant_outwards),
    Rule("Mult", "SumT(s)*x = s*x", lambda c, p, d, make: _without_sumt(c, p, d, make, "Mult")),
    Rule("Add", "x + x = 2*x", lambda c, p, d, make: make("Mult", (make("IntCst", (), (2,)), c[0]))
         if c[0] is c[1] else None),
    Rule("Add", "x + (-y) = x - y", lambda c, p, d, make: make("Subtract", (c[0], c[1].children[0]))
         if c[1].op == "Minus" else None),
    Rule("Add", "(-x) + y = y - x", lambda c, p, d, make: make("Subtract", (c[1], c[0].children[0]))
         if c[0].op == "Minus" else None),
    Rule("Add", "SumT(s)+x = s+x", lambda c, p, d, make: _without_sumt(c, p, d, make, "Add")),
    Rule("Subtract", "x - x = 0", lambda c, p, d, make: _zero(d, make) if c[0] is c[1] else None),
    Rule("Subtract", "x - (-y) = x + y", lambda c, p, d, make: make("Add", (c[0], c[1].children[0]))
         if c[1].op == "Minus" else None),
    Rule("Subtract", "SumT(s)-x = s-x", lambda c, p, d, make: _without_sumt(c, p, d, make, "Subtract")),
    Rule("Divide", "SumT(s)/x = s/x", lambda c, p, d, make: _without_sumt(c, p, d, make, "Divide")),
    Rule("Divide", "x / 1 = x", lambda c, p, d, make: c[0] if is_one(c[1]) else None),
    Rule("Divide", "0 / x = 0", lambda c, p, d, make: _zero(d, make) if is_zero(c[0]) else None),
    Rule("Minus", "--x = x", lambda c, p, d, make: c[0].children[0] if c[0].op == "Minus" else None),
    Rule("Minus", "-0 = 0", lambda c, p, d, make: _zero(d, make) if c[0].op == "Zero" else None),
    Rule("Minus", "fold constants", _fold(lambda a: -a)),
    Rule("Minus", "-(c*x) = (-c)*x", lambda c, p, d, make: make("Mult", (make("Minus", (c[0].children[0],)),
                                                                         c[0].children[1]))
         if c[0].op == "Mult" and _is_constant(c[0].children[0]) else None),
    Rule("Square", "fold constants", _fold(lambda a: a * a)),
    Rule("Pow", "x^1 = x", lambda c, p, d, make: c[0] if p[0] == 1 else None),
    Rule("Pow", "x^2 = Square(x)", lambda c, p, d, make: make("Square", (c[0],)) if p[0] == 2 else None),
    Rule("Sum", "Sum(0) = 0", lambda c, p, d, make: _zero(1, make) if c[0].op == "Zero" else None),
    Rule("Sum", "Sum of a scalar is itself", lambda c, p, d, make: c[0] if c[0].dim == 1 else None),
    Rule("Sum", "Sum(s*x) = s*Sum(x) for a scalar s", _sum_of_scaled),
    Rule("SumT", "SumT(-x) = -SumT(x)", lambda c, p, d, make: make("Minus", (make("SumT", (c[0].children[0],), p),))
         if c[0].op == "Minus" else None),
    Rule("SumT", "SumT(0) = 0", lambda c, p, d, make: _zero(d, make) if is_zero(c[0]) else None),
    Rule("Elem", "Elem(0) = 0", lambda c, p, d, make: _zero(1, make) if c[0].op == "Zero" else None),
    Rule("ElemT", "ElemT(0) = 0", lambda c, p, d, make: _zero(d, make) if is_zero(c[0]) else None),
    Rule("Extract", "Extract(0) = 0", lambda c, p, d, make: _zero(d, make) if c[0].op == "Zero" else None),
    Rule("Extract", "Extract of everything", lambda c, p, d, make: c[0] if d == c[0].dim else None),
    Rule("ExtractT", "ExtractT(0) = 0", lambda c, p, d, make: _zero(d, make) if c[0].op == "Zero" else None),
]

RULES_BY_OP: dict[str, list[Rule]] = {}
for _rule in RULES:
    RULES_BY_OP.setdefault(_rule.op, []).append(_rule)


def apply_rules(op: str, children: tuple, params: tuple, dim: int, make) -> Node | None:
    for rule in RULES_BY_OP.get(op, ()):
        result = rule.rewrite(children, params, dim, make)
        if result is not None and result.dim == dim:
            return result
    return None
