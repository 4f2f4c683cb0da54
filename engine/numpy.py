"""numpy front end, call-compatible with `pykeops.numpy`: change the import and keep the code."""
from __future__ import annotations

from .kernel_solve import KernelSolve  # noqa: F401  (re-exported: engine.numpy.KernelSolve)
from .numpy_lazytensor import LazyTensor, Pm, Vi, Vj  # noqa: F401  (re-exported, as in pykeops.numpy)
from .ranges import (cluster_ranges, cluster_ranges_centroids, from_matrix, grid_cluster,  # noqa: F401
                     sort_clusters, swap_axes)
from .plan import Plan, make_plan
from .run import run


class Genred:
    """A reduction `reduction_op_j formula(x_i, y_j, p)` (axis=1) or over i (axis=0), compiled on first use.

    >>> op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], axis=1)
    >>> a = op(x, y, b)        # (N, 2)
    """

    def __init__(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, dtype=None, opt_arg=None,
                 formula2: str | None = None, cuda_type=None, dtype_acc: str = "auto", use_double_acc: bool = False,
                 sum_scheme="auto", enable_chunks: bool = True, rec_multVar_highdim: bool = False,
                 use_fast_math: bool = True):
        # The parameters are pykeops 2.x's, in its order (callers pass them positionally). dtype and cuda_type are
        # ignored (the arrays' dtype decides); sum_scheme, enable_chunks, rec_multVar_highdim and use_fast_math are
        # pykeops tuning knobs, accepted for compatibility: our backends choose their own schemes.
        if use_double_acc:
            dtype_acc = "float64"
        self.formula, self.aliases = formula, list(aliases)
        self.plan: Plan = make_plan(formula, self.aliases, reduction_op, axis, opt_arg, formula2, dtype_acc)

    def __call__(self, *args, backend: str = "auto", device_id: int = -1, ranges=None, out=None, cluster=None):
        # backend="cluster" (or cluster=engine.cluster.Cluster(...)) runs the reduction on Ray workers
        return run(self.plan, args, backend=backend, out=out, ranges=ranges, device_id=device_id, cluster=cluster)
