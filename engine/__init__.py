"""kred engine: KeOps-style formula reductions without building the N x M matrix."""
from .errors import ArgumentError, BackendError, DimensionError, FormulaError, KredError
from .plan import Plan, make_plan, plan_from_nodes
from .run import run

__all__ = ["ArgumentError", "BackendError", "DimensionError", "FormulaError", "KredError", "Plan", "make_plan",
           "plan_from_nodes", "reduce", "run"]


def reduce(formula: str, aliases, *args, reduction_op: str = "Sum", axis: int = 0, opt_arg=None, formula2=None,
           dtype_acc: str = "auto", backend: str = "auto"):
    """One-shot reduction: `reduce("Exp(-SqDist(x,y))*b", ["x=Vi(3)", ...], x, y, b, axis=1)`."""
    return run(make_plan(formula, aliases, reduction_op, axis, opt_arg, formula2, dtype_acc), args, backend=backend)
