"""Layer 2: the reduction table. Each reduction is one monoid used by every backend and by the cluster merge."""
from ..errors import ArgumentError, FormulaError
from .monoids import INDEX_DTYPE, NO_INDEX, REDUCTIONS, Reduction, merge_all

MAX_K = 1024


def bind(name: str, fdim: int, f2dim: int | None = None, k: int | None = None) -> Reduction:
    """The reduction `name` for a formula of dimension `fdim` (and formula2 of `f2dim`, K = `k`)."""
    cls = REDUCTIONS.get(name)
    if cls is None:
        import difflib
        close = difflib.get_close_matches(str(name), list(REDUCTIONS), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise FormulaError(f"unknown reduction {name!r}{hint} (known: {', '.join(REDUCTIONS)})")
    if cls.needs_k:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ArgumentError(f"{name}: opt_arg must be the number K of neighbours, an integer in 1..{MAX_K}; got {k!r}")
    else:
        k = None
    weighted = getattr(cls, "weighted", False)
    if weighted and f2dim is None:
        raise FormulaError(f"{name}: needs formula2 (the weights)")
    if not weighted:
        f2dim = None
    return cls(name, fdim, f2dim, k)


__all__ = ["INDEX_DTYPE", "NO_INDEX", "REDUCTIONS", "Reduction", "bind", "merge_all"]
