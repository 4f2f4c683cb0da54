"""kred engine: KeOps-style formula reductions without building the N x M matrix."""
from .errors import ArgumentError, BackendError, DimensionError, FormulaError, KredError
from .plan import Plan, plan_from_nodes
from .run import run
from .spec import Spec, make_plan

__all__ = ["ArgumentError", "BackendError", "DimensionError", "FormulaError", "KredError", "Plan", "make_plan",
           "plan_from_nodes", "reduce", "run", "Spec"]


def reduce(formula: str, aliases, *args, backend: str = "auto", **options):
    """One-shot reduction: `reduce("Exp(-SqDist(x,y))*b", ["x=Vi(3)", ...], x, y, b, axis=1)`; `options` are
    the fields of `Spec` (reduction_op, axis, opt_arg, formula2, dtype_acc, fast_math)."""
    return run(Spec(formula, aliases, **options).plan(), args, backend=backend)
