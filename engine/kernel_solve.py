"""KernelSolve: solve (alpha * I + K) a = b, where `K a` is a Sum reduction linear in the variable `a`.

The solver is conjugate gradient, written once for numpy arrays and torch tensors alike (it only adds, multiplies
and sums over rows), with one independent solve per column of b. K must be symmetric positive semi-definite, as in
pykeops (a Gaussian kernel matrix is). This module holds the parts shared by `engine.numpy.KernelSolve` (below) and
`engine.torch.KernelSolve` (differentiable): building and checking the plan, its transpose, and the solver.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError, FormulaError
from .formula import I, J, var
from .frontend import check_sum_scheme
from .formula.autodiff import grad, substitute
from .plan import Plan, plan_from_nodes, swap_ij
from .spec import Spec
from .run import run


@dataclass(frozen=True)
class LinearSystem:
    plan: Plan       # Sum_j formula: the map a -> K a
    pos: int         # the argument holding b (and a)


def linear_system(formula: str, aliases, varinvalias: str, axis: int = 0, dtype_acc: str = "auto",
                  fast_math: bool = True) -> LinearSystem:
    """Parse and check a pykeops KernelSolve: `formula` linear in `varinvalias`, reduced with Sum over `axis`."""
    plan = Spec(formula, aliases, "Sum", axis, dtype_acc=dtype_acc, fast_math=fast_math).plan()
    by_name = {spec.name: spec for spec in plan.args}
    if varinvalias not in by_name:
        raise ArgumentError(f"KernelSolve: varinvalias {varinvalias!r} is not one of the aliases "
                            f"({', '.join(by_name)})")
    spec = by_name[varinvalias]
    reduced = J if axis == 1 else I
    if spec.cat != reduced:
        raise FormulaError(f"KernelSolve: {spec.describe()} must be indexed by {'ij'[reduced]}, the index that "
                           f"axis={axis} reduces over, so that K maps it to the output")
    if plan.out_dim != spec.dim:
        raise FormulaError(f"KernelSolve: the formula has dimension {plan.out_dim} but {varinvalias} has "
                           f"dimension {spec.dim}; K must map {varinvalias} to a vector of its own shape")
    f = swap_ij(plan.formula) if axis == 0 else plan.formula
    b = var(spec.pos, spec.dim, spec.cat)
    probe = var(plan.nargs, f.dim, I)
    if b in grad(f, b, probe).postorder():
        raise FormulaError(f"KernelSolve: the formula must be linear in {varinvalias}")
    return LinearSystem(plan, spec.pos)


@functools.lru_cache(maxsize=256)     # one transposed plan per system, so its own gradient plans are cached too
def transpose(system: LinearSystem) -> LinearSystem:
    """The system of K^T: the same formula with the unknown indexed like the output, reduced over the other axis."""
    plan, pos = system.plan, system.pos
    f = swap_ij(plan.formula) if plan.axis == 0 else plan.formula
    names = {spec.name: var(spec.pos, spec.dim, spec.cat) for spec in plan.args}
    spec = plan.args[pos]
    moved = var(spec.pos, spec.dim, 1 - spec.cat)
    names[spec.name] = moved
    flipped = substitute(f, {var(spec.pos, spec.dim, spec.cat): moved})
    return LinearSystem(plan_from_nodes(flipped, None, "Sum", 1 - plan.axis, None, plan.dtype_acc, names, plan.nargs,
                                        fast_math=plan.fast_math), pos)


def conjugate_gradient(apply, b, alpha: float, eps: float = 1e-6, max_iter: int | None = None):
    """Solve (alpha * I + K) a = b for each column of b, K = `apply` symmetric positive semi-definite.

    Stops when every column's residual is below eps times its right-hand side's norm, or after `max_iter` steps
    (default: twice the number of unknowns, where exact arithmetic would have converged).
    """
    def matvec(v):
        return alpha * v + apply(v)

    def dot(u, v):                                  # per column, keeping the axis (also with batch dimensions)
        return (u * v).sum(-2)[..., None, :]

    if b.ndim == 1:                                 # a vector: one column
        return conjugate_gradient(lambda v: apply(v[:, 0])[:, None], b[:, None], alpha, eps, max_iter)[:, 0]
    goal = eps * eps * dot(b, b)
    a, r = 0 * b, b
    p, rr = r, dot(r, r)
    max_iter = max_iter if max_iter is not None else max(20, 2 * b.shape[-2])
    for _ in range(max_iter):
        if bool((rr <= goal).all()):
            break
        kp = matvec(p)
        pkp = dot(p, kp)
        step = rr / (pkp + (pkp == 0))              # a converged column (rr = 0) keeps step 0
        a = a + step * p
        r = r - step * kp
        rr_next = dot(r, r)
        p = r + (rr_next / (rr + (rr == 0))) * p
        rr = rr_next
    return a


class KernelSolve:
    """numpy KernelSolve, call-compatible with `pykeops.numpy.KernelSolve`.

    >>> solve = KernelSolve("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], "b", axis=1)
    >>> a = solve(x, x, b, alpha=0.1)          # (alpha * I + K_xx) a = b
    """

    def __init__(self, formula: str, aliases, varinvalias: str, axis: int = 0, dtype=None, opt_arg=None,
                 dtype_acc: str = "auto", use_double_acc: bool = False, sum_scheme="auto", enable_chunks: bool = True,
                 rec_multVar_highdim=None, use_fast_math: bool = True):
        # pykeops.numpy.KernelSolve's parameters in its order (its torch twin orders them differently); dtype,
        # opt_arg and the tuning knobs are accepted for compatibility and ignored.
        check_sum_scheme(sum_scheme)
        if use_double_acc:
            dtype_acc = "float64"
        self.formula, self.aliases, self.varinvalias = formula, list(aliases), varinvalias
        self.system = linear_system(formula, self.aliases, varinvalias, axis, dtype_acc, use_fast_math)

    def __call__(self, *args, backend: str = "auto", device_id: int = -1, alpha: float = 1e-10, eps: float = 1e-6,
                 ranges=None):
        plan, pos = self.system.plan, self.system.pos
        args = list(args)
        if len(args) != plan.nargs:
            raise ArgumentError(f"KernelSolve expects {plan.nargs} arrays, got {len(args)}")

        def apply(a):
            args[pos] = a
            return run(plan, args, backend=backend, ranges=ranges, device_id=device_id)

        b = np.asarray(args[pos])
        return conjugate_gradient(apply, b, alpha, eps).astype(b.dtype, copy=False)
