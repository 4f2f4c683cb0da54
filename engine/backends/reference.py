"""The numpy reference backend: evaluates the formula tree on bounded i x j tiles.

Memory stays O(N + M): only one tile of pair values (at most TILE_ELEMENTS numbers per live node) and one block
of row states exist at a time. It is the oracle the compiled backends are checked against, so it favours
clarity over speed.
"""
from __future__ import annotations

import numpy as np

from ..formula import I, J, Node
from ..formula.ops import OPS
from ..grid import Grid, grid_state
from .base import Backend

TILE_ELEMENTS = 1 << 21


class ReferenceBackend(Backend):
    name = "reference"

    def partial(self, plan, arrays, rows, cols):
        (r0, r1), (c0, c1) = rows, cols
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        plan, arrays = plan.kernel_inputs(arrays, dtype)    # the constants as the compiled backends read them
        acc = plan.acc_dtype(dtype)
        reduction = plan.reduction
        nodes = plan.formula.postorder() + (plan.formula2.postorder() if plan.formula2 is not None else [])
        width = sum(n.dim for n in nodes) + 1
        ti = max(1, min(r1 - r0, 1024))
        tj = max(1, min(c1 - c0, TILE_ELEMENTS // (ti * width)))
        ti = max(1, min(r1 - r0, TILE_ELEMENTS // (tj * width)))

        def tile(rows, cols):
            f = evaluate(plan.formula, arrays, rows, cols, dtype)
            f2 = evaluate(plan.formula2, arrays, rows, cols, dtype) if plan.formula2 is not None else None
            return reduction.tile(f, f2, cols[0], acc)

        grid = Grid.tiles(rows, cols, ti, tj)
        return grid_state(grid, reduction, tile, lambda count: reduction.identity(count, dtype, acc))


def evaluate(formula: Node, arrays, rows, cols, dtype) -> np.ndarray:
    """Values of `formula` for rows x cols, shape (rows, cols, dim)."""
    (i0, i1), (j0, j1) = rows, cols
    values: dict[int, np.ndarray] = {}
    with np.errstate(all="ignore"):
        for node in formula.postorder():
            values[id(node)] = _value(node, values, arrays, i0, i1, j0, j1, dtype)
    out = values[id(formula)]
    return np.broadcast_to(out, (i1 - i0, j1 - j0, formula.dim))


def _value(node, values, arrays, i0, i1, j0, j1, dtype):
    if node.op == "Var":
        pos, _, cat = node.params
        a = arrays[pos]
        if cat == I:
            return a[i0:i1, None, :]
        if cat == J:
            return a[None, j0:j1, :]
        return a[None, None, :]
    if node.op in ("IntCst", "Const"):
        return np.full((1, 1, 1), node.params[0], dtype)
    if node.op == "Zero":
        return np.zeros((1, 1, node.dim), dtype)
    children = [values[id(c)] for c in node.children]
    out = OPS[node.op].numpy(*children, params=node.params, out_dim=node.dim)
    return out.astype(dtype, copy=False)
