"""The C emitter shared by the CPU and CUDA backends: formula bodies, reduction steps and the math prelude.

Everything here is target-neutral C99 (it also compiles under NVRTC): only generated identifiers and numeric
literals reach the source, never user text. A driver (CPU: `engine/codegen/cpu.py`; CUDA: its own) decides the loop
structure, where variables live and where states are stored, and asks this module for the pieces:

    prelude(target, real, acc)          -> C text: typedefs `kred_real` / `kred_acc` / `kred_index`, the constants
                                           `KRED_INF`, `KRED_NO_INDEX`, the `KRED_FN` qualifier and the math helpers
                                           `kred_exp`, `kred_log`, `kred_rsqrt`, ... (for kred_real) and
                                           `kred_acc_exp`, `kred_acc_log` (for kred_acc). See `prelude.py`.

    Emitter(load, prefix).emit(node)    -> list of C expressions, one per component of `node`, valid after the
                                           statements accumulated in `emitter.lines` (declarations `const kred_real
                                           v12_0 = ...;`). `load(var_node, k)` returns the C expression reading
                                           component k of a variable (the driver knows the memory layout);
                                           `copy_vars=True` binds those loads to locals too. Shared sub-expressions
                                           are emitted once (nodes are hash-consed). An emitter can start from the
                                           values of another one (`known=`), which is how a driver hoists the i-only
                                           part of a formula out of its j loop (`depends_on`).

    The reduction steps are the reduction's own methods (`engine.reductions.base`), called by the drivers directly:
    `plan.reduction.c_init / c_start / c_accumulate / c_merge / c_finalize / c_candidate`, over a state accessor
    `state(slot, comp) -> C lvalue` where `slot` indexes `reduction.slots()` and `comp` is a C integer expression.

The layout of states is the one of `engine.reductions` (`layout()`): a state computed in C can be merged with states
of any backend, and finalized by the numpy reduction.
"""
from __future__ import annotations

import math
from typing import Callable

from ..errors import BackendError
from ..formula import I, J, P, Node
from ..formula.ops import OPS, tensor_axes
from .prelude import prelude

# Unrolled scalar code grows with dimensions; past this many components a formula is refused with a clear error
# (the reference backend evaluates it) rather than producing a source file the compiler chokes on.
MAX_COMPONENTS = 20_000

Load = Callable[[Node, int], str]


def depends_on(node: Node) -> frozenset[int]:
    """The variable categories (I, J, P) that `node` reads."""
    return frozenset(v.params[2] for v in node.variables())


def literal(value) -> str:
    """A C literal for an IntCst/Const parameter (Python ints and finite floats only)."""
    if isinstance(value, int):
        return f"((kred_real){value})"
    return f"((kred_real){float(value)!r})"


