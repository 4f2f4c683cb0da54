"""The Plan: everything a backend needs to run one reduction, independent of the data.

A plan is normalised so that every backend reduces over "columns" and returns one output per "row": for `axis=1`
(reduce over j) rows are the i variables; for `axis=0` the formula's i and j categories are swapped. Backends,
the cluster and the service therefore only ever see one orientation. `check_args` turns the user's arrays into
validated, contiguous arrays and reports N (rows) and M (columns).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np

from .errors import ArgumentError, FormulaError
from .formula import CATEGORY_NAMES, I, J, P, Node, fingerprint, make, to_text
from .formula.nodes import bounded
from .reductions import Reduction, bind

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
DTYPE_ACC = ("auto", "float32", "float64")
ROWS, COLS, PARAM = I, J, P     # roles after normalisation


@dataclass(frozen=True)
class ArgSpec:
    pos: int
    name: str       # the alias, or Var(pos) when the formula names it inline
    cat: int        # as the user wrote it: 0 = Vi, 1 = Vj, 2 = Pm
    role: int       # after normalisation: ROWS, COLS or PARAM
    dim: int

    def describe(self) -> str:
        return f"{self.name} = {CATEGORY_NAMES[self.cat]}({self.pos}, {self.dim})"


@dataclass(frozen=True, eq=False)
class Plan:
    formula: Node                 # normalised: reduced over COLS
    formula2: Node | None
    reduction: Reduction
    axis: int
    args: tuple[ArgSpec, ...]
    dtype_acc: str = "auto"
    fast_math: bool = True        # pykeops's use_fast_math: GPU kernels may use approximate exp (see codegen/cuda.py)
    key: str = field(default="", compare=False)

    @property
    def nargs(self) -> int:
        return len(self.args)

    @property
    def out_dim(self) -> int:
        return self.reduction.out_dim

    # Lifted constants: what compiled backends compile ------------------------------------------------------
    @functools.cached_property
    def _lifting(self) -> tuple[Plan, tuple[float, ...]]:
        return lift_constants(self)

    @property
    def lifted(self) -> Plan:
        """This plan with its float constants lifted out (see `lift_constants`): the plan backends compile and key
        kernels by, the same for every plan that differs from this one only in its float constants."""
        return self._lifting[0]

    @property
    def lifted_values(self) -> tuple[float, ...]:
        """The values of the lifted constants, in the order of their argument positions (nargs, nargs + 1, ...)."""
        return self._lifting[1]

    def kernel_inputs(self, arrays, dtype) -> tuple[Plan, list]:
        """(the plan to compile, its arrays): `lifted`, and `arrays` followed by one 1-element array per lifted
        constant, in `dtype`. float16 keeps its constants as literals (an array of them would round them to half)."""
        dtype = np.dtype(dtype)
        if dtype not in DTYPES or not self.lifted_values:
            return self, arrays
        by_dtype = self.__dict__.setdefault("_constant_arrays", {})     # a memo beside the frozen fields
        constants = by_dtype.get(dtype)
        if constants is None:
            constants = by_dtype[dtype] = [np.full(1, value, dtype) for value in self.lifted_values]
        return self.lifted, list(arrays) + constants

    def acc_dtype(self, dtype: np.dtype) -> np.dtype:
        if self.dtype_acc == "auto":
            return np.dtype(np.float64)
        return max(np.dtype(self.dtype_acc), np.dtype(dtype), key=lambda d: d.itemsize)

    def check_args(self, args, xp=np, dtypes=DTYPES) -> tuple[list[np.ndarray], np.dtype, int, int]:
        """Validate arrays against the aliases: returns (arrays, dtype, rows N, columns M).

        `xp` is the array module of the backend (CuPy keeps GPU-resident inputs on the GPU) and `dtypes` the input
        dtypes it computes in."""
        if len(args) != self.nargs:
            names = ", ".join(a.name for a in self.args)
            raise ArgumentError(f"expected {self.nargs} arrays ({names}), got {len(args)}")
        arrays, dtype = [], None
        for spec, value in zip(self.args, args):
            array = _as_array(spec, value, xp, dtypes)
            if dtype is None:
                dtype, first = array.dtype, spec
            elif array.dtype != dtype:
                raise ArgumentError(f"{spec.name} is {array.dtype} but {first.name} is {dtype}: "
                                    "all arrays must share one dtype")
            arrays.append(array)
        sizes = {ROWS: None, COLS: None}
        for spec, array in zip(self.args, arrays):
            if spec.role == PARAM:
                continue
            known = sizes[spec.role]
            if known is not None and known[1] != array.shape[0]:
                index = "ij"[spec.cat]
                raise ArgumentError(f"{spec.name} has {array.shape[0]} rows but {known[0]} has {known[1]}; "
                                    f"variables indexed by {index} must have the same number of rows")
            sizes[spec.role] = sizes[spec.role] or (spec.name, array.shape[0])
        n = sizes[ROWS][1] if sizes[ROWS] else 1
        m = sizes[COLS][1] if sizes[COLS] else 1
        if m == 0 and not self.reduction.empty_ok:
            raise ArgumentError(f"{self.reduction.name} of an empty set (M = 0) is undefined")
        if self.reduction.k is not None and self.reduction.k > m:
            raise ArgumentError(f"{self.reduction.name}: K = {self.reduction.k} exceeds the {m} points reduced over")
        return arrays, dtype if dtype is not None else np.dtype(np.float32), n, m


def _as_array(spec: ArgSpec, value, xp=np, dtypes=DTYPES) -> np.ndarray:
    # a torch tensor (the type test first: hasattr on a numpy array is slow): a CUDA one stays put for CuPy
    if type(value) is not np.ndarray and hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach()
        if xp is np or not value.is_cuda:
            value = value.cpu().numpy()
    try:
        array = xp.asarray(value)
    except Exception as e:
        raise ArgumentError(f"{spec.describe()}: cannot be read as an array ({e})") from None
    if array.dtype not in dtypes:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise ArgumentError(f"{spec.describe()}: dtype {array.dtype} is not supported; use {names}")
    if spec.role == PARAM:
        if array.size != spec.dim or array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
            raise ArgumentError(f"{spec.describe()}: expected shape ({spec.dim},), got {array.shape}")
        return xp.ascontiguousarray(array.reshape(spec.dim))
    if array.ndim == 1 and spec.dim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != spec.dim:
        letter = "NM"[spec.cat]
        raise ArgumentError(f"{spec.describe()}: expected shape ({letter}, {spec.dim}), got {array.shape}")
    return xp.ascontiguousarray(array)


# Building plans ----------------------------------------------------------------------------------------

NODE_BYTES = 400    # roughly what one interned node keeps alive (the object, its key tuple, the intern table's entry)


def plan_bytes(plan: Plan) -> int:
    """Roughly the memory a plan keeps alive: its formulas' distinct nodes."""
    nodes = len(plan.formula.postorder()) + (len(plan.formula2.postorder()) if plan.formula2 is not None else 0)
    lifted = "_lifting" in plan.__dict__ and plan.lifted is not plan      # its copy with the constants lifted
    return nodes * NODE_BYTES * (2 if lifted else 1)


