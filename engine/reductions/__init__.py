"""Layer 2: the reduction table. One definition per reduction (engine.reductions.base says what it holds), used by
every backend, the block runtime, the cluster merge, gradients and the front ends. Adding a reduction is adding a
class to one of the family modules and a name to REDUCTIONS."""
import operator

from ..errors import ArgumentError, FormulaError
from .base import INDEX_DTYPE, NO_INDEX, Reduction, Slot, merge_all
from .extremum import ArgMax, ArgMin, Max, Max_ArgMax, Min, Min_ArgMin
from .kbest import ArgKMax, ArgKMin, KMax, KMax_ArgKMax, KMin, KMin_ArgKMin
from .logsumexp import LogSumExp, LogSumExpWeight, Max_SumShiftExp, Max_SumShiftExpWeight, SumSoftMaxWeight
from .sum import Sum

MAX_K = 1024

REDUCTIONS: dict[str, type[Reduction]] = {cls.__name__: cls for cls in (
    Sum, LogSumExp, LogSumExpWeight, SumSoftMaxWeight, Max_SumShiftExp, Max_SumShiftExpWeight,
    Min, Max, ArgMin, ArgMax, Min_ArgMin, Max_ArgMax,
    KMin, ArgKMin, KMin_ArgKMin, KMax, ArgKMax, KMax_ArgKMax)}


def called(name: str, with_formula2: bool) -> str:
    """The reduction a pykeops call of `name` means: with a formula2, a reduction that takes none may mean its
    weighted form (LogSumExp + formula2 is LogSumExpWeight). One rule for Spec and the LazyTensor reductions."""
    cls = REDUCTIONS.get(name)
    if cls is not None and with_formula2 and not cls.weighted and cls.weighted_form:
        return cls.weighted_form
    return name


def as_k(value):
    """K as an int when `value` is an integer of any kind (a numpy integer, a 0-d integer tensor: pykeops takes
    `argKmin(K=torch.tensor(5))`), else `value` unchanged for `bind` to refuse by name (floats stay; bools, and bool
    tensors, stay bools: they have an integer index, and bind refuses them)."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return bool(value)
    try:
        return operator.index(value)
    except TypeError:
        return value


def bind(name: str, fdim: int, f2dim: int | None = None, k: int | None = None) -> Reduction:
    """The reduction `name` for a formula of dimension `fdim` (and formula2 of `f2dim`, K = `k`)."""
    cls = REDUCTIONS.get(name)
    if cls is None:
        import difflib
        close = difflib.get_close_matches(str(name), list(REDUCTIONS), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise FormulaError(f"unknown reduction {name!r}{hint} (known: {', '.join(REDUCTIONS)})")
    if cls.needs_k:
        k = as_k(k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ArgumentError(f"{name}: opt_arg must be the number K of neighbours, an integer in 1..{MAX_K}; got {k!r}")
    else:
        k = None
    if cls.weighted and f2dim is None:
        raise FormulaError(f"{name}: needs formula2 (the weights)")
    if not cls.weighted:
        f2dim = None
    return cls(name, fdim, f2dim, k)


__all__ = ["INDEX_DTYPE", "NO_INDEX", "REDUCTIONS", "Reduction", "Slot", "as_k", "bind", "called", "merge_all"]
