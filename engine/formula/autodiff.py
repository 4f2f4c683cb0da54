"""Symbolic differentiation: gradients are formulas built from the op table's gradient rules.

`grad(f, v, e)` is e^T df/dv, computed by reverse mode over the node DAG: every node's cotangent is the sum of
what its parents send it, and a parent sends each operand the formula written in its row's `grad` column. The
results are ordinary nodes (built through `make`, so simplified and hash-consed), which is what lets a gradient be
differentiated again, reduced, compiled and shipped like any other formula.

`Diff`, `Divergence` and `Laplacian` are built from `grad` with a private "dummy" variable that the linear
algebra below removes again (a cotangent is linear, so transposing or tracing it is exact).
"""
from __future__ import annotations

import functools

from ..errors import DimensionError, FormulaError
from .build import make
from .nodes import Node, bounded
from .ops import DERIVATIVES, EXPANSIONS, MAX_TERMS, OPS, _elem, _total, _vector
from .parse import instantiate

# A category no user variable can have (make() refuses it), for the placeholders of Diff / Divergence / Laplacian.
_DUMMY_CATEGORY = -1


def derivative_op(name: str, args: list) -> Node:
    """The parser's entry point for `Grad(f, v, e)`, `Diff(f, v, u)`, `Divergence(f, v)`, `Laplacian(f, v)`."""
    arity = {"Grad": 3, "Diff": 3, "Divergence": 2, "Laplacian": 2}[name]
    if len(args) != arity:
        form = {"Grad": "Grad(f, v, e)", "Diff": "Diff(f, v, u)", "Divergence": "Divergence(f, v)",
                "Laplacian": "Laplacian(f, v)"}[name]
        raise FormulaError(f"{name} takes {arity} formulas: {form}; got {len(args)}")
    return {"Grad": grad, "Diff": diff, "Divergence": divergence, "Laplacian": laplacian}[name](*args)


@bounded
def grad(f: Node, v: Node, e: Node) -> Node:
    """e^T (df/dv): the gradient of f with respect to variable v, against a cotangent e of f's dimension."""
    _check_variable("Grad", v)
    if e.dim != f.dim:
        raise DimensionError(f"Grad: the cotangent has dimension {e.dim} but the formula has dimension {f.dim}")
    order = f.postorder()
    needed = _depends_on(order, v)
    if id(f) not in needed:
        return make("Zero", (), (v.dim,))
    cotangents: dict[int, Node] = {id(f): e}
    for node in reversed(order):               # parents before children: a cotangent is complete when reached
        g = cotangents.pop(id(node), None)
        if g is None or node.op == "Var":
            if node is v:
                cotangents[id(v)] = g
            continue
        for child, rule in zip(node.children, _rules(node)):
            if rule is None or id(child) not in needed:
                continue
            sent = _operand_cotangent(node, child, rule, g)
            known = cotangents.get(id(child))
            cotangents[id(child)] = sent if known is None else make("Add", (known, sent))
    result = cotangents.get(id(v))
    return result if result is not None else make("Zero", (), (v.dim,))


@bounded
def diff(f: Node, v: Node, u: Node) -> Node:
    """(df/dv) u: the derivative of f with respect to v in the direction u (dimension of v)."""
    _check_variable("Diff", v)
    if u.dim != v.dim:
        raise DimensionError(f"Diff: the direction has dimension {u.dim} but the variable has dimension {v.dim}")
    e = _dummy(f.dim)
    # grad(f, v, e) is linear in e; differentiating it with respect to e against u transposes it.
    return _drop(grad(grad(f, v, e), e, u), e)


@bounded
def divergence(f: Node, v: Node) -> Node:
    """Sum_k d f_k / d v_k, for f of the same dimension as v."""
    _check_variable("Divergence", v)
    if f.dim != v.dim:
        raise DimensionError(f"Divergence: the formula has dimension {f.dim} but the variable has dimension {v.dim}")
    e = _dummy(f.dim)
    return _trace(grad(f, v, e), e)


@bounded
def laplacian(f: Node, v: Node) -> Node:
    """Sum_k d^2 f / d v_k^2, for a scalar f."""
    _check_variable("Laplacian", v)
    if f.dim != 1:
        raise DimensionError(f"Laplacian: the formula must be scalar (dimension 1), not {f.dim}")
    return divergence(grad(f, v, make("IntCst", (), (1,))), v)


