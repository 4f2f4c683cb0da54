"""Simplification rules, as data: each row is (op, what it does, rewrite).

A rewrite receives the operands, the params and the node's dimension, and returns a replacement node or None.
`apply_rules` keeps a replacement only when its dimension equals the node's, so no rule can change a formula's
meaning through broadcasting. The rules fold constants and remove zeros, ones and double negations: enough to keep
the derivatives of Gaussian kernels small.
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
    Rule("Divide", "x / 1 = x", lambda c, p, d, make: c[0] if is_one(c[1]) else None),
    Rule("Divide", "0 / x = 0", lambda c, p, d, make: _zero(d, make) if is_zero(c[0]) else None),
    Rule("Minus", "--x = x", lambda c, p, d, make: c[0].children[0] if c[0].op == "Minus" else None),
    Rule("Minus", "-0 = 0", lambda c, p, d, make: _zero(d, make) if c[0].op == "Zero" else None),
    Rule("Minus", "fold constants", _fold(lambda a: -a)),
    Rule("Square", "fold constants", _fold(lambda a: a * a)),
    Rule("Pow", "x^1 = x", lambda c, p, d, make: c[0] if p[0] == 1 else None),
    Rule("Pow", "x^2 = Square(x)", lambda c, p, d, make: make("Square", (c[0],)) if p[0] == 2 else None),
    Rule("Sum", "Sum(0) = 0", lambda c, p, d, make: _zero(1, make) if c[0].op == "Zero" else None),
    Rule("Sum", "Sum of a scalar is itself", lambda c, p, d, make: c[0] if c[0].dim == 1 else None),
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