class Emitter:
    """Emits C declarations for formula nodes, one scalar per component, children before parents."""

    def __init__(self, load: Load, prefix: str = "v", known: dict | None = None, copy_vars: bool = False):
        # copy_vars: bind loaded variable components to local constants (a driver hoisting loads out of a loop)
        self.load, self.prefix, self.copy_vars = load, prefix, copy_vars
        self.values: dict[Node, list[str]] = dict(known or {})
        self.lines: list[str] = []
        self._count = 0
        self._components = 0

    def emit(self, root: Node) -> list[str]:
        """Emit what `root` needs (children before parents; nothing below a node whose value is already known)."""
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in self.values:
                continue
            if expanded:
                self.values[node] = self._node(node)
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.children) if child not in self.values)
        return self.values[root]

    # One node ------------------------------------------------------------------------------------------
    def _declare(self, expressions: list[str]) -> list[str]:
        """Bind each expression to a fresh `const kred_real` identifier."""
        self._components += len(expressions)
        self._check_size()
        name = f"{self.prefix}{self._count}"
        self._count += 1
        names = []
        for k, expr in enumerate(expressions):
            if _is_atom(expr):          # literals and plain identifiers need no copy
                names.append(expr)
                continue
            self.lines.append(f"const kred_real {name}_{k} = {expr};")
            names.append(f"{name}_{k}")
        return names

    def _array(self, size: int) -> str:
        """A fresh identifier for a local array of `size` components (an op emitted as a loop writes it)."""
        self._components += size
        self._check_size()
        name = f"{self.prefix}{self._count}"
        self._count += 1
        return name

    def _check_size(self) -> None:
        if self._components > MAX_COMPONENTS:
            raise BackendError(f"formula too large for a compiled backend (more than {MAX_COMPONENTS} scalar "
                               "components); use backend='reference'")

    def _node(self, node: Node) -> list[str]:
        op, p = node.op, node.params
        if op == "Var":
            loads = [f"({self.load(node, k)})" for k in range(node.dim)]
            return self._declare(loads) if self.copy_vars else loads
        if op in ("IntCst", "Const"):
            return [literal(p[0])]
        if op == "Zero":
            return ["((kred_real)0)"] * node.dim
        x = [self.values[c] for c in node.children]
        layout = _STRUCTURAL.get(op)
        if layout is not None:
            return layout(self, node, x)
        template = OPS[op].c
        if template is None:
            raise BackendError(f"op {op} has no C form")
        fields = {f"p{k}": str(v) for k, v in enumerate(p)}
        out = []
        for k in range(node.dim):
            operands = [xs[k] if len(xs) > 1 else xs[0] for xs in x]
            out.append(template.format(*operands, **fields))
        return self._declare(out)


def _is_atom(expr: str) -> bool:
    # a literal is exactly "((kred_real)value)": "((kred_real)2) * v0_0" starts the same way but is not one
    return expr.isidentifier() or (expr.startswith("((kred_real)") and expr.count("(") == 2 and expr.endswith(")"))


def _tree(items: list[str], join: Callable[[str, str], str]) -> str:
    """Combine items pairwise (a balanced tree: independent operations for the CPU, less rounding error)."""
    while len(items) > 1:
        items = [join(items[k], items[k + 1]) if k + 1 < len(items) else items[k] for k in range(0, len(items), 2)]
    return items[0]


def _sum(e, node, x):
    return e._declare([_tree(list(x[0]), lambda a, b: f"({a} + {b})")])


def _extremum(fn):
    def layout(e, node, x):
        return e._declare([_tree(list(x[0]), lambda a, b: f"{fn}({a}, {b})")])
    return layout


def _arg_extremum(compare):
    """First index of the extreme entry (NaN counts as extreme, like numpy's argmax/argmin)."""
    def layout(e, node, x):
        values = x[0]
        best, index = values[0], "((kred_real)0)"
        for k in range(1, len(values)):
            v = values[k]
            take = f"({v} {compare} {best} || ({v} != {v} && {best} == {best}))"
            best, index = e._declare([f"({take} ? {v} : {best})", f"({take} ? ((kred_real){k}) : {index})"])
        return [index]
    return layout


def _onehot(e, node, x):
    v = x[0][0]
    return e._declare([f"(kred_rint({v}) == {k} ? ((kred_real)1) : ((kred_real)0))" for k in range(node.dim)])


def _matvec(e, node, x):
    a, v = x
    m = len(v)
    return e._declare([_tree([f"{a[r * m + c]} * {v[c]}" for c in range(m)], lambda s, t: f"({s} + {t})")
                       for r in range(node.dim)])


def _vecmat(e, node, x):
    v, a = x
    n, out = len(v), node.dim
    return e._declare([_tree([f"{v[r]} * {a[r * out + c]}" for r in range(n)], lambda s, t: f"({s} + {t})")
                       for c in range(out)])


def _tensorprod(e, node, x):
    a, b = x
    return e._declare([f"{ai} * {bj}" for ai in a for bj in b])


