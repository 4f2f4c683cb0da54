"""Forward-mode derivatives of reductions (torch.func.jvp, jacfwd, hessian): the tangent of a reduction is another
reduction, whose formulas are directional derivatives `Diff(f, v, u)` summed over the arguments v given a tangent u
(the tangents are new arguments of v's category and dimension). With D f = Σ_v Diff(f, v, u_v):

- Sum_j f                         -> Sum_j D f
- LogSumExp_j f                   -> SumSoftMaxWeight_j (f, D f)                  (the softmax-weighted mean of D f)
- LogSumExpWeight_j (f, w)        -> A / B with (A, B) = SumSoftMaxWeight_j (f, [w D f + D w, w])
- SumSoftMaxWeight_j (f, g)       -> A - out B with (A, B) = SumSoftMaxWeight_j (f, [D g + g D f, D f])

Min, Max, KMin and the index reductions refuse forward mode with an error that names reverse mode, which they all
support.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import FormulaError
from ..formula import make, var
from ..formula.autodiff import diff
from ..plan import Plan, plan_from_nodes, swap_ij

FORWARD = ("Sum", "LogSumExp", "LogSumExpWeight", "SumSoftMaxWeight")


@dataclass(frozen=True)
class Tangent:
    plan: Plan          # its arguments: the reduction's own, then the tangents of `moving`, in order
    combine: str        # how its result r gives the tangent: "same" r, "ratio" A / B, "centred" A - out B
    split: int          # the width of A in r


@functools.lru_cache(maxsize=1024)
def tangent(plan: Plan, moving: tuple[int, ...]) -> Tangent | None:
    """How to compute the tangent of `plan`'s result when the arguments at `moving` carry tangents. None when the
    result does not depend on them."""
    name = plan.reduction.name
    if name not in FORWARD:
        raise FormulaError(f"forward-mode differentiation (jvp, jacfwd, hessian) of {name} is not implemented: "
                           f"only {', '.join(FORWARD)}; use reverse mode (backward, torch.func.vjp / jacrev)")
    user = swap_ij if plan.axis == 0 else (lambda node: node)            # the user's categories
    f = user(plan.formula)
    g = user(plan.formula2) if plan.formula2 is not None else None
    names = {spec.name: var(spec.pos, spec.dim, spec.cat) for spec in plan.args}
    pairs = []
    for k, pos in enumerate(moving):
        spec = plan.args[pos]
        u = var(plan.nargs + k, spec.dim, spec.cat)
        names[f"Var({plan.nargs + k})"] = u
        pairs.append((var(spec.pos, spec.dim, spec.cat), u))

    def derivative(h):
        terms = [diff(h, v, u) for v, u in pairs]
        total = terms[0]
        for term in terms[1:]:
            total = make("Add", (total, term))
        return total

    df = derivative(f)
    dg = derivative(g) if g is not None else None
    if df.op == "Zero" and (dg is None or dg.op == "Zero"):
        return None

    def build(f1, f2, reduction):
        return plan_from_nodes(f1, f2, reduction, plan.axis, None, plan.dtype_acc, names, len(names), plan.fast_math)

    if name == "Sum":
        return Tangent(build(df, None, "Sum"), "same", plan.out_dim)
    if name == "LogSumExp":
        return Tangent(build(f, df, "SumSoftMaxWeight"), "same", plan.out_dim)
    if name == "LogSumExpWeight":
        weighted = make("Add", (make("Mult", (g, df)), dg))
        return Tangent(build(f, make("Concat", (weighted, g)), "SumSoftMaxWeight"), "ratio", g.dim)
    moved = make("Add", (dg, make("Mult", (g, df))))
    return Tangent(build(f, make("Concat", (moved, df)), "SumSoftMaxWeight"), "centred", g.dim)
