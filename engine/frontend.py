"""What the numpy and torch front ends share: pykeops 2.x's `Genred` constructor, parameters in its order, its
tuning options, and the `generic_sum` / `generic_logsumexp` / `generic_argmin` / `generic_argkmin` shorthands."""
from __future__ import annotations

from .errors import ArgumentError, FormulaError
from .formula import parse_alias
from .plan import Plan
from .spec import Spec

# pykeops's summation schemes. kred's backends choose their own tiling and, with dtype_acc="auto", accumulate in
# float64, which is at least as accurate as any of them in float32; so each is accepted and checked, and none
# changes the result beyond rounding.
SUM_SCHEMES = ("auto", "direct_sum", "block_sum", "kahan_scheme")


def check_sum_scheme(sum_scheme) -> None:
    if sum_scheme not in SUM_SCHEMES:
        raise ArgumentError(f"sum_scheme must be one of {', '.join(SUM_SCHEMES)}, got {sum_scheme!r}")


class GenredBase:
    """Parses the reduction once; subclasses define `__call__` for their array type."""

    def __init__(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, dtype=None, opt_arg=None,
                 formula2: str | None = None, cuda_type=None, dtype_acc: str = "auto", use_double_acc: bool = False,
                 sum_scheme="auto", enable_chunks: bool = True, rec_multVar_highdim: bool = False,
                 use_fast_math: bool = True):
        # Callers pass these positionally, so the order is pykeops's. dtype and cuda_type are ignored (the arrays'
        # dtype decides); sum_scheme (checked), enable_chunks and rec_multVar_highdim are pykeops tuning knobs,
        # accepted for compatibility: our backends choose their own schemes. use_fast_math travels in the plan
        # (GPU exp).
        check_sum_scheme(sum_scheme)
        if use_double_acc:
            dtype_acc = "float64"
        self.formula, self.aliases = formula, list(aliases)
        self.spec = Spec(formula, tuple(self.aliases), reduction_op, axis, opt_arg, formula2, dtype_acc,
                         fast_math=use_fast_math)
        self.plan: Plan = self.spec.plan()


def generic_helpers(genred):
    """pykeops's `generic_*` shorthands for a binding's Genred: the output alias ("a = Vi(D)") picks the axis."""

    def axis_of(output: str) -> int:
        _, node = parse_alias(output, 0)
        cat = node.params[2]
        if cat == 2:
            raise FormulaError(f"output {output!r} must be indexed by i (Vi) or j (Vj), not a parameter")
        return 1 if cat == 0 else 0              # an output indexed by i is a reduction over j

    def generic_sum(formula, output, *aliases, **kwargs):
        return genred(formula, list(aliases), reduction_op="Sum", axis=axis_of(output), **kwargs)

    def generic_logsumexp(formula, output, *aliases, **kwargs):
        return genred(formula, list(aliases), reduction_op="LogSumExp", axis=axis_of(output), **kwargs)

    def generic_argmin(formula, output, *aliases, **kwargs):
        return genred(formula, list(aliases), reduction_op="ArgMin", axis=axis_of(output), **kwargs)

    def generic_argkmin(formula, output, K, *aliases, **kwargs):
        return genred(formula, list(aliases), reduction_op="ArgKMin", axis=axis_of(output), opt_arg=K, **kwargs)

    return generic_sum, generic_logsumexp, generic_argmin, generic_argkmin


def install_check(genred, convert, to_numpy):
    """pykeops's `test_install`: one Gaussian-kernel sum through a binding's Genred, compared with numpy."""
    import numpy as np

    rng = np.random.default_rng(0)
    x, y, b = rng.standard_normal((30, 3)), rng.standard_normal((20, 3)), rng.standard_normal((20, 1))
    op = genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
    got = to_numpy(op(*map(convert, (x, y, b))))
    want = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b
    ok = bool(np.allclose(got, want, rtol=1e-10, atol=1e-12))
    print("kred is working" if ok else f"kred gives wrong results: largest error {np.abs(got - want).max():.3g}")
    return ok
