"""Gradients of reductions: the backward pass of a reduction is described as another reduction.

`gradient(plan, pos)` answers "how do I get  sum_r <cotangent_r, d result_r / d arg_pos>" as data, so that every
front end runs it with its own arrays (torch tensors that carry autograd, so the backward is differentiable again)
and every backend, the cluster included, runs backward passes like any other plan. Each reduction names its rule
in the reduction table (`Reduction.gradient_rule`); the rules give two shapes of answer:

- `ReducedGradient` ("sum", "logsumexp", "logsumexp_weight", "softmax_weight"): a Sum reduction of `Grad(f, v, weight)`
  over the arguments plus a few extra arrays (the cotangent, the forward output, ...). A variable indexed like the
  output is reduced over the same axis; one indexed like the reduced axis is reduced over the *other* axis (giving
  one row per point of that variable); a parameter's per-row gradients are summed.
- `SelectedGradient` ("selected": Min, Max, KMin, KMax and their value + index variants): only the selected pairs
  contribute, so the front end gathers the reduced variables at the selected indices (from the forward pass, see `with_indices`),
  evaluates `Grad(f, v, e)` once per selected pair (a reduction over a single column) and scatters the results back.
  pykeops refuses these gradients; the indices make them exact.

"zero": the index reductions are piecewise constant, their gradient is zero (`ZERO`). Max_SumShiftExp and
Max_SumShiftExpWeight are building blocks with no gradient rule: asking for one raises a FormulaError.

Everything is written in the user's orientation (the plan's `axis` and the categories as written), so that derived
plans keep the pykeops meaning of `axis` and of the `ranges` 6-tuple: a plan over the other axis uses its other half.
"""
from __future__ import annotations

from dataclasses import dataclass

import cachetools

from .. import limits
from ..errors import FormulaError
from ..formula import I, J, P, Node, make, var
from ..formula.autodiff import grad, substitute
from ..plan import Plan, plan_bytes, plan_from_nodes, swap_ij
from . import REDUCTIONS

# Extra arrays a gradient plan takes after the user's arguments, in this order when present.
COTANGENT, OUTPUT, LOGSUMEXP = "cotangent", "output", "logsumexp"



@dataclass(frozen=True)
class ReducedGradient:
    plan: Plan                 # Sum of the gradient formula, over the user's arguments + `extras`
    extras: tuple[str, ...]    # COTANGENT, OUTPUT, LOGSUMEXP: what to append, in order
    sum_rows: bool             # the argument is a parameter: add up the plan's rows
    logsumexp: Plan | None = None   # the plan that computes the LOGSUMEXP extra (on the user's arguments)


@dataclass(frozen=True)
class SelectedGradient:
    plan: Plan                 # Sum over one column of Grad(f', v, e): f' has the reduced variables gathered
    slots: int                 # selected pairs per row: K * dim (dim for Min/Max)
    fdim: int                  # the formula's dimension: slot s belongs to component s % fdim
    role: str                  # "rows": sum each row's slots; "reduced": scatter to the indices; "param": sum all
    gathered: tuple[bool, ...]  # per user argument: gathered at the indices (a reduced variable) or repeated


ZERO = None     # the gradient of an index-valued reduction


def gradient(plan: Plan, pos: int):
    """How to compute the gradient of `plan`'s result with respect to argument `pos` (see the module docstring)."""
    return _gradient(plan, pos)


def _rule_bytes(rule) -> int:
    plans = [getattr(rule, name, None) for name in ("plan", "logsumexp")]
    return 1 + sum(plan_bytes(p) for p in plans if p is not None)


# derived plans per plan, bounded like make_plan's cache (KRED_MAX_PLANS, KRED_MAX_PLAN_BYTES)
_RULES = limits.BoundedLRU(limits.PLANS, limits.PLAN_BYTES, getsizeof=_rule_bytes)
_WITH_INDICES = limits.BoundedLRU(limits.PLANS, limits.PLAN_BYTES, getsizeof=plan_bytes)


@cachetools.cached(_RULES, lock=_RULES.lock)
def _gradient(plan: Plan, pos: int):
    rule = plan.reduction.gradient_rule           # each reduction names its rule in the reduction table
    if rule == "zero":
        return ZERO
    if rule is None:
        differentiable = sorted(name for name, cls in REDUCTIONS.items() if cls.gradient_rule is not None)
        raise FormulaError(f"{plan.reduction.name} has no gradient rule (differentiable: {', '.join(differentiable)})")
    return _BUILDERS[rule](plan, pos)


def with_indices(plan: Plan) -> Plan:
    """For a selecting reduction, the same plan returning (values, indices): what its gradient needs. Other plans
    are returned as they are."""
    return _with_indices(plan)


@cachetools.cached(_WITH_INDICES, lock=_WITH_INDICES.lock)
def _with_indices(plan: Plan) -> Plan:
    target = plan.reduction.indexed
    if target is None or target == plan.reduction.name:
        return plan
    f, _, names = _user_view(plan)
    return plan_from_nodes(f, None, target, plan.axis, plan.reduction.k, plan.dtype_acc, names, plan.nargs,
                           fast_math=plan.fast_math)


# The pieces every rule needs ---------------------------------------------------------------------------------

def _user_view(plan: Plan):
    """(formula, formula2, names) as the user wrote them: categories i/j as declared, not normalised."""
    unswap = (lambda node: swap_ij(node)) if plan.axis == 0 else (lambda node: node)
    f = unswap(plan.formula)
    f2 = unswap(plan.formula2) if plan.formula2 is not None else None
    names = {spec.name: var(spec.pos, spec.dim, spec.cat) for spec in plan.args}
    return f, f2, names