def plan_from_nodes(f: Node, f2: Node | None, reduction_op: str, axis: int, opt_arg=None, dtype_acc="auto",
                    names: dict[str, Node] | None = None, nargs: int | None = None, fast_math: bool = True) -> Plan:
    """A Plan from formula nodes (used by the parser path and by autodiff, which builds nodes directly)."""
    if axis not in (0, 1) or isinstance(axis, bool):
        raise ArgumentError(f"axis must be 0 (reduce over i) or 1 (reduce over j), got {axis!r}")
    if dtype_acc not in DTYPE_ACC:
        raise ArgumentError(f"dtype_acc must be one of {', '.join(DTYPE_ACC)}, got {dtype_acc!r}")
    reduction = bind(reduction_op, f.dim, f2.dim if f2 is not None else None, opt_arg)
    if f2 is not None and not reduction.uses_formula2:
        raise FormulaError(f"{reduction_op} does not take formula2")
    args = _arg_specs(f, f2, names or {}, axis, nargs)
    if axis == 0:
        f, f2 = swap_ij(f), swap_ij(f2) if f2 is not None else None
    formulas = [fingerprint(f), fingerprint(f2) if f2 is not None else ""]        # linear in the DAG's size
    key = "|".join(formulas + [reduction_op, str(opt_arg), dtype_acc, _layout(args)] + ([] if fast_math else ["exact math"]))
    return Plan(f, f2, reduction, axis, args, dtype_acc, bool(fast_math),
                hashlib.sha256(key.encode()).hexdigest()[:24])


