"""Pair terms in dot-product form: a scalar formula value as `const_i + sum_t coef_i,t * atom_j,t`.

The CUDA driver's fast path (`use_fast_math`, float32) evaluates such a value per pair as one FFMA per term, with
`const` and every `coef` computed once per row (hoisted) and every `atom` computed once per column when the j-tile
is staged (per-j norms and centred coordinates live in shared memory next to the j-variables). So

    -SqDist(x, y) = -|x - o|^2 + sum_k 2 (x_k - o_k) (y_k - o_k) - |y - o|^2        (D + 1 FFMA per pair)

and `Exp(a)` becomes `exp2(a * log2(e))` with log2(e) folded into the hoisted constants and coefficients (one
MUFU.EX2, no multiplication). `o` is a centre shared by both sides, one per thread block: the square's row side
evaluated at the block's first row (o = x_first for SqDist(x, y)). Any point would make the identity exact; this one
bounds float32 cancellation by distances the result itself is made of, not by the distance to the origin (a centre
taken from the columns, such as the first column of the call, is far from the rows whenever that column is: 58x off
at distance 1000 in issue 22). With eps = 2^-24, delta the largest distance between two rows of one block (at most
`block` consecutive rows) and d = |x - y|:

    |error of SqDist| <= (D + 2) eps (|x - o|^2 + |y - o|^2) <= (D + 2) eps (3 delta^2 + 2 d^2)

so, relative to d^2, the error is that of a direct float32 sum of squares (times ~2) plus a term in the spread of the
block's rows (rows are contiguous, and block-sparse `ranges` sort them into clusters). For data in a ball of
radius R, delta, d <= 2R, and a term Exp(-s SqDist) is off by at most s (D + 2) eps 20 R^2 relatively, plus exp2's
2 ulp: `FAST_RTOL` (1e-4) covers D <= 10, s R^2 <= 5 — the relative tolerance of GPU tests of the fast path on data
of unit scale (1e-5 on the exact path, as on the CPU). A square whose column side has
a row-dependent slope ((c + a t)^2 with a not a constant) has no shared centre and is computed as written.

Only sums, differences, negations, products by row-only factors, squares of one-term forms and component sums are
decomposed; anything else is not affine here and is computed as written.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..formula import I, J, P, Node
from .emit import depends_on

LOG2E = 1.4426950408889634
FAST_RTOL = 1e-4        # the fast path's documented relative error on data of unit scale (see above)


@dataclass(frozen=True)
class Affine:
    const: Node | None                      # a row/parameter-only scalar node (None = 0)
    terms: tuple[tuple[Node | None, Node], ...]   # (coef: row/parameter-only scalar node, None = 1; atom: column-only)


def centre(at_first_row: Node) -> Node:
    """The centre of a square's column side: a parameter-like scalar node (hoisted, read by the column atoms) whose
    value is the row/parameter-only node `at_first_row` evaluated at the first row of the thread block. A distinct
    Var node: its 4th and 5th parameters make its hash-consing key; the driver computes it once per block."""
    return Node("Var", (), (-1, 1, P, "centre", at_first_row), 1)


def _scalar(op: str, *children: Node, params: tuple = ()) -> Node:
    return Node(op, tuple(children), params, 1)


def _elem(node: Node, k: int) -> Node:
    return node if node.dim == 1 else _scalar("Elem", node, params=(k,))


def _add(a: Node | None, b: Node | None) -> Node | None:
    return b if a is None else a if b is None else _scalar("Add", a, b)


def _mul(a: Node | None, b: Node | None) -> Node | None:
    """Product of coefficients (None is 1)."""
    return b if a is None else a if b is None else _scalar("Mult", a, b)


def _const(value: float) -> Node:
    return _scalar("Const", params=(float(value),))


def scale_factor(value: float) -> Node:
    return _const(value)


def scale(form: Affine, factor: Node) -> Affine:
    return Affine(_mul(factor, form.const) if form.const is not None else None,
                  tuple((_mul(factor, coef), atom) for coef, atom in form.terms))


def _sum(a: Affine, b: Affine) -> Affine:
    return Affine(_add(a.const, b.const), a.terms + b.terms)


def _merged(form: Affine) -> Affine:
    """Terms with the same coefficient share one atom (|y - o|^2 is one staged number, not D)."""
    atoms: dict = {}
    for coef, atom in form.terms:
        atoms[coef] = _add(atoms.get(coef), atom)
    return Affine(form.const, tuple(atoms.items()))


def decompose(node: Node) -> list[Affine] | None:
    """One affine form per component of `node`, or None when some part is not affine in column-only atoms."""
    cats = depends_on(node)
    if J not in cats:
        return [Affine(_elem(node, k), ()) for k in range(node.dim)]
    if I not in cats:
        return [Affine(None, ((None, _elem(node, k)),)) for k in range(node.dim)]
    op, kids = node.op, node.children
    parts = [decompose(c) for c in kids]
    if any(p is None for p in parts):
        return None

    def at(p, k):
        return p[k] if len(p) > 1 else p[0]

    if op == "Add":
        return [_sum(at(parts[0], k), at(parts[1], k)) for k in range(node.dim)]
    if op in ("Subtract", "Minus"):
        minus = _const(-1.0)
        if op == "Minus":
            return [scale(at(parts[0], k), minus) for k in range(node.dim)]
        return [_sum(at(parts[0], k), scale(at(parts[1], k), minus)) for k in range(node.dim)]
    if op == "Mult":
        for side in (0, 1):
            if J not in depends_on(kids[side]):
                return [scale(at(parts[1 - side], k), _elem(kids[side], k if kids[side].dim > 1 else 0))
                        for k in range(node.dim)]
        return None
    if op == "Sum":
        total = Affine(None, ())
        for form in parts[0]:
            total = _sum(total, form)
        return [_merged(total)]
    if op == "Square":
        out = []
        for form in parts[0]:
            if len(form.terms) != 1:
                return None
            (a, t), c = form.terms[0], form.const
            if c is not None:
                # (c + a t)^2 cancels where c ~ -a t: centre both sides on o = -c / a at the block's first row,
                # c + a t = (c + a o) + a (t - o), so the cancelling parts are of the size of the block's spread
                if a is not None and (a.op not in ("Const", "IntCst") or a.params[0] == 0):
                    return None         # a row-dependent slope: no shared centre, computed as written (exact)
                o = centre(_mul(_const(-1.0 if a is None else -1.0 / a.params[0]), c))
                c, t = _add(c, _mul(a, o)), _scalar("Subtract", t, o)
            two_c_a = _mul(_const(2.0), _mul(c, a)) if c is not None else None
            terms = ((two_c_a, t),) if c is not None else ()
            out.append(Affine(_scalar("Square", c) if c is not None else None,
                              terms + ((_mul(a, a), _scalar("Square", t)),)))
        return out
    return None


def worthwhile(node: Node) -> bool:
    """Decompose only where it saves work: a square or product of column data inside (a distance, a dot product)."""
    return any(n.op in ("Square", "Mult") and J in depends_on(n) and I in depends_on(n) for n in node.postorder())


def hoist_factors(node: Node) -> Node:
    """Products regrouped so that their row/parameter-only scalar factors multiply each other first (once per row,
    hoisted) and the rest per pair: -2 * (x - y) * (e * (b * Exp(..))) -> ((-2 * e) * (b * Exp(..))) * (x - y)."""
    done: dict[Node, Node] = {}
    for n in node.postorder():
        kids = tuple(done[c] for c in n.children)
        if n.op != "Mult":
            done[n] = n if kids == n.children else Node(n.op, kids, n.params, n.dim)
            continue
        factors, stack = [], list(kids)
        while stack:
            f = stack.pop()
            if f.op == "Mult":
                stack.extend(f.children)
            else:
                factors.append(f)
        rowwise = [f for f in factors if J not in depends_on(f) and f.dim == 1]
        scalars = [f for f in factors if f not in rowwise and f.dim == 1]
        vectors = [f for f in factors if f.dim > 1]
        product = None
        for f in rowwise + scalars:
            product = f if product is None else _scalar("Mult", product, f)
        for f in vectors:
            product = f if product is None else Node("Mult", (product, f), (), f.dim)
        done[n] = product if product.dim == n.dim else n
    return done[node]