def _output_category(plan: Plan) -> int:
    return I if plan.axis == 1 else J


def _extra(plan: Plan, names: dict, name: str, dim: int) -> Node:
    """A new argument after the existing ones, indexed like the output."""
    node = var(len(names), dim, _output_category(plan))
    names[name if name not in names else f"{name}_{len(names)}"] = node    # a gradient of a gradient has two
    return node


def _target(plan: Plan, pos: int) -> Node:
    spec = plan.args[pos]
    return var(spec.pos, spec.dim, spec.cat)


def _reduced(plan: Plan, pos: int, formula: Node, names: dict, extras: tuple, logsumexp=None) -> ReducedGradient:
    """Sum `formula` over the axis that leaves one row per point of argument `pos`."""
    cat = plan.args[pos].cat
    axis = plan.axis if cat in (P, _output_category(plan)) else 1 - plan.axis
    derived = plan_from_nodes(formula, None, "Sum", axis, None, plan.dtype_acc, names, len(names),
                              fast_math=plan.fast_math)
    return ReducedGradient(derived, extras, cat == P, logsumexp)


# Sum-like reductions ------------------------------------------------------------------------------------------

def _sum(plan: Plan, pos: int) -> ReducedGradient:
    f, _, names = _user_view(plan)
    g = _extra(plan, names, COTANGENT, plan.out_dim)
    return _reduced(plan, pos, grad(f, _target(plan, pos), g), names, (COTANGENT,))


def _logsumexp(plan: Plan, pos: int) -> ReducedGradient:
    # d log sum_j exp(f_j) = sum_j exp(f_j - out) df_j
    f, _, names = _user_view(plan)
    g = _extra(plan, names, COTANGENT, plan.out_dim)
    out = _extra(plan, names, OUTPUT, plan.out_dim)
    weight = make("Mult", (make("Exp", (make("Subtract", (f, out)),)), g))
    return _reduced(plan, pos, grad(f, _target(plan, pos), weight), names, (COTANGENT, OUTPUT))


def _logsumexp_weight(plan: Plan, pos: int) -> ReducedGradient:
    # out = log sum_j exp(f_j) w_j (f scalar):  d out = sum_j exp(f_j - out) (w_j df_j + dw_j), componentwise
    f, w, names = _user_view(plan)
    g = _extra(plan, names, COTANGENT, plan.out_dim)
    out = _extra(plan, names, OUTPUT, plan.out_dim)
    v = _target(plan, pos)
    share = make("Mult", (make("Exp", (make("Subtract", (f, out)),)), g))
    formula = make("Add", (grad(f, v, make("Sum", (make("Mult", (share, w)),))), grad(w, v, share)))
    return _reduced(plan, pos, formula, names, (COTANGENT, OUTPUT))


def _softmax_weight(plan: Plan, pos: int) -> ReducedGradient:
    # out = sum_j p_j w_j with p_j = exp(f_j - lse):  d out = sum_j p_j (dw_j + (w_j - out) df_j)
    f, w, names = _user_view(plan)
    g = _extra(plan, names, COTANGENT, plan.out_dim)
    out = _extra(plan, names, OUTPUT, plan.out_dim)
    lse = _extra(plan, names, LOGSUMEXP, 1)
    v = _target(plan, pos)
    p = make("Exp", (make("Subtract", (f, lse)),))
    inner = make("Add", (grad(w, v, g), grad(f, v, make("Sum", (make("Mult", (g, make("Subtract", (w, out)))),)))))
    user = {name: node for name, node in names.items() if node.params[0] < plan.nargs}
    logsumexp = plan_from_nodes(f, None, "LogSumExp", plan.axis, None, plan.dtype_acc, user, plan.nargs,
                                fast_math=plan.fast_math)
    return _reduced(plan, pos, make("Mult", (p, inner)), names, (COTANGENT, OUTPUT, LOGSUMEXP), logsumexp)


# Selecting reductions -------------------------------------------------------------------------------------------

def _selected(plan: Plan, pos: int) -> SelectedGradient:
    """Gradient through the selected pairs: f with its reduced variables moved to the output's index."""
    f, _, names = _user_view(plan)
    out_cat = _output_category(plan)
    reduced_cat = 1 - out_cat
    moved = {node: var(node.params[0], node.params[1], out_cat) for node in names.values()
             if node.params[2] == reduced_cat}
    f_moved = substitute(f, moved)
    names = {name: moved.get(node, node) for name, node in names.items()}
    e = _extra(plan, names, COTANGENT, plan.reduction.fdim)
    v = _target(plan, pos)
    formula = grad(f_moved, moved.get(v, v), e)
    derived = plan_from_nodes(formula, None, "Sum", plan.axis, None, plan.dtype_acc, names, len(names),
                              fast_math=plan.fast_math)
    cat = plan.args[pos].cat
    role = "param" if cat == P else "rows" if cat == out_cat else "reduced"
    k = plan.reduction.k or 1
    gathered = tuple(spec.cat == reduced_cat for spec in plan.args)
    return SelectedGradient(derived, k * plan.reduction.fdim, plan.reduction.fdim, role, gathered)


_BUILDERS = {"sum": _sum, "logsumexp": _logsumexp, "logsumexp_weight": _logsumexp_weight,
             "softmax_weight": _softmax_weight, "selected": _selected}