@bounded
def substitute(f: Node, replacements: dict[Node, Node]) -> Node:
    """f with some nodes replaced (same dimensions), rebuilt through `make` so the result is simplified."""
    done: dict[int, Node] = {}
    for node in f.postorder():
        if node in replacements:
            done[id(node)] = replacements[node]
        elif not node.children:
            done[id(node)] = node
        else:
            children = tuple(done[id(c)] for c in node.children)
            same = all(a is b for a, b in zip(children, node.children))
            done[id(node)] = node if same else make(node.op, children, node.params)
    return done[id(f)]


# Helpers ---------------------------------------------------------------------------------------------------

def _check_variable(name: str, v: Node) -> None:
    if v.op != "Var":
        raise FormulaError(f"{name}: the second argument must be a variable (an alias or Vi/Vj/Pm(pos, dim))")


def _depends_on(order: list[Node], v: Node) -> set[int]:
    """ids of the nodes whose value depends on v (only those need cotangents)."""
    needed: set[int] = set()
    for node in order:
        if node is v or any(id(c) in needed for c in node.children):
            needed.add(id(node))
    return needed


def _rules(node: Node) -> tuple:
    rules = OPS[node.op].grad
    if callable(rules):
        rules = rules(node.params)
    return rules or (None,) * len(node.children)


def _operand_cotangent(node: Node, child: Node, rule: str, g: Node) -> Node:
    names = dict(zip("xyz", node.children), out=node, g=g)
    fields = {f"d{k}": c.dim for k, c in enumerate(node.children)}
    fields.update({f"p{k}": p for k, p in enumerate(node.params)}, dout=node.dim)
    sent = instantiate(rule, names, fields)
    if sent.dim == child.dim:
        return sent
    if child.dim == 1:                          # a broadcast operand receives the sum of its copies' cotangents
        return make("Sum", (sent,))
    raise AssertionError(f"op table: {node.op} gradient rule {rule!r} gives dimension {sent.dim} "
                         f"for an operand of dimension {child.dim}")


def _dummy(dim: int) -> Node:
    return Node("Var", (), (0, dim, _DUMMY_CATEGORY), dim)


def _drop(f: Node, dummy: Node) -> Node:
    """Remove a placeholder that a linear rewrite left behind only in terms whose value does not depend on it."""
    if dummy not in f.postorder():
        return f
    return substitute(f, {dummy: make("Zero", (), (dummy.dim,))})


def _trace(linear: Node, e: Node) -> Node:
    """The trace of the linear map e -> linear(e) (square): Sum_k linear(unit_k)_k."""
    terms = []
    for k in range(e.dim):
        unit = make("ElemT", (make("IntCst", (), (1,)),), (e.dim, k)) if e.dim > 1 else make("IntCst", (), (1,))
        column = substitute(linear, {e: unit})
        terms.append(make("Elem", (column,), (k,)) if e.dim > 1 else column)
    total = terms[0]
    for term in terms[1:]:
        total = make("Add", (total, term))
    return total


# The derivative ops of the op table (GradMatrix, TraceOperator): their expansions differentiate, so they live
# here and are registered in the table's EXPANSIONS (the table imports no reader of itself).

def _variable_operand(v, op):
    if v.op != "Var":
        raise DimensionError(f"{op}: the second operand must be a variable, not {v!r}")


def _check_copies(f, copies: int, op: str) -> None:
    """A composite that differentiates f `copies` times must stay within MAX_TERMS nodes' worth of work."""
    if copies * len(f.postorder()) > MAX_TERMS:
        raise DimensionError(f"{op}: {copies} derivatives of a formula of {len(f.postorder())} nodes exceed the "
                             f"limit of {MAX_TERMS}")


def _basis(dim, k, make):
    return make("ElemT", (make("IntCst", (), (1,)),), (dim, k))


def _expand_grad_matrix(children, params, make):
    """The gradients of f's components with respect to v, row after row (the transposed Jacobian)."""
    f, v = children
    _variable_operand(v, "GradMatrix")
    _check_copies(f, f.dim, "GradMatrix")
    return _vector([grad(f, v, _basis(f.dim, k, make)) for k in range(f.dim)], make)


def _expand_trace(children, params, make):
    """The trace of f, linear in v: sum_k <e_k, f(e_k)> (for a scalar f, sum_k f(e_k))."""
    f, v = children
    _variable_operand(v, "TraceOperator")
    _check_copies(f, v.dim, "TraceOperator")
    terms = [diff(f, v, _basis(v.dim, k, make)) for k in range(v.dim)]
    return _total([t if f.dim == 1 else _elem(t, k, make) for k, t in enumerate(terms)], make)


EXPANSIONS.update(GradMatrix=_expand_grad_matrix, TraceOperator=_expand_trace)
DERIVATIVES.update({name: functools.partial(derivative_op, name) for name in ("Grad", "Diff", "Divergence", "Laplacian")})