def _layout(args) -> str:
    return ";".join(f"{a.pos},{a.role},{a.dim}" for a in args)


def _arg_specs(f, f2, names, axis, nargs) -> tuple[ArgSpec, ...]:
    by_pos: dict[int, tuple[str, Node]] = {}
    for name, node in names.items():
        by_pos[node.params[0]] = (name, node)
    used = f.variables() + (f2.variables() if f2 is not None else [])
    for node in used:
        pos = node.params[0]
        if pos in by_pos and by_pos[pos][1] is not node:
            name, declared = by_pos[pos]
            raise FormulaError(f"argument {pos} is used as {to_text(node)} but declared as {name} = {to_text(declared)}")
        by_pos.setdefault(pos, (f"Var({pos})", node))
    count = max(by_pos, default=-1) + 1
    if nargs is not None:
        count = max(count, nargs)
    specs = []
    for pos in range(count):
        if pos not in by_pos:
            raise FormulaError(f"argument {pos} is never declared: give an alias or use it in the formula")
        name, node = by_pos[pos]
        _, dim, cat = node.params
        role = cat if cat == P or axis == 1 else 1 - cat
        specs.append(ArgSpec(pos, name, cat, role, dim))
    return tuple(specs)


@bounded
def swap_ij(node: Node) -> Node:
    """The same formula with categories i and j exchanged."""
    done: dict[int, Node] = {}
    for n in node.postorder():
        if n.op == "Var":
            pos, dim, cat = n.params
            done[id(n)] = make("Var", (), (pos, dim, cat if cat == P else 1 - cat))
        else:
            done[id(n)] = Node(n.op, tuple(done[id(c)] for c in n.children), n.params, n.dim)
    return done[id(node)]


# Lifted constants ----------------------------------------------------------------------------------------

MAX_LIFTED = 64     # float constants lifted per plan; the rest stay literals (a kernel's parameters are bounded)


def constant_slots(plan: Plan) -> list[Node]:
    """The float `Const` nodes a plan's kernel reads at run time, first use first (formula, then formula2): every
    `Const` of the simplified formulas. Integers (`IntCst`, exponents, dimensions, K) stay structural, and so do 0
    and 1, folded away by simplification before a plan exists."""
    seen: dict[Node, None] = {}
    for root in (plan.formula, plan.formula2):
        if root is not None:
            for node in root.postorder():
                if node.op == "Const":
                    seen.setdefault(node)
    return list(seen)[:MAX_LIFTED]


def lift_constants(plan: Plan) -> tuple[Plan, tuple[float, ...]]:
    """(the plan whose formulas read each float constant from a parameter argument of dimension 1, at positions
    nargs, nargs + 1, ..., instead of a literal; the constants' values). Two plans that differ only in float
    constants have the same lifted formulas (nodes are hash-consed), so the same key: one compiled kernel. Rebuilt
    with `Node`, not `make`, so the structure stays exactly the simplified one. (plan, ()) without float constants."""
    slots = constant_slots(plan)
    if not slots:
        return plan, ()
    base = plan.nargs
    done: dict[Node, Node] = {c: Node("Var", (), (base + k, 1, P), 1) for k, c in enumerate(slots)}

    def rebuilt(root):
        if root is None:
            return None
        for n in root.postorder():
            if n not in done:
                done[n] = Node(n.op, tuple(done[c] for c in n.children), n.params, n.dim) if n.children else n
        return done[root]

    f, f2 = rebuilt(plan.formula), rebuilt(plan.formula2)
    args = plan.args + tuple(ArgSpec(base + k, f"constant {k}", P, PARAM, 1) for k in range(len(slots)))
    key = "|".join([fingerprint(f), fingerprint(f2) if f2 is not None else "", plan.reduction.name,
                    str(plan.reduction.k), plan.dtype_acc, _layout(args), "" if plan.fast_math else "exact math",
                    "lifted"])
    lifted = Plan(f, f2, plan.reduction, plan.axis, args, plan.dtype_acc, plan.fast_math,
                  hashlib.sha256(key.encode()).hexdigest()[:24])
    return lifted, tuple(float(c.params[0]) for c in slots)
