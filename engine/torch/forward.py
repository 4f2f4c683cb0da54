"""Forward-mode derivatives of reductions (torch.func.jvp, jacfwd, hessian): the tangent of a reduction is another
reduction, whose formula is the directional derivative `Diff(f, v, u)` summed over the arguments v given a tangent u
(the tangents are new arguments of v's category and dimension).

- Sum_j f            -> Sum_j Σ_v Diff(f, v, u_v)
- LogSumExp_j f      -> SumSoftMaxWeight_j (f, Σ_v Diff(f, v, u_v))     (the softmax-weighted mean of the tangents)
Other reductions refuse forward mode with an error that names reverse mode, which they all support.
"""
from __future__ import annotations

import functools

from ..errors import FormulaError
from ..formula import make, var
from ..formula.autodiff import diff
from ..plan import Plan, plan_from_nodes, swap_ij

FORWARD = ("Sum", "LogSumExp")


@functools.lru_cache(maxsize=1024)
def tangent_plan(plan: Plan, moving: tuple[int, ...]) -> Plan | None:
    """The plan of the tangent of `plan` when the arguments at `moving` carry tangents, which are passed after the
    plan's own arguments, in that order. None when the result does not depend on them."""
    name = plan.reduction.name
    if name not in FORWARD or plan.formula2 is not None:
        raise FormulaError(f"forward-mode differentiation (jvp, jacfwd, hessian) of {name} is not implemented: "
                           f"only {', '.join(FORWARD)}; use reverse mode (backward, torch.func.vjp / jacrev)")
    f = swap_ij(plan.formula) if plan.axis == 0 else plan.formula          # the user's categories
    names = {spec.name: var(spec.pos, spec.dim, spec.cat) for spec in plan.args}
    terms = []
    for k, pos in enumerate(moving):
        spec = plan.args[pos]
        u = var(plan.nargs + k, spec.dim, spec.cat)
        names[f"Var({plan.nargs + k})"] = u
        terms.append(diff(f, var(spec.pos, spec.dim, spec.cat), u))
    df = terms[0]
    for term in terms[1:]:
        df = make("Add", (df, term))
    if df.op == "Zero":
        return None
    if name == "Sum":
        return plan_from_nodes(df, None, "Sum", plan.axis, None, plan.dtype_acc, names, len(names), plan.fast_math)
    return plan_from_nodes(f, df, "SumSoftMaxWeight", plan.axis, None, plan.dtype_acc, names, len(names),
                           plan.fast_math)
