"""What the numpy and torch front ends share: pykeops 2.x's `Genred` constructor, parameters in its order."""
from __future__ import annotations

from .plan import Plan
from .spec import Spec


class GenredBase:
    """Parses the reduction once; subclasses define `__call__` for their array type."""

    def __init__(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, dtype=None, opt_arg=None,
                 formula2: str | None = None, cuda_type=None, dtype_acc: str = "auto", use_double_acc: bool = False,
                 sum_scheme="auto", enable_chunks: bool = True, rec_multVar_highdim: bool = False,
                 use_fast_math: bool = True):
        # Callers pass these positionally, so the order is pykeops's. dtype and cuda_type are ignored (the arrays'
        # dtype decides); sum_scheme, enable_chunks and rec_multVar_highdim are pykeops tuning knobs, accepted for
        # compatibility: our backends choose their own schemes. use_fast_math travels in the plan (GPU exp).
        if use_double_acc:
            dtype_acc = "float64"
        self.formula, self.aliases = formula, list(aliases)
        self.spec = Spec(formula, tuple(self.aliases), reduction_op, axis, opt_arg, formula2, dtype_acc,
                         fast_math=use_fast_math)
        self.plan: Plan = self.spec.plan()
