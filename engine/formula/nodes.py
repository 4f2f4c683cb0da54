"""Immutable, hash-consed formula nodes.

A node is `(op, children, params)`: `op` names a row of the op table, `children` are nodes, `params` are the
integer or float parameters of the row (an exponent, an index, a variable's position). Building the same node twice
returns the same object, so equality is identity and common sub-expressions are shared for free. The intern table
holds nodes weakly: a node lives only as long as a formula uses it.

Symbolic work is bounded while it happens: inside `node_budget()` (which the parser, autodiff and the plan builders
open) every node created counts, and the one past the limit raises a FormulaError, so nested derivatives that grow
exponentially are stopped early and leave nothing behind.
"""
from __future__ import annotations

import functools
import threading
import weakref

from .. import limits
from ..errors import FormulaError

_TABLE: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()
_BUDGET = threading.local()     # .left: nodes this thread's current symbolic work may still create (None: unbounded)


class node_budget:
    """`with node_budget():` bounds the nodes created inside by `limit` (default: limits.FORMULA_NODES, set by
    KRED_MAX_FORMULA_NODES). Budgets do not stack: inside an open one, a new one joins it."""

    def __init__(self, limit: int | None = None):
        self.limit = limit

    def __enter__(self):
        self.outermost = getattr(_BUDGET, "left", None) is None
        if self.outermost:
            _BUDGET.limit = _BUDGET.left = self.limit if self.limit is not None else limits.FORMULA_NODES
        return self

    def __exit__(self, *exc):
        if self.outermost:
            _BUDGET.left = None


def bounded(function):
    """Run `function` within a node budget (joining the caller's, if one is open)."""
    @functools.wraps(function)
    def within_budget(*args, **kwargs):
        with node_budget():
            return function(*args, **kwargs)
    return within_budget


def _charge() -> None:
    left = getattr(_BUDGET, "left", None)
    if left is None:
        return
    if left <= 0:
        raise FormulaError(f"the formula is too large: building it needs more than {_BUDGET.limit} nodes (the limit, "
                           "KRED_MAX_FORMULA_NODES); nested derivatives grow formulas exponentially")
    _BUDGET.left = left - 1

# Variable categories, as in KeOps: indexed by i, by j, or a parameter shared by all pairs.
I, J, P = 0, 1, 2
CATEGORY_NAMES = {I: "Vi", J: "Vj", P: "Pm"}


class Node:
    __slots__ = ("op", "children", "params", "dim", "_key", "__weakref__")

    op: str
    children: tuple["Node", ...]
    params: tuple
    dim: int

    def __new__(cls, op: str, children: tuple = (), params: tuple = (), dim: int = 1):
        key = (op, children, params)
        with _LOCK:
            node = _TABLE.get(key)
            if node is None:
                _charge()
                node = object.__new__(cls)
                object.__setattr__(node, "op", op)
                object.__setattr__(node, "children", children)
                object.__setattr__(node, "params", params)
                object.__setattr__(node, "dim", dim)
                object.__setattr__(node, "_key", key)
                _TABLE[key] = node
        return node

    def __setattr__(self, name, value):
        raise AttributeError("formula nodes are immutable")

    def __reduce__(self):  # pickling rebuilds through the hash-consing constructor
        return (Node, (self.op, self.children, self.params, self.dim))

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other

    def __repr__(self):
        return to_text(self)

    # Walks -----------------------------------------------------------------------------------------
    def postorder(self) -> list["Node"]:
        """Every distinct node below and including this one, children before parents (no recursion)."""
        seen, order, stack = set(), [], [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.children) if id(child) not in seen)
        return order

    def variables(self) -> list["Node"]:
        return sorted({n for n in self.postorder() if n.op == "Var"}, key=lambda v: v.params)

    @property
    def is_variable(self) -> bool:
        return self.op == "Var"


def var(pos: int, dim: int, cat: int) -> Node:
    return Node("Var", (), (int(pos), int(dim), int(cat)), int(dim))


def to_text(node: Node) -> str:
    """Canonical text of a node: parses back to the same node."""
    texts: dict[int, str] = {}
    for n in node.postorder():
        args = [texts[id(c)] for c in n.children] + [_param_text(p) for p in n.params]
        texts[id(n)] = f"{n.op}({','.join(args)})"
    return texts[id(node)]


def fingerprint(node: Node) -> str:
    """A text that identifies a node, linear in its number of distinct nodes: each node once, children by number.
    (`to_text` writes shared sub-formulas again at each use, which grows exponentially on deep DAGs such as the
    gradient of a dynamic programme.)"""
    number: dict[int, int] = {}
    lines = []
    for n in node.postorder():
        number[id(n)] = len(lines)
        args = [f"#{number[id(c)]}" for c in n.children] + [_param_text(p) for p in n.params]
        lines.append(f"{n.op}({','.join(args)})")
    return ";".join(lines)


def _param_text(p) -> str:
    if isinstance(p, tuple):
        return f"Ind({','.join(map(str, p))})"
    return repr(float(p)) if isinstance(p, float) else str(p)