def _tensordot(e, node, x):
    """TensorDot (and Kron, which expands into it) as loops over a local copy of its operands: one loop per output
    axis (in numpy.tensordot's order), one per contracted axis inside, addresses as sums of loop counter x stride.
    The source grows with the tensors' ranks, not with their sizes (scalar expansion would write every product)."""
    t = tensor_axes((len(x[0]), len(x[1])), node.params, "TensorDot")
    e._components += len(x[0]) + len(x[1])
    out = e._array(node.dim)
    a, b = f"{out}a", f"{out}b"

    def strides(shape):
        return [math.prod(shape[k + 1:]) for k in range(len(shape))]

    stride_a, stride_b, stride_out = strides(t.shape_a), strides(t.shape_b), strides(t.out_shape)
    free = [(t.shape_a[k], stride_a[k], 0) for k in t.free_a] + [(t.shape_b[k], 0, stride_b[k]) for k in t.free_b]
    loops, address_a, address_b, address_out = [], [], [], []
    for k, (size, sa, sb) in enumerate(free):
        counter = f"{out}t{k}"
        loops.append(f"for (int {counter} = 0; {counter} < {size}; {counter}++)")
        address_a += [f"{sa} * {counter}"] if sa else []
        address_b += [f"{sb} * {counter}"] if sb else []
        address_out.append(f"{stride_out[t.permute[k]]} * {counter}")
    inner = []
    for c, (k, l) in enumerate(zip(t.axes_a, t.axes_b)):
        counter = f"{out}c{c}"
        inner.append(f"for (int {counter} = 0; {counter} < {t.shape_a[k]}; {counter}++)")
        address_a.append(f"{stride_a[k]} * {counter}")
        address_b.append(f"{stride_b[l]} * {counter}")
    total = f"{out}s"
    e.lines += [f"kred_real {out}[{node.dim}];", "{",
                f"    const kred_real {a}[{len(x[0])}] = {{{', '.join(x[0])}}};",
                f"    const kred_real {b}[{len(x[1])}] = {{{', '.join(x[1])}}};"]
    e.lines += [f"    {loop} {{" for loop in loops]
    e.lines += [f"    kred_real {total} = (kred_real)0;"]
    e.lines += [f"    {loop} {{" for loop in inner]
    e.lines += [f"    {total} += {a}[{' + '.join(address_a) or '0'}] * {b}[{' + '.join(address_b) or '0'}];"]
    e.lines += ["    }"] * len(inner)
    e.lines += [f"    {out}[{' + '.join(address_out) or '0'}] = {total};"]
    e.lines += ["    }"] * len(loops) + ["}"]
    return [f"{out}[{k}]" for k in range(node.dim)]


_ZERO = "((kred_real)0)"

# Structural ops: laid out here rather than from a per-component template. Pure data movement (slices, copies,
# concatenation) reuses the children's identifiers and costs nothing.
_STRUCTURAL = {
    "Sum": _sum,
    "Max": _extremum("kred_max"),
    "Min": _extremum("kred_min"),
    "ArgMax": _arg_extremum(">"),
    "ArgMin": _arg_extremum("<"),
    "SumT": lambda e, node, x: x[0] * node.dim,
    "Elem": lambda e, node, x: [x[0][node.params[0]]],
    "ElemT": lambda e, node, x: [x[0][0] if k == node.params[1] else _ZERO for k in range(node.dim)],
    "Extract": lambda e, node, x: x[0][node.params[0]:node.params[0] + node.params[1]],
    "ExtractT": lambda e, node, x: [_ZERO] * node.params[0] + x[0] + [_ZERO] * (node.dim - node.params[0] - len(x[0])),
    "Concat": lambda e, node, x: x[0] + x[1],
    "OneHot": _onehot,
    "MatVecMult": _matvec,
    "VecMatMult": _vecmat,
    "TensorProd": _tensorprod,
    "TensorDot": _tensordot,
}


__all__ = ["Emitter", "I", "J", "P", "MAX_COMPONENTS", "depends_on", "literal", "prelude"]
